"""Text preparation: tokenizers, parquet shards, the manifest, and per-worker windows."""

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from genai.data.batches import WindowStream, cut_windows, epoch_offset, window_count
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
    w, rest = cut_windows(np.arange(3, 100), seq_len=10)
    assert len(w) == window_count(100, 10, 3) == 9
    assert np.array_equal(w[0], np.arange(3, 14)) and np.array_equal(w[1], np.arange(13, 24))
    assert np.array_equal(rest, np.arange(93, 100))  # the next window starts at the last one's final target
    assert window_count(5, 10, 0) == 0


def _rows(n, length=64):
    return [{"tokens": [np.arange(i * length, (i + 1) * length) for i in range(j, j + 4)]} for j in range(0, n, 4)]


def test_window_stream_is_reproducible_and_resumable():
    def batches(epoch, rank=0):
        return [b.copy() for b in WindowStream(_rows(40), 8, 4, seed=1, epoch=epoch, rank=rank, shuffle_tokens=400)]

    a, b = batches(0), batches(0)
    assert len(a) > 10 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, batches(1)))
    # Every window appears once per epoch: no window repeated or skipped.
    starts = np.concatenate([x[:, 0] for x in a])
    assert len(set(starts.tolist())) == len(starts)
    assert epoch_offset(1, 0, 8) == epoch_offset(1, 0, 8)
    # Resuming after k batches (skipping them) yields exactly the rest of the epoch.
    it = iter(WindowStream(_rows(40), 8, 4, seed=1, epoch=0, rank=0, shuffle_tokens=400))
    for _ in range(5):
        next(it)
    assert all(np.array_equal(x, y) for x, y in zip(list(it), a[5:]))


def test_validation_windows_are_each_workers_own_rows_and_the_same_every_time(char_dataset):
    from genai.data.batches import tokens_of
    from genai.data.text_dataset import load_manifest, worker_rows
    from genai.train.nlg import _val_batches

    m = load_manifest(char_dataset)
    uris = m.shard_uris("val")
    rank0, rank1 = (_val_batches(uris, 32, 4, 3, 1337, rank, 2) for rank in (0, 1))
    assert len(rank0) == len(rank1) == 3 and all(b.shape == (4, 33) for b in rank0 + rank1)
    again = _val_batches(uris, 32, 4, 3, 1337, 0, 2)
    assert all((a == b).all() for a, b in zip(rank0, again))  # the same windows at every evaluation
    windows = [{w.tobytes() for b in batches for w in b} for batches in (rank0, rank1)]
    assert not windows[0] & windows[1]  # every world-th row: the workers evaluate different text
    # In order from the worker's first token: its rows (every world-th) joined into one stream.
    mine = np.concatenate([tokens_of(b) for b in worker_rows(uris, 0, 2)])
    assert all(np.array_equal(w, mine[32 * k:32 * k + 33]) for k, w in enumerate(np.concatenate(rank0)))
    alone = _val_batches(uris, 32, 4, 100_000, 1337, 0, 1)  # asks for more than there is: the whole split
    assert len(alone) == window_count(m.splits["val"].tokens, 32, 0) // 4


# --- Corpora of many documents: files, folders and records, streamed -------------------------------------------

DOCS = ["First document.\nIt has two lines.\n", "# A markdown title\n\nand a paragraph.\n", "json one", "json two",
        "gzipped json", "parquet row one", "parquet row three"]


def write_mixed_folder(root):
    """A folder of every kind the preparation reads, plus files it skips; DOCS in reading (sorted path) order."""
    import gzip

    import pyarrow as pa

    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(DOCS[0])
    (root / "b").mkdir(exist_ok=True)
    (root / "b" / "c.md").write_text(DOCS[1])
    lines = [json.dumps({"text": DOCS[2], "id": 1}), "", json.dumps({"text": DOCS[3]})]  # a blank line is no document
    (root / "d.jsonl").write_text("\n".join(lines) + "\n")
    (root / "e.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": DOCS[4]}) + "\n").encode()))
    # Two row groups, and a null text (left out, as an empty document is).
    pq.write_table(pa.table({"text": [DOCS[5], None, DOCS[6]]}), root / "f.parquet", row_group_size=2)
    (root / "notes.csv").write_text("a,b\n")  # skipped and counted
    (root / "_SUCCESS").write_text("")  # tools' bookkeeping: skipped silently
    return root


