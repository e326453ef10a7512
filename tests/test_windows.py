"""Training windows: every token once per epoch, the same number of steps on every worker, exact replay.

Each worker's rows are joined into one token stream and cut into windows across row and shard boundaries.
These tests feed simulated row splits through the training loop's WindowStream (no Ray): Ray Data's
streaming_split(equal=True) gives every worker rows // world rows in an order of Ray's choosing, and the
validation reader gives every worker every world-th row, so the guarantees must hold for any assignment of
floor or ceil of rows / world rows to each worker.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from genai.config import load_recipe
from genai.data.batches import WindowStream, epoch_offset, shard_order, window_count
from genai.data.text_dataset import DatasetError, SplitInfo, TextManifest
from genai.train.nlg import plan_nlg_run, steps_per_epoch, worst_steps_per_epoch

ROWS_PER_FETCH = 32  # as the training loop fetches them


def manifest(rows: int, chunk: int, last: int) -> TextManifest:
    """A training split of `rows` rows of `chunk` tokens, the last one `last` tokens long."""
    info = SplitInfo(tokens=(rows - 1) * chunk + last, rows=rows, last_row_tokens=last)
    return TextManifest(uri="memory://", vocab_size=50304, tokenizer_kind="bpe", chunk_tokens=chunk,
                        splits={"train": info}, raw={})


def row(i: int, rows: int, chunk: int, last: int) -> np.ndarray:
    """Row i's tokens are its positions in the split, so that coverage can be counted from the windows."""
    return np.arange(i * chunk, i * chunk + (last if i == rows - 1 else chunk), dtype=np.int64)


def equal_split(rows: int, world: int, rng) -> list[list[int]]:
    """Ray Data's equal split: rows // world rows each, contiguous, the rest dropped."""
    per = rows // world
    return [list(range(r * per, (r + 1) * per)) for r in range(world)]


def every_world_th(rows: int, world: int, rng) -> list[list[int]]:
    """The validation reader's split: floor or ceil rows each, the short last row on a ceil worker."""
    return [list(range(r, rows, world)) for r in range(world)]


