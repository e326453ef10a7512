"""Tokenized text datasets as sharded parquet plus a manifest.

Layout under the output URI:
    tokenizer.json
    train/part-00000.parquet ...   rows: chunk_id (int64), tokens (list<uint16|int32>)
    val/part-00000.parquet ...
    manifest.json                  written last: its presence means the dataset is whole

Each row is a contiguous chunk of `chunk_tokens` tokens of the corpus (the last row of a split
may be shorter); training cuts rows into windows, so one dataset serves any sequence length up
to chunk_tokens - 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from cluster.storage import Location, resolve
from genai.data.shards import (  # noqa: F401  (DatasetError, CHECKSUM_LIMIT_BYTES: public names of this module)
    CHECKSUM_LIMIT_BYTES, FORMAT_VERSION, MANIFEST_FILE, DatasetError, clear_output, output_location, read_manifest,
    write_manifest, write_shard,
)
from genai.data.shards import verify_shards as _verify_shards
from genai.data.sources import read_corpus
from genai.data.tokenizers import TOKENIZER_FILE, BPETokenizer, CharTokenizer, Tokenizer, tokenizer_from_json

DATASET_KIND = "text-tokens"


@dataclass
class SplitInfo:
    tokens: int
    rows: int
    last_row_tokens: int
    shards: list[dict] = field(default_factory=list)


@dataclass
class TextManifest:
    uri: str
    vocab_size: int
    tokenizer_kind: str
    chunk_tokens: int
    splits: dict[str, SplitInfo]
    raw: dict

    def shard_uris(self, split: str) -> list[str]:
        base = resolve(self.uri)
        return [base.join(s["path"]).uri for s in self.splits[split].shards]

    def min_full_rows(self, split: str, world_size: int) -> int:
        """Full-length rows every worker is guaranteed under an equal row split."""
        info = self.splits[split]
        per_worker = info.rows // world_size
        return per_worker - (1 if info.last_row_tokens < self.chunk_tokens else 0)


def _token_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= np.iinfo(np.uint16).max + 1 else pa.int32()


class TokenShardWriter:
    """Writes one split's token stream as parquet shards of whole chunks, with checksums."""

    def __init__(self, base: Location, split: str, vocab_size: int, chunk_tokens: int, shard_tokens: int):
        self.base, self.split = base, split
        self.type = _token_type(vocab_size)
        self.chunk_tokens = chunk_tokens
        self.rows_per_shard = max(1, shard_tokens // chunk_tokens)
        self.shards: list[dict] = []

    def write(self, tokens: np.ndarray) -> SplitInfo:
        n = len(tokens)
        starts = list(range(0, n, self.chunk_tokens))
        for shard_idx, first in enumerate(range(0, len(starts), self.rows_per_shard)):
            rows = starts[first:first + self.rows_per_shard]
            chunks = [tokens[s:s + self.chunk_tokens] for s in rows]
            offsets = np.zeros(len(chunks) + 1, dtype=np.int32)
            offsets[1:] = np.cumsum([len(c) for c in chunks])
            values = pa.array(np.concatenate(chunks).astype(self.type.to_pandas_dtype()), type=self.type)
            table = pa.table({
                "chunk_id": pa.array(np.arange(first, first + len(rows), dtype=np.int64)),
                "tokens": pa.ListArray.from_arrays(pa.array(offsets), values),
            })
            entry = write_shard(self.base, f"{self.split}/part-{shard_idx:05d}.parquet", table, row_group_size=64)
            self.shards.append({"path": entry["path"], "rows": entry["rows"], "tokens": int(offsets[-1]),
                                "bytes": entry["bytes"], "sha256": entry["sha256"]})
        last = n - starts[-1] if starts else 0
        return SplitInfo(tokens=n, rows=len(starts), last_row_tokens=last, shards=self.shards)


def prepare_text_dataset(
    source: str,
    out_uri: str,
    tokenizer: str = "char",
    val_fraction: float = 0.1,
    bpe_vocab_size: int = 4096,
    chunk_tokens: int = 1024,
    shard_tokens: int = 8 * 1024 * 1024,
    overwrite: bool = False,
    log=print,
) -> TextManifest:
    """Read a corpus, train a tokenizer, write train/val parquet shards and the manifest (last)."""
    if tokenizer not in ("char", "bpe"):
        raise DatasetError(f"--tokenizer {tokenizer!r}: choose char or bpe")
    if not 0.0 < val_fraction < 0.5:
        raise DatasetError(f"--val-fraction {val_fraction}: must be between 0 and 0.5")
    if chunk_tokens < 8:
        raise DatasetError(f"--chunk-tokens {chunk_tokens}: must be at least 8")
    out = output_location(out_uri, overwrite)
    t0 = time.time()
    text = read_corpus(source)
    log(f"read {len(text):,} characters from {source}")
    if tokenizer == "char":
        tok: Tokenizer = CharTokenizer.train(text)
    else:
        tok = BPETokenizer.train((text[i:i + (1 << 20)] for i in range(0, len(text), 1 << 20)), bpe_vocab_size)
    ids = tok.encode(text)
    n_val = max(1, int(len(ids) * val_fraction))
    if len(ids) - n_val < 2 or n_val < 2:
        raise DatasetError(f"{source}: corpus too small ({len(ids)} tokens) to split into train and val")
    log(f"tokenized with {tok.kind} tokenizer: vocab {tok.vocab_size}, {len(ids):,} tokens")

    # Clear a half-written earlier attempt (no manifest) or an overwritten dataset.
    clear_output(out, ("train", "val", TOKENIZER_FILE))
    tok_bytes = tok.to_json().encode()
    out.join(TOKENIZER_FILE).write_bytes(tok_bytes)
    splits = {
        "train": TokenShardWriter(out, "train", tok.vocab_size, chunk_tokens, shard_tokens).write(ids[:-n_val]),
        "val": TokenShardWriter(out, "val", tok.vocab_size, chunk_tokens, shard_tokens).write(ids[-n_val:]),
    }
    write_manifest(out, DATASET_KIND, source, splits,
                   tokenizer={"kind": tok.kind, "vocab_size": tok.vocab_size, "file": TOKENIZER_FILE,
                              "sha256": hashlib.sha256(tok_bytes).hexdigest()},
                   vocab_size=tok.vocab_size, chunk_tokens=chunk_tokens, token_dtype=str(_token_type(tok.vocab_size)))
    log(f"wrote {out.uri}: train {splits['train'].tokens:,} tokens in {len(splits['train'].shards)} shard(s), "
        f"val {splits['val'].tokens:,} tokens ({time.time() - t0:.1f}s)")
    return load_manifest(out.uri)


def load_manifest(uri: str) -> TextManifest:
    """Read and check a dataset's manifest. Raises DatasetError naming the URI."""
    raw = read_manifest(uri, DATASET_KIND)
    loc = resolve(uri)
    splits = {k: SplitInfo(**v) for k, v in raw["splits"].items()}
    return TextManifest(uri=loc.uri, vocab_size=raw["vocab_size"], tokenizer_kind=raw["tokenizer"]["kind"],
                        chunk_tokens=raw["chunk_tokens"], splits=splits, raw=raw)


def load_tokenizer(dataset_uri: str) -> Tokenizer:
    return tokenizer_from_json(resolve(dataset_uri).join(TOKENIZER_FILE).read_text())


def verify_shards(manifest: TextManifest, checksums: bool | None = None) -> None:
    """Check every shard against the manifest (size, and sha256 when `checksums`, by default for datasets
    up to 256 MiB). Raises DatasetError naming the shard that is missing or corrupt."""
    _verify_shards(manifest.uri, [s for info in manifest.splits.values() for s in info.shards], checksums)


def worker_rows(shard_uris: list[str], rank: int, world: int, batch_size: int = 32):
    """Every world-th row of the shards (in order), as pyarrow record batches of the `tokens` column, read
    straight from storage and lazily: stop iterating and the rest is never read."""
    import pyarrow.parquet as pq

    seen = 0
    for uri in shard_uris:
        loc = resolve(uri)
        with loc.fs.open_input_file(loc.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["tokens"]):
                mine = [i for i in range(batch.num_rows) if (seen + i) % world == rank]
                seen += batch.num_rows
                if mine:
                    yield batch.take(mine)


def cached_dataset_uri(source: str, tokenizer: str, bpe_vocab_size: int, val_fraction: float, chunk_tokens: int,
                       cache_dir: str) -> str:
    """Where a recipe's dataset is prepared on first use; the key covers every preparation input."""
    key = json.dumps([FORMAT_VERSION, source, tokenizer, bpe_vocab_size if tokenizer == "bpe" else 0, val_fraction,
                      chunk_tokens])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = source.replace("builtin:", "").rstrip("/").split("/")[-1].split(".")[0] or "corpus"
    return os.path.join(os.path.expanduser(cache_dir), f"{stem}-{tokenizer}-{digest}")


def ensure_dataset(source: str, tokenizer: str, bpe_vocab_size: int, val_fraction: float, chunk_tokens: int,
                   cache_dir: str, log=print) -> str:
    """Return the URI of a prepared dataset for these inputs, preparing it into the cache if needed."""
    uri = cached_dataset_uri(source, tokenizer, bpe_vocab_size, val_fraction, chunk_tokens, cache_dir)
    if not resolve(uri).join(MANIFEST_FILE).exists():
        log(f"preparing {source} into the dataset cache {uri}")
        prepare_text_dataset(source, uri, tokenizer=tokenizer, val_fraction=val_fraction,
                             bpe_vocab_size=bpe_vocab_size, chunk_tokens=chunk_tokens, overwrite=True, log=log)
    return uri