def split_tokens(m, split):
    import pyarrow.compute as pc

    tables = [pq.read_table(f"{m.uri}/{s['path']}") for s in m.splits[split].shards]
    return np.concatenate([pc.list_flatten(t["tokens"]).to_numpy() for t in tables])


def stream_of(m):
    """The whole token stream of a dataset: train, then val (the last val_fraction of it)."""
    return np.concatenate([split_tokens(m, "train"), split_tokens(m, "val")])


def test_every_kind_of_file_in_a_folder_is_read_as_documents_in_path_order(tmp_path):
    folder = write_mixed_folder(tmp_path / "corpus")
    m = prepare_text_dataset(str(folder), str(tmp_path / "ds"), chunk_tokens=8, val_fraction=0.2, **QUIET)
    tok = load_tokenizer(str(tmp_path / "ds"))
    # The char tokenizer reserves the id after its characters for the end-of-text token of a many-document corpus.
    assert m.eot_id == tok.eot_id == tok.vocab_size - 1 == len(set("".join(DOCS)))
    assert tok.decode(stream_of(m)) == "<|endoftext|>".join(DOCS)  # between documents, not before or after
    corpus = m.raw["corpus"]
    assert corpus["documents"] == len(DOCS) and corpus["files"] == 5 and corpus["parts"] == 6  # parquet: 2 row groups
    assert corpus["skipped"] == {".csv": 1}