def short_row_on_a_floor_worker(rows: int, world: int, rng) -> list[list[int]]:
    """Contiguous blocks, the ceil ones first: the last worker gets the fewest rows and the short row (the worst
    case the bound allows)."""
    sizes = [rows // world + (r < rows % world) for r in range(world)]
    ends = np.cumsum([0] + sizes)
    return [list(range(ends[r], ends[r + 1])) for r in range(world)]


def shuffled(rows: int, world: int, rng) -> list[list[int]]:
    """Any rows in any order, floor or ceil of them per worker."""
    order = rng.permutation(rows).tolist()
    sizes = rng.permutation([rows // world + (r < rows % world) for r in range(world)])
    ends = np.cumsum([0, *sizes])
    return [order[ends[r]:ends[r + 1]] for r in range(world)]


ASSIGNMENTS = [equal_split, every_world_th, short_row_on_a_floor_worker, shuffled]


def source(ids: list[int], rows: int, chunk: int, last: int, batch_rows: int = ROWS_PER_FETCH):
    """A worker's row stream as the loop receives it: batches of rows, in order."""
    for b in range(0, len(ids), batch_rows):
        yield {"tokens": [row(i, rows, chunk, last) for i in ids[b:b + batch_rows]]}


def epoch_coverage(rows: int, chunk: int, last: int, world: int, assign, seq: int, micro: int, accum: int,
                   seed: int, epoch: int, shuffle: int) -> float:
    """Share of the split's tokens in the windows all workers train on in one epoch (its steps, not its stream)."""
    m = manifest(rows, chunk, last)
    n_steps = steps_per_epoch(m.min_tokens_per_worker("train", world), seq, micro, accum, seed, epoch)
    covered = np.zeros(m.splits["train"].tokens, dtype=bool)
    for rank, ids in enumerate(assign(rows, world, np.random.default_rng(seed))):
        stream = iter(WindowStream(source(ids, rows, chunk, last), seq, micro, seed, epoch, rank, shuffle))
        for _ in range(n_steps * accum):
            covered[next(stream).ravel()] = True
    return float(covered.mean())


@pytest.fixture(scope="module")
def gpt2_small():
    return load_recipe("gpt2-small", ["data.uri=s3://datasets/fw-bpe"])


@pytest.mark.parametrize("chunk", [4096, 2 * (1024 + 1)], ids=["gpt2-small-rows", "smallest-rows-of-old"])
@pytest.mark.parametrize("assign", [equal_split, every_world_th], ids=lambda f: f.__name__)
def test_an_epoch_at_gpt2_small_shapes_trains_on_99_percent_of_the_tokens(gpt2_small, chunk, assign):
    t = gpt2_small.train
    assert (gpt2_small.seq_len, gpt2_small.data.chunk_tokens, gpt2_small.cluster.num_workers) == (1024, 4096, 8)
    rows = 20_000 if chunk == 4096 else 40_000  # ~80M tokens either way
    coverage = epoch_coverage(rows, chunk, chunk // 3, 8, assign, gpt2_small.seq_len, t.micro_batch_size,
                              t.grad_accum, t.seed, 0, gpt2_small.data.shuffle_buffer_tokens)
    assert coverage >= 0.99, coverage


@pytest.mark.parametrize("chunk", [8, 17, 40, 64])
@pytest.mark.parametrize("assign", ASSIGNMENTS, ids=lambda f: f.__name__)
def test_every_worker_yields_the_windows_of_the_steps_computed_in_advance(chunk, assign):
    seq, micro, accum = 16, 2, 3
    steps_seen = []
    for rows, world in ((97, 3), (100, 4), (40, 7)):
        for last in {chunk, 1, chunk // 2 + 1}:
            guaranteed = manifest(rows, chunk, last).min_tokens_per_worker("train", world)
            for seed in range(3):
                split = assign(rows, world, np.random.default_rng(seed))
                tokens = [sum(len(row(i, rows, chunk, last)) for i in ids) for ids in split]
                assert min(tokens) >= guaranteed  # the bound holds for this assignment
                for epoch in range(3):
                    n_steps = steps_per_epoch(guaranteed, seq, micro, accum, seed, epoch)
                    assert n_steps >= worst_steps_per_epoch(guaranteed, seq, micro, accum)
                    steps_seen.append(n_steps)
                    for rank, ids in enumerate(split):
                        for shuffle, batch_rows in ((0, 1), (7 * seq, 5)):
                            stream = WindowStream(source(ids, rows, chunk, last, batch_rows), seq, micro, seed,
                                                  epoch, rank, shuffle)
                            yielded = sum(len(mb) for mb in stream)
                            assert yielded >= n_steps * micro * accum, (rows, world, last, seed, epoch, rank)
    assert max(steps_seen) >= 2  # not only epochs too short for a step
    # The worst case is tight: a worker with the fewest rows, one of them the short last row, has exactly the bound.
    split = short_row_on_a_floor_worker(97, 3, None)
    assert sum(len(row(i, 97, chunk, 1)) for i in split[-1]) == manifest(97, chunk, 1).min_tokens_per_worker("train", 3)


def test_a_worker_with_fewer_rows_than_workers_gets_no_guarantee():
    assert manifest(3, 64, 64).min_tokens_per_worker("train", 4) == 0
    assert worst_steps_per_epoch(0, 16, 1, 1) == 0


def arrow_source(ids: list[int], rows: int, chunk: int, last: int, batch_rows: int):
    """The same rows as pyarrow record batches, as Ray Data and the validation reader give them."""
    table = pa.table({"tokens": pa.array([row(i, rows, chunk, last).astype(np.uint16) for i in ids],
                                         type=pa.list_(pa.uint16()))})
    return table.to_batches(max_chunksize=batch_rows)


def test_replaying_an_epochs_rows_replays_its_batches_exactly():
    ids, rows = list(range(0, 300, 2)), 300

    def batches(epoch: int, rank: int = 0, make=source):
        src = make(ids, rows, 37, 5, 8)
        return [b.copy() for b in WindowStream(src, 16, 4, seed=3, epoch=epoch, rank=rank, shuffle_tokens=800)]

    first = batches(0)
    assert len(first) > 50
    assert all(np.array_equal(a, b) for a, b in zip(first, batches(0), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(first, batches(0, make=arrow_source), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, batches(1)))  # another epoch, another order
    assert not all(np.array_equal(a, b) for a, b in zip(first, batches(0, rank=1)))
    # Different epochs cut different windows: the stream starts at another offset.
    assert epoch_offset(3, 0, 16) != epoch_offset(3, 1, 16)
    assert {int(w[0]) for b in first for w in b} != {int(w[0]) for b in batches(1) for w in b}


def test_windows_cross_row_and_shard_boundaries():
    lengths = [5, 3, 12, 1, 9, 7]
    rows = [np.arange(100 * i, 100 * i + n) for i, n in enumerate(lengths)]
    # Two shards, their rows arriving in batches that do not line up with either.
    shards = [pa.table({"tokens": pa.array(rows[:2], type=pa.list_(pa.int64()))}),
              pa.table({"tokens": pa.array(rows[2:], type=pa.list_(pa.int64()))})]
    batches = [shards[0]] + shards[1].to_batches(max_chunksize=3)
    seq, offset = 4, 2
    got = np.concatenate(list(WindowStream(batches, seq, 1, seed=0, epoch=0, rank=0, shuffle_tokens=0,
                                           offset=offset)))
    stream = np.concatenate(rows)
    n = window_count(len(stream), seq, offset)
    assert n == (sum(lengths) - offset - 1) // seq == len(got) == 8
    # The first window: the first row's last three tokens, then the second row's first two.
    assert got[0].tolist() == [2, 3, 4, 100, 101]
    # One that spans the single-token row: the third row's end, the fourth row, the fifth row's start.
    assert got[4].tolist() == [210, 211, 300, 400, 401]
    for k, window in enumerate(got):
        assert np.array_equal(window, stream[offset + k * seq: offset + k * seq + seq + 1])
    assert got[-1][-1] == stream[offset + n * seq]  # only the last partial window is left out


def test_sequences_longer_than_a_row_are_planned(char_dataset):
    recipe = load_recipe("tiny", [f"data.uri={char_dataset}", "model.block_size=512", "train.seq_len=300",
                                  "cluster.num_workers=2"])
    plan = plan_nlg_run(recipe, log=lambda *_: None)
    assert plan.manifest.chunk_tokens == 256 < recipe.seq_len
    cfg = plan.loop_config("memory://run")
    assert steps_per_epoch(cfg["train_worker_tokens"], 300, 8, 1, recipe.train.seed, 0) >= 100


def test_a_dataset_too_small_for_one_step_or_one_validation_batch_is_refused(char_dataset):
    too_big = load_recipe("tiny", [f"data.uri={char_dataset}", "train.micro_batch_size=100000"])
    with pytest.raises(DatasetError, match="too few for 1 worker"):
        plan_nlg_run(too_big, log=lambda *_: None)
    val_short = load_recipe("tiny", [f"data.uri={char_dataset}", "train.micro_batch_size=5000",
                                     "cluster.num_workers=2"])
    with pytest.raises(DatasetError, match="fewer than one micro-batch"):
        plan_nlg_run(val_short, log=lambda *_: None)


def first_positions(stream: WindowStream, share: float, total_windows: int) -> np.ndarray:
    """The corpus positions (window starts) of the first `share` of an epoch's windows."""
    starts = []
    for mb in stream:
        starts.extend(mb[:, 0].tolist())
        if len(starts) >= share * total_windows:
            break
    return np.asarray(starts)


def test_the_demos_batches_draw_from_the_whole_corpus_from_the_first_step():
    # shakespeare-char on tiny Shakespeare (1.0M training tokens in 1024-token rows, one worker): a buffer holding
    # half the epoch trained on the first half of the corpus, then the second, and cost 0.04 in validation loss.
    # From the first step the windows must be spread over the corpus as uniformly drawn ones would be.
    r = load_recipe("shakespeare-char")
    rows, chunk = 981, 1024
    stream = WindowStream(source(list(range(rows)), rows, chunk, 335, ROWS_PER_FETCH), r.seq_len,
                          r.train.micro_batch_size, r.train.seed, 0, 0, r.data.shuffle_buffer_tokens)
    total = window_count((rows - 1) * chunk + 335, r.seq_len, 0)
    where = np.sort(first_positions(stream, 0.05, total)) / ((rows - 1) * chunk + 335)
    uniform = np.arange(1, len(where) + 1) / len(where)
    assert np.abs(where - uniform).max() < 0.05  # Kolmogorov-Smirnov distance to uniform


def test_a_large_corpus_is_read_in_a_seeded_shard_order_and_each_buffer_mixes_shards():
    uris = [f"s3://b/ds/train/part-{i:05d}.parquet" for i in range(64)]
    order = shard_order(uris, 1337)
    assert sorted(order) == uris and order != uris
    assert shard_order(uris, 1337) == order and shard_order(uris, 7) != order  # fixed by the seed, resumable
    # 64 shards of 8 rows of 512 tokens, read in that order into buffers of 8 shards' tokens: the first 5% of the
    # windows come from 8 or more shards spread over the corpus, not from its first eighth.
    rows, chunk, per_shard = 64 * 8, 512, 8
    ids = [int(u[-13:-8]) * per_shard + k for u in order for k in range(per_shard)]
    stream = WindowStream(source(ids, rows, chunk, chunk, ROWS_PER_FETCH), 64, 8, 0, 0, 0, 8 * per_shard * chunk)
    shards = set((first_positions(stream, 0.05, rows * chunk // 64) // (per_shard * chunk)).tolist())
    assert len(shards) >= 8 and max(shards) - min(shards) > 32


def test_a_recipe_naming_the_old_window_buffer_is_told_its_new_name():
    with pytest.raises(Exception, match="data.shuffle_buffer_windows is now data.shuffle_buffer_tokens"):
        load_recipe("tiny", ["data.shuffle_buffer_windows=512"])
