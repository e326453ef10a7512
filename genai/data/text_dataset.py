"""Tokenized text datasets as sharded parquet plus a manifest.

Layout under the output URI:
    tokenizer.json
    train/part-00000.parquet ...   rows: chunk_id (int64), tokens (list<uint16|int32>)
    val/part-00000.parquet ...
    manifest.json                  written last: its presence means the dataset is whole

Each row is a contiguous chunk of `chunk_tokens` tokens of the corpus (the last row of a split
may be shorter); training joins each worker's rows into one stream and cuts windows from it, so one
dataset serves any sequence length.

Preparation streams: the corpus is read part by part (a file or a parquet row group, genai/data/sources.py),
tokenized in batches, an end-of-text token between documents, and the shards are written as they fill, so
memory does not grow with the corpus. The parts are tokenized by a `MapParts` function: in this process, in
order (`map_in_process`, what tests and the dataset cache use), or by a parallel mapper that yields the same
outputs in the same order (the job's Ray Data path, cluster/parallel.py); the dataset is the same either way.
The validation split is the last `val_fraction` of the token stream, as in nanoGPT: the stream is written
whole as train shards, and at the end the shards holding its tail are read back and rewritten as val/.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.storage import Location, resolve
from genai.data.hf_tokenizer import tokenizer_from_hf_folder
from genai.data.shards import (  # noqa: F401  (DatasetError, CHECKSUM_LIMIT_BYTES: public names of this module)
    CHECKSUM_LIMIT_BYTES, FORMAT_VERSION, MANIFEST_FILE, DatasetError, clear_output, output_location, read_manifest,
    write_manifest, write_shard,
)
from genai.data.shards import verify_shards as _verify_shards
from genai.data.sources import (Corpus, CorpusPart, SourceError, describe_skipped, iter_part, iter_sample,
                                 plan_corpus)
from genai.data.tokenizers import TOKENIZER_FILE, BPETokenizer, CharTokenizer, Tokenizer, tokenizer_from_json

DATASET_KIND = "text-tokens"
# Part of the dataset cache's key: 2 = documents joined by an end-of-text token (folders of files, records).
PREPARATION = 2

# (parts as dicts, a worker class, its constructor's keyword arguments) -> the worker's output tables, in part order
MapParts = Callable[[list[dict], type, dict], Iterator[pa.Table]]


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
    eot_id: int | None = None  # the end-of-text token between documents (None: a one-document char corpus)

    def shard_uris(self, split: str) -> list[str]:
        base = resolve(self.uri)
        return [base.join(s["path"]).uri for s in self.splits[split].shards]

    def min_tokens_per_worker(self, split: str, world_size: int) -> int:
        """Tokens every worker is guaranteed when each gets at least rows // world_size of the split's rows
        (Ray Data's equal split gives exactly that many, every world-th row at least that many): all of them
        full-length except, possibly, the split's short last row."""
        info = self.splits[split]
        per_worker = info.rows // world_size
        if per_worker == 0:
            return 0
        return per_worker * self.chunk_tokens - (self.chunk_tokens - info.last_row_tokens)


def _token_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= np.iinfo(np.uint16).max + 1 else pa.int32()


class TokenShardWriter:
    """Writes one split's token stream as parquet shards of whole chunks, with checksums, as the stream arrives:
    `append` tokens and a shard is written each time `shard_tokens` of them have gathered (so at most one shard is
    held); `close` writes the rest, whose last row may be short. `first_shard` and `first_row` continue a split
    whose earlier shards are already written."""

    def __init__(self, base: Location, split: str, vocab_size: int, chunk_tokens: int, shard_tokens: int,
                 first_shard: int = 0, first_row: int = 0):
        self.base, self.split = base, split
        self.type = _token_type(vocab_size)
        self.chunk_tokens = chunk_tokens
        self.rows_per_shard = max(1, shard_tokens // chunk_tokens)
        self.shards: list[dict] = []
        self.tokens = 0
        self._next_shard, self._next_row = first_shard, first_row
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def append(self, tokens: np.ndarray) -> None:
        """Add tokens to the end of the split; writes every shard that is now full."""
        if not len(tokens):
            return
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        self.tokens += len(tokens)
        full = self.rows_per_shard * self.chunk_tokens
        if self._pending_tokens < full:
            return
        stream = np.concatenate(self._pending)
        whole = len(stream) // full * full
        for start in range(0, whole, full):
            self._flush(stream[start:start + full])
        self._pending = [stream[whole:]] if whole < len(stream) else []
        self._pending_tokens = len(stream) - whole

    def close(self) -> SplitInfo:
        """Write what is left; the split as this writer wrote it (all of it unless continued)."""
        if self._pending_tokens:
            self._flush(np.concatenate(self._pending))
            self._pending, self._pending_tokens = [], 0
        rows = -(-self.tokens // self.chunk_tokens)
        last = self.tokens - (rows - 1) * self.chunk_tokens if rows else 0
        return SplitInfo(tokens=self.tokens, rows=rows, last_row_tokens=last, shards=self.shards)

    def write(self, tokens: np.ndarray) -> SplitInfo:
        """A whole split at once."""
        self.append(tokens)
        return self.close()

    def _flush(self, tokens: np.ndarray) -> None:
        n = len(tokens)
        rows = -(-n // self.chunk_tokens)
        offsets = np.minimum(np.arange(rows + 1, dtype=np.int64) * self.chunk_tokens, n).astype(np.int32)
        values = pa.array(tokens.astype(self.type.to_pandas_dtype()), type=self.type)
        table = pa.table({
            "chunk_id": pa.array(np.arange(self._next_row, self._next_row + rows, dtype=np.int64)),
            "tokens": pa.ListArray.from_arrays(pa.array(offsets), values),
        })
        entry = write_shard(self.base, f"{self.split}/part-{self._next_shard:05d}.parquet", table, row_group_size=64)
        self.shards.append({"path": entry["path"], "rows": entry["rows"], "tokens": n,
                            "bytes": entry["bytes"], "sha256": entry["sha256"]})
        self._next_shard += 1
        self._next_row += rows


def _shard_tokens(loc: Location) -> np.ndarray:
    """The token stream of one written shard."""
    table = pq.read_table(pa.BufferReader(loc.read_bytes()), columns=["tokens"])
    return pc.list_flatten(table.column("tokens")).to_numpy(zero_copy_only=False)


def split_off_tail(out: Location, train: SplitInfo, n_val: int, vocab_size: int, chunk_tokens: int,
                   shard_tokens: int) -> tuple[SplitInfo, SplitInfo]:
    """Move the last `n_val` tokens of a stream written as train shards into the val split: the shards before the
    boundary stay, the one holding it is rewritten shorter, the rest are read back one at a time into val/. The
    result is what writing the two splits separately would have written, byte for byte."""
    boundary = train.tokens - n_val
    starts = np.cumsum([0] + [s["tokens"] for s in train.shards])
    k = int(np.searchsorted(starts, boundary, side="right")) - 1
    kept = train.shards[:k]
    head = TokenShardWriter(out, "train", vocab_size, chunk_tokens, shard_tokens, first_shard=k,
                            first_row=sum(s["rows"] for s in kept))
    val = TokenShardWriter(out, "val", vocab_size, chunk_tokens, shard_tokens)
    for j in range(k, len(train.shards)):
        loc = out.join(train.shards[j]["path"])
        tokens = _shard_tokens(loc)
        loc.delete()
        cut = boundary - int(starts[j]) if j == k else 0
        head.append(tokens[:cut])
        val.append(tokens[cut:])
    head.close()
    rows = -(-boundary // chunk_tokens)
    train_info = SplitInfo(tokens=boundary, rows=rows, last_row_tokens=boundary - (rows - 1) * chunk_tokens,
                           shards=kept + head.shards)
    return train_info, val.close()


# --- preparation ---------------------------------------------------------------------------------------------------


class PartTokenizer:
    """Tokenizes corpus parts: called with a table of parts (CorpusPart's fields and `index`), it yields, for about
    every `batch_chars` characters of a part's text, a one-row table of the part's index, its documents started,
    characters and tokens, with the end-of-text token before every document. A Ray Data `map_batches` callable
    class, and what the single-process path calls part after part."""

    def __init__(self, tokenizer_json: str, text_column: str, batch_chars: int = 1 << 20):
        self.tok = tokenizer_from_json(tokenizer_json)
        self.text_column = text_column
        self.batch_chars = batch_chars
        self.eot = None if self.tok.eot_id is None else np.array([self.tok.eot_id], dtype=np.int32)

    def __call__(self, parts: pa.Table) -> Iterator[pa.Table]:
        for row in parts.to_pylist():
            index = row.pop("index")
            texts, starts, size = [], [], 0
            for piece, starts_document in iter_part(CorpusPart(**row), self.text_column):
                texts.append(piece)
                starts.append(starts_document)
                size += len(piece)
                if size >= self.batch_chars:
                    yield self._encode(index, texts, starts, size)
                    texts, starts, size = [], [], 0
            if texts:
                yield self._encode(index, texts, starts, size)

    def _encode(self, index: int, texts: list[str], starts: list[bool], size: int) -> pa.Table:
        ids = self.tok.encode_batch(texts)
        if self.eot is not None:
            ids = [a for piece, first in zip(ids, starts) for a in ((self.eot, piece) if first else (piece,))]
        tokens = np.concatenate(ids)
        return pa.table({"part": [index], "documents": [sum(starts)], "chars": [size],
                         "tokens": pa.ListArray.from_arrays(pa.array([0, len(tokens)], pa.int32()), pa.array(tokens))})


class PartCharset:
    """The characters and documents of corpus parts (the character tokenizer's vocabulary pass): one row per part."""

    def __init__(self, text_column: str):
        self.text_column = text_column

    def __call__(self, parts: pa.Table) -> Iterator[pa.Table]:
        for row in parts.to_pylist():
            index = row.pop("index")
            chars: set[str] = set()
            documents = 0
            for piece, starts_document in iter_part(CorpusPart(**row), self.text_column):
                chars.update(piece)
                documents += starts_document
            yield pa.table({"part": [index], "chars": ["".join(sorted(chars))], "documents": [documents]})


def map_in_process(parts: list[dict], worker_class: type, kwargs: dict) -> Iterator[pa.Table]:
    """The single-process MapParts: the same worker, called on each part in order, in this process."""
    worker = worker_class(**kwargs)
    for part in parts:
        yield from worker(pa.Table.from_pylist([part]))


@dataclass
class TextPreparation:
    """A checked preparation, ready to run: the corpus listed, the options valid, the output writable."""

    corpus: Corpus
    out: Location
    tokenizer: str
    val_fraction: float
    bpe_vocab_size: int
    bpe_sample_chars: int
    chunk_tokens: int
    shard_tokens: int
    pretrained: Tokenizer | None = None  # the tokenizer of the Hugging Face folder `tokenizer` names

    def parts(self) -> list[dict]:
        return [{"index": i, **p} for i, p in enumerate(self.corpus.part_dicts())]


def plan_text_preparation(source: str, out_uri: str, tokenizer: str = "char", val_fraction: float = 0.1,
                          bpe_vocab_size: int = 4096, chunk_tokens: int = 1024, shard_tokens: int = 8 * 1024 * 1024,
                          overwrite: bool = False, text_column: str = "text",
                          bpe_sample_mb: float = 256) -> TextPreparation:
    """Check everything that can be checked before heavy work (options, output, the corpus's listing and the start
    of its files). `tokenizer` is char, bpe, or the folder or URI of a Hugging Face model or tokenizer, whose
    tokenizer.json tokenizes the corpus. Raises DatasetError or SourceError naming the option, URI or file."""
    pretrained = None if tokenizer in ("char", "bpe") else tokenizer_from_hf_folder(tokenizer)
    if not 0.0 < val_fraction < 0.5:
        raise DatasetError(f"--val-fraction {val_fraction}: must be between 0 and 0.5")
    if chunk_tokens < 8:
        raise DatasetError(f"--chunk-tokens {chunk_tokens}: must be at least 8")
    if shard_tokens < 1:
        raise DatasetError(f"--shard-tokens {shard_tokens}: must be at least 1")
    if bpe_sample_mb <= 0:
        raise DatasetError(f"--bpe-sample-mb {bpe_sample_mb}: must be positive")
    if not text_column:
        raise DatasetError("--text-column: must not be empty")
    out = output_location(out_uri, overwrite)
    corpus = plan_corpus(source, text_column)
    return TextPreparation(corpus, out, tokenizer, val_fraction, bpe_vocab_size, int(bpe_sample_mb * 1e6),
                           chunk_tokens, shard_tokens, pretrained)


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
    text_column: str = "text",
    bpe_sample_mb: float = 256,
    map_parts: MapParts = map_in_process,
) -> TextManifest:
    """Read a corpus, train a tokenizer, write train/val parquet shards and the manifest (last)."""
    prep = plan_text_preparation(source, out_uri, tokenizer, val_fraction, bpe_vocab_size, chunk_tokens, shard_tokens,
                                 overwrite, text_column, bpe_sample_mb)
    return run_text_preparation(prep, map_parts, log=log)


def run_text_preparation(prep: TextPreparation, map_parts: MapParts = map_in_process, log=print,
                         progress_s: float = 10.0) -> TextManifest:
    """Train the tokenizer, stream the corpus through it into train shards, split off val, write the manifest."""
    t0 = time.time()
    corpus, out = prep.corpus, prep.out
    log(f"corpus {corpus.source}: {corpus.files:,} file(s), {len(corpus.parts):,} part(s)"
        + (f", {corpus.bytes / 1e6:,.1f} MB" if corpus.bytes else "")
        + (f"; skipped {describe_skipped(corpus.skipped)} (kinds this does not read)" if corpus.skipped else ""))
    tok = _train_tokenizer(prep, map_parts, log)

    # Clear a half-written earlier attempt (no manifest) or an overwritten dataset.
    clear_output(out, ("train", "val", TOKENIZER_FILE))
    tok_json = tok.to_json()
    tok_bytes = tok_json.encode()
    out.join(TOKENIZER_FILE).write_bytes(tok_bytes)
    t_stream = time.time()
    writer = TokenShardWriter(out, "train", tok.vocab_size, prep.chunk_tokens, prep.shard_tokens)
    outputs = map_parts(prep.parts(), PartTokenizer, {"tokenizer_json": tok_json, "text_column": corpus.text_column})
    documents = _write_stream(outputs, writer, tok.eot_id is not None, _Progress(log, len(corpus.parts), progress_s))
    stream = writer.close()
    stream_s = time.time() - t_stream
    n_val = max(1, int(stream.tokens * prep.val_fraction))
    if stream.tokens - n_val < 2 or n_val < 2:
        clear_output(out, ("train", "val", TOKENIZER_FILE))
        raise DatasetError(f"{corpus.source}: corpus too small ({stream.tokens} tokens) to split into train and val")
    train, val = split_off_tail(out, stream, n_val, tok.vocab_size, prep.chunk_tokens, prep.shard_tokens)
    splits = {"train": train, "val": val}
    write_manifest(out, DATASET_KIND, corpus.source, splits,
                   tokenizer={"kind": tok.kind, "vocab_size": tok.vocab_size, "file": TOKENIZER_FILE,
                              "sha256": hashlib.sha256(tok_bytes).hexdigest(), "eot_id": tok.eot_id},
                   vocab_size=tok.vocab_size, chunk_tokens=prep.chunk_tokens,
                   token_dtype=str(_token_type(tok.vocab_size)),
                   corpus={"files": corpus.files, "parts": len(corpus.parts), "bytes": corpus.bytes,
                           "documents": documents, "text_column": corpus.text_column, "skipped": corpus.skipped})
    log(f"wrote {out.uri}: train {train.tokens:,} tokens in {len(train.shards)} shard(s), "
        f"val {val.tokens:,} tokens, {documents:,} document(s) ({time.time() - t0:.1f}s; tokenized and written at "
        f"{stream.tokens / max(stream_s, 1e-9):,.0f} tokens/s)")
    return load_manifest(out.uri)


def _train_tokenizer(prep: TextPreparation, map_parts: MapParts, log) -> Tokenizer:
    """The character vocabulary from a pass over the whole corpus, BPE trained on a bounded sample of it, or the
    pretrained tokenizer. Raises SourceError when the corpus holds no text."""
    corpus = prep.corpus
    if prep.pretrained is not None:
        tok = prep.pretrained
    elif prep.tokenizer == "char":
        chars: set[str] = set()
        documents = 0
        for table in map_parts(prep.parts(), PartCharset, {"text_column": corpus.text_column}):
            for text in table.column("chars").to_pylist():
                chars.update(text)
            documents += pc.sum(table.column("documents")).as_py() or 0
        if not any(not c.isspace() for c in chars):
            raise SourceError(f"{corpus.source}: corpus is empty")
        tok: Tokenizer = CharTokenizer(sorted(chars), eot=documents > 1)
    else:
        t0 = time.time()
        sample = _SampleText(iter_sample(corpus, prep.bpe_sample_chars))
        tok = BPETokenizer.train(sample, prep.bpe_vocab_size)
        if not sample.has_text:
            raise SourceError(f"{corpus.source}: corpus is empty")
        log(f"trained BPE on a sample of {sample.chars / 1e6:,.1f}M characters ({time.time() - t0:.1f}s)")
    log(f"{tok.kind} tokenizer: vocab {tok.vocab_size}"
        + (f", end-of-text id {tok.eot_id} between documents" if tok.eot_id is not None else ", one document"))
    return tok


class _SampleText:
    """An iterator over the sample's pieces that notes their size and whether any holds more than whitespace."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.chars, self.has_text = 0, False

    def __iter__(self):
        for piece in self._pieces:
            self.chars += len(piece)
            self.has_text = self.has_text or not piece.isspace()
            yield piece


class _Progress:
    """A line every `interval_s` seconds: tokens so far, tokens/s, documents, parts done, shards written."""

    def __init__(self, log, parts: int, interval_s: float):
        self.log, self.parts, self.interval_s = log, parts, interval_s
        self.t0 = self.last = time.time()

    def update(self, tokens: int, documents: int, part: int, shards: int) -> None:
        now = time.time()
        if now - self.last >= self.interval_s:
            self.last = now
            self.log(f"tokenized {tokens:,} tokens ({tokens / (now - self.t0):,.0f} tokens/s), {documents:,} documents,"
                     f" part {part + 1:,}/{self.parts:,}, {shards} shard(s) written")


def _write_stream(outputs: Iterator[pa.Table], writer: TokenShardWriter, starts_with_eot: bool,
                  progress: _Progress) -> int:
    """Append the tokenizers' outputs, in order, to the writer; the end-of-text token before the first document is
    dropped, so that one sits between every two documents. Returns the number of documents."""
    documents = 0
    for table in outputs:
        tokens = pc.list_flatten(table.column("tokens")).to_numpy(zero_copy_only=False)
        if starts_with_eot and len(tokens):
            tokens, starts_with_eot = tokens[1:], False
        writer.append(tokens)
        documents += pc.sum(table.column("documents")).as_py() or 0
        progress.update(writer.tokens, documents, pc.max(table.column("part")).as_py(), len(writer.shards))
    return documents


def load_manifest(uri: str) -> TextManifest:
    """Read and check a dataset's manifest. Raises DatasetError naming the URI."""
    raw = read_manifest(uri, DATASET_KIND)
    loc = resolve(uri)
    splits = {k: SplitInfo(**v) for k, v in raw["splits"].items()}
    return TextManifest(uri=loc.uri, vocab_size=raw["vocab_size"], tokenizer_kind=raw["tokenizer"]["kind"],
                        chunk_tokens=raw["chunk_tokens"], splits=splits, raw=raw, eot_id=raw["tokenizer"].get("eot_id"))


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
    key = json.dumps([FORMAT_VERSION, PREPARATION, source, tokenizer, bpe_vocab_size if tokenizer == "bpe" else 0,
                      val_fraction, chunk_tokens])
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