@pytest.mark.parametrize("name, content", [
    ("doc.txt", DOCS[0]), ("doc.md", DOCS[1]),
    ("doc.jsonl", "\n".join(json.dumps({"body": d}) for d in DOCS) + "\n"),
])
def test_a_single_file_of_each_kind(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    m = prepare_text_dataset(str(path), str(tmp_path / "ds"), chunk_tokens=8, text_column="body", **QUIET)
    tok = load_tokenizer(str(tmp_path / "ds"))
    expected = content if name.endswith((".txt", ".md")) else "<|endoftext|>".join(DOCS)
    assert tok.decode(stream_of(m)) == expected
    assert m.eot_id is (None if name.endswith((".txt", ".md")) else tok.vocab_size - 1)


def test_one_document_keeps_nanogpts_vocabulary_and_its_tokenizer_file(corpus_file, tmp_path):
    m = prepare_text_dataset(str(corpus_file), str(tmp_path / "ds"), **QUIET)
    assert m.eot_id is None and m.vocab_size == len(set(corpus_file.read_text()))
    assert json.loads((tmp_path / "ds" / "tokenizer.json").read_text()) == {
        "kind": "char", "chars": sorted(set(corpus_file.read_text()))}


def test_bpe_puts_its_end_of_text_token_between_documents_and_encodes_each_whole(tmp_path):
    docs = [f"Document {i}: " + " ".join(f"word{i * j % 97}" for j in range(50 + i)) for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    m = prepare_text_dataset(str(tmp_path / "docs.jsonl"), str(tmp_path / "ds"), tokenizer="bpe", bpe_vocab_size=400,
                             chunk_tokens=64, **QUIET)
    tok = load_tokenizer(str(tmp_path / "ds"))
    assert m.eot_id == tok.eot_id == 0 and m.raw["tokenizer"]["eot_id"] == 0
    stream = stream_of(m)
    bounds = np.flatnonzero(stream == tok.eot_id)
    assert len(bounds) == len(docs) - 1
    pieces = np.split(stream, bounds)
    assert [tok.decode(p[1:] if i else p) for i, p in enumerate(pieces)] == docs
    assert all(np.array_equal(p[1:] if i else p, tok.encode(d)) for i, (p, d) in enumerate(zip(pieces, docs)))


def test_a_long_document_is_streamed_in_pieces_that_encode_as_the_whole(corpus_file, tmp_path):
    from genai.data.sources import PIECE_CHARS, CorpusPart, cut_point, iter_part

    text = corpus_file.read_text()
    assert len(text) > PIECE_CHARS  # tiny Shakespeare is read in two pieces
    pieces = list(iter_part(CorpusPart(str(corpus_file), "text"), piece_chars=100_000))
    assert len(pieces) > 10 and "".join(p for p, _ in pieces) == text
    assert [first for _, first in pieces] == [True] + [False] * (len(pieces) - 1)
    # Pieces end before a whitespace after a non-whitespace: BPE's pre-tokenizer never joins the two.
    tok = BPETokenizer.train([text], vocab_size=512)
    assert np.array_equal(np.concatenate(tok.encode_batch([p for p, _ in pieces])), tok.encode(text))
    assert cut_point("no-space-anywhere") == len("no-space-anywhere") and cut_point("ab cd") == 2


def test_crlf_and_utf8_across_read_blocks_are_decoded_as_python_reads_text(tmp_path):
    from genai.data.sources import READ_BYTES, CorpusPart, iter_part

    text = "x" * (READ_BYTES - 1) + "\r\n" + "é" * 10 + "\r\n" + "y" * (READ_BYTES - 3) + "ü end\r\n"
    path = tmp_path / "crlf.txt"
    path.write_bytes(text.encode())
    assert "".join(p for p, _ in iter_part(CorpusPart(str(path), "text"))) == path.read_text()


def test_shards_are_written_as_the_stream_arrives_not_at_the_end(tmp_path):
    from genai.data.text_dataset import TokenShardWriter

    from cluster.storage import resolve

    writer = TokenShardWriter(resolve(str(tmp_path)), "train", 100, chunk_tokens=10, shard_tokens=1000)
    flushed_before_end = []
    held = []
    for i in range(50):  # 50 x 333 tokens from a generator, never all in memory
        writer.append(np.full(333, i % 100, dtype=np.int32))
        flushed_before_end.append(len(writer.shards))
        held.append(writer._pending_tokens)
    assert flushed_before_end[2] == 0 and flushed_before_end[3] == 1 and flushed_before_end[-1] == 16
    assert max(held) < 1000  # at most one shard waits in memory
    info = writer.close()
    assert info.tokens == 50 * 333 and info.rows == 1665 and info.last_row_tokens == 10 and len(info.shards) == 17
    assert sum(s["tokens"] for s in info.shards) == info.tokens


def test_preparation_writes_shards_while_it_reads(tmp_path):
    from genai.data.text_dataset import map_in_process

    (tmp_path / "corpus").mkdir()
    for i in range(8):
        (tmp_path / "corpus" / f"{i:02d}.txt").write_text(f"file {i} " + "abcdefgh " * 20_000)
    out = tmp_path / "ds"
    seen = []

    def watching(parts, worker_class, kwargs):
        """map_in_process, noting after each output how many train shards are on disk already."""
        for table in map_in_process(parts, worker_class, kwargs):
            if worker_class.__name__ == "PartTokenizer":
                seen.append(len(list((out / "train").glob("*.parquet"))))
            yield table

    m = prepare_text_dataset(str(tmp_path / "corpus"), str(out), chunk_tokens=1000, shard_tokens=100_000,
                             map_parts=watching, **QUIET)
    assert len(seen) >= 8 and 0 < seen[len(seen) // 2] < seen[-1]  # shards appear while the corpus is being read
    chars = sum(len((tmp_path / "corpus" / f"{i:02d}.txt").read_text()) for i in range(8))
    assert m.splits["train"].tokens + m.splits["val"].tokens == chars + 7  # and an end-of-text token between files


def test_the_val_split_is_the_streams_tail_as_two_separate_writes_give(tmp_path):
    from genai.data.text_dataset import TokenShardWriter, split_off_tail

    from cluster.storage import resolve

    tokens = np.random.default_rng(0).integers(0, 300, 12_345).astype(np.int32)
    for n_val in (1234, 2000, 12_000):  # inside a shard, on a shard boundary, most of the stream
        a, b = resolve(str(tmp_path / f"a{n_val}")), resolve(str(tmp_path / f"b{n_val}"))
        streamed = TokenShardWriter(a, "train", 300, 100, 1000)
        for piece in np.array_split(tokens, 37):
            streamed.append(piece)
        train, val = split_off_tail(a, streamed.close(), n_val, 300, 100, 1000)
        separate = [TokenShardWriter(b, split, 300, 100, 1000).write(part)
                    for split, part in (("train", tokens[:-n_val]), ("val", tokens[-n_val:]))]
        assert (vars(train), vars(val)) == (vars(separate[0]), vars(separate[1]))
        assert sorted(p.name for p in (tmp_path / f"a{n_val}" / "train").iterdir()) == \
            sorted(p.name for p in (tmp_path / f"b{n_val}" / "train").iterdir())


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_the_same_input_gives_the_same_dataset(tmp_path, tokenizer):
    folder = write_mixed_folder(tmp_path / "corpus")
    (folder / "big.txt").write_text("all the world's a stage, and all the men and women merely players " * 3000)
    runs = [prepare_text_dataset(str(folder), str(tmp_path / f"ds{i}"), tokenizer=tokenizer, bpe_vocab_size=300,
                                 chunk_tokens=64, shard_tokens=4096, **QUIET) for i in range(2)]
    checksums = [{split: [s["sha256"] for s in info.shards] for split, info in r.splits.items()} for r in runs]
    assert checksums[0] == checksums[1] and len(checksums[0]["train"]) > 3
    assert runs[0].raw["tokenizer"]["sha256"] == runs[1].raw["tokenizer"]["sha256"]


def test_bpe_trains_on_a_bounded_sample_from_every_file(tmp_path):
    from genai.data.sources import iter_sample, plan_corpus

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(f"topic{i} " * 50_000)
    sample = "".join(iter_sample(plan_corpus(str(folder)), 40_000))
    assert len(sample) == 40_000 and all(sample.count(f"topic{i}") >= 1000 for i in range(4))


def test_an_older_manifest_without_an_end_of_text_id_still_loads(char_dataset, tmp_path):
    from cluster.storage import copy_tree

    copy_tree(char_dataset, str(tmp_path / "old"))
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["tokenizer"]["eot_id"], manifest["corpus"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    m = load_manifest(str(tmp_path / "old"))
    assert m.eot_id is None and m.splits["train"].tokens > 0
    verify_shards(m)


def test_an_unpaired_surrogate_escape_in_json_becomes_a_question_mark_not_a_crash(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "bad \\ud800 half"}\n{"text": "pair \\ud83d\\ude00 kept"}\n' * 20)
    m = prepare_text_dataset(str(tmp_path / "docs.jsonl"), str(tmp_path / "ds"), tokenizer="bpe", bpe_vocab_size=300,
                             chunk_tokens=16, **QUIET)
    text = load_tokenizer(str(tmp_path / "ds")).decode(stream_of(m))  # BPE's decode leaves its special tokens out
    assert text.startswith("bad ? halfpair 😀 kept")


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"body": "b"}\n', "docs.jsonl: line 2 has no 'text' field (choose the field with --text-column)"),
    ('{"text": "a"}\n{"text": \n', "docs.jsonl: line 2 is not valid JSON"),
    ('{"text": 3}\n', "docs.jsonl: line 1: field 'text' holds int, not text"),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, content, message):
    (tmp_path / "docs.jsonl").write_text(content)
    with pytest.raises(SourceError, match=re.escape(message)):
        prepare_text_dataset(str(tmp_path / "docs.jsonl"), str(tmp_path / "ds"), **QUIET)
    assert not (tmp_path / "ds").exists()


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_ray_data_preparation_gives_the_single_process_dataset(tmp_path, tokenizer):
    """The job's parallel path (Ray Data actors on an embedded local Ray) writes, byte for byte, the dataset the
    single-process path writes from the same input, whichever actor finishes first."""
    from conftest import run_job

    folder = write_mixed_folder(tmp_path / "corpus")
    # A large first part and small later ones: unordered, the later parts' tokens would arrive first.
    (folder / "0-big.txt").write_text("all the world's a stage, and all the men and women merely players\n" * 20_000)
    for i in range(6):
        (folder / f"g{i}.jsonl").write_text("".join(json.dumps({"text": f"doc {i}.{j} " * (j + 1)}) + "\n"
                                                    for j in range(200)))
    manifests, said = {}, {}
    for workers in ("2", "0"):
        r = run_job("prepare_data.py", "--source", str(folder), "--out", str(tmp_path / f"w{workers}"),
                    "--tokenizer", tokenizer, "--bpe-vocab-size", "300", "--chunk-tokens", "64",
                    "--shard-tokens", "4096", "--workers", workers, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        manifests[workers], said[workers] = load_manifest(str(tmp_path / f"w{workers}")), r.stdout
    assert "tokenizing with Ray Data: 2 worker(s)" in said["2"] and "tokenizing in this process" in said["0"]
    checksums = {w: {split: [s["sha256"] for s in info.shards] for split, info in m.splits.items()}
                 for w, m in manifests.items()}
    assert checksums["2"] == checksums["0"] and len(checksums["0"]["train"]) > 3
    assert manifests["2"].raw["tokenizer"]["sha256"] == manifests["0"].raw["tokenizer"]["sha256"]
    assert manifests["2"].raw["corpus"] == manifests["0"].raw["corpus"]
