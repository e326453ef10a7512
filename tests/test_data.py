"""Text preparation: tokenizers, parquet shards, the manifest, and per-worker windows."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from genai.data.batches import WindowStream, cut_windows, epoch_offset, windows_per_row
from genai.data.sources import SourceError, read_corpus
from genai.data.text_dataset import (
    DatasetError, load_manifest, load_tokenizer, prepare_text_dataset, verify_shards,
)
from genai.data.tokenizers import BPETokenizer, CharTokenizer, tokenizer_from_json

QUIET = dict(log=lambda *_: None)


def test_char_tokenizer_matches_nanogpt_and_round_trips():
    text = "hello world\nROMEO: o!"
    tok = CharTokenizer.train(text)
    assert tok.chars == sorted(set(text))  # nanoGPT: stoi = {ch: i for i, ch in enumerate(sorted(set(data)))}
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    again = tokenizer_from_json(tok.to_json())
    assert np.array_equal(again.encode(text), ids)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tok.encode("Z")


def test_bpe_tokenizer_compresses_and_round_trips(corpus_file):
    text = corpus_file.read_text()[:200_000]
    tok = BPETokenizer.train([text], vocab_size=512)
    assert tok.vocab_size == 512
    ids = tok.encode(text[:5000])
    assert tok.decode(ids) == text[:5000]
    assert len(ids) < 0.6 * 5000  # merges shorten the sequence
    assert tokenizer_from_json(tok.to_json()).decode(ids) == text[:5000]


def test_builtin_corpora_work_offline():
    plays = read_corpus("builtin:shakespeare")
    assert len(plays) > 4_000_000 and "ROMEO:" in plays and "**" not in plays
    assert "def" in read_corpus("builtin:pydoc")
    with pytest.raises(SourceError, match="unknown builtin"):
        read_corpus("builtin:nope")


def test_prepare_writes_shards_and_manifest(corpus_file, tmp_path):
    out = tmp_path / "ds"
    m = prepare_text_dataset(str(corpus_file), str(out), chunk_tokens=1000, shard_tokens=300_000, **QUIET)
    raw = json.loads((out / "manifest.json").read_text())
    text = corpus_file.read_text()
    # nanoGPT's char vocabulary: every distinct character (65 for tiny Shakespeare, 73 for the builtin plays).
    assert raw["format_version"] == 1 and raw["tokenizer"]["kind"] == "char" and raw["vocab_size"] == len(set(text))
    assert m.splits["train"].tokens + m.splits["val"].tokens == len(text)
    assert m.splits["val"].tokens == int(len(text) * 0.1)
    assert len(m.splits["train"].shards) == 4  # 300 rows of 1000 tokens per shard
    # The shards hold exactly the tokenized corpus, in order.
    tok = load_tokenizer(str(out))
    rows = [r for s in m.splits["train"].shards for r in pq.read_table(out / s["path"])["tokens"].to_pylist()]
    assert all(len(r) == 1000 for r in rows[:-1])
    assert tok.decode(np.concatenate(rows)) == text[: m.splits["train"].tokens]
    verify_shards(m)


def test_prepare_refuses_to_overwrite_and_rejects_bad_input(corpus_file, tmp_path):
    out = str(tmp_path / "ds")
    prepare_text_dataset(str(corpus_file), out, **QUIET)
    with pytest.raises(DatasetError, match="already holds a prepared dataset"):
        prepare_text_dataset(str(corpus_file), out, **QUIET)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SourceError, match="corpus is empty"):
        prepare_text_dataset(str(empty), str(tmp_path / "x"), **QUIET)
    with pytest.raises(SourceError, match="no such file"):
        prepare_text_dataset(str(tmp_path / "missing.txt"), str(tmp_path / "y"), **QUIET)


def test_half_written_dataset_is_not_mistaken_for_whole(corpus_file, tmp_path):
    out = tmp_path / "ds"
    prepare_text_dataset(str(corpus_file), str(out), **QUIET)
    (out / "manifest.json").unlink()  # as if preparation died before its last write
    with pytest.raises(DatasetError, match="no manifest.json"):
        load_manifest(str(out))


def test_corrupt_and_missing_shards_are_named(corpus_file, tmp_path):
    out = tmp_path / "ds"
    m = prepare_text_dataset(str(corpus_file), str(out), **QUIET)
    shard = out / m.splits["train"].shards[0]["path"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="part-00000.parquet: shard is corrupt"):
        verify_shards(m)
    shard.unlink()
    with pytest.raises(DatasetError, match="part-00000.parquet: shard listed in the manifest is missing"):
        verify_shards(m)


def test_windows_are_inputs_and_shifted_targets():
    row = np.arange(100)
    w = cut_windows(row, seq_len=10, offset=3)
    assert len(w) == windows_per_row(100, 10, 3) == 9
    assert np.array_equal(w[0], np.arange(3, 14)) and np.array_equal(w[1], np.arange(13, 24))
    assert windows_per_row(5, 10, 0) == 0


def _rows(n, length=64):
    return [{"tokens": [np.arange(i * length, (i + 1) * length) for i in range(j, j + 4)]} for j in range(0, n, 4)]


def test_window_stream_is_reproducible_and_resumable():
    def batches(epoch, rank=0):
        return [b.copy() for b in WindowStream(_rows(40), 8, 4, seed=1, epoch=epoch, rank=rank, shuffle_buffer=50)]

    a, b = batches(0), batches(0)
    assert len(a) > 10 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, batches(1)))
    # Every window appears once per epoch: no window repeated or skipped.
    starts = np.concatenate([x[:, 0] for x in a])
    assert len(set(starts.tolist())) == len(starts)
    assert epoch_offset(1, 0, 8) == epoch_offset(1, 0, 8)
    # Resuming after k batches (skipping them) yields exactly the rest of the epoch.
    it = iter(WindowStream(_rows(40), 8, 4, seed=1, epoch=0, rank=0, shuffle_buffer=50))
    for _ in range(5):
        next(it)
    assert all(np.array_equal(x, y) for x, y in zip(list(it), a[5:]))


def test_validation_windows_are_each_workers_own_rows_and_the_same_every_time(char_dataset):
    from genai.data.text_dataset import load_manifest
    from genai.train.nlg import _val_batches

    uris = load_manifest(char_dataset).shard_uris("val")
    rank0, rank1 = (_val_batches(uris, 32, 4, 3, 1337, rank, 2) for rank in (0, 1))
    assert len(rank0) == len(rank1) == 3 and all(b.shape == (4, 33) for b in rank0 + rank1)
    again = _val_batches(uris, 32, 4, 3, 1337, 0, 2)
    assert all((a == b).all() for a, b in zip(rank0, again))  # the same windows at every evaluation
    windows = [{w.tobytes() for b in batches for w in b} for batches in (rank0, rank1)]
    assert not windows[0] & windows[1]  # every world-th row: the workers evaluate different text
    alone = _val_batches(uris, 32, 4, 100_000, 1337, 0, 1)  # asks for more than there is: the whole split
    assert windows[0] | windows[1] <= {w.tobytes() for b in alone for w in b}
