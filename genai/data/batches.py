"""Per-worker token windows from a stream of parquet rows, reproducible for exact resume.

Rows are contiguous chunks of the corpus. A worker's rows, in the order it receives them, are joined
into one token stream and windows are cut from that stream, across row and shard boundaries, so an
epoch misses only each worker's first `offset` tokens and what is left after its last whole step.
The offset, drawn from (seed, epoch) and the same on every worker, moves the window boundaries from
epoch to epoch, while the number of windows a worker is guaranteed follows from its token count alone
(`window_count`): every worker can take the same number of optimizer steps. Windows are shuffled in
buffers of tokens with an RNG seeded by (seed, epoch, rank): replaying an epoch's row stream replays its
batches exactly, which is what resume relies on. The training split's shards reach the workers in an order
drawn from the seed (`shard_order`), so that a buffer holds text from across a large corpus, not one stretch.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
    """Tokens skipped at the start of each worker's stream this epoch (the same on all workers)."""
    return int(np.random.default_rng([seed, epoch, 0x5EED]).integers(0, seq_len))


def window_count(stream_tokens: int, seq_len: int, offset: int) -> int:
    """Windows of seq_len + 1 tokens (inputs and shifted targets) cut from a stream of `stream_tokens` tokens
    after skipping `offset`."""
    return max(0, (stream_tokens - offset - 1) // seq_len)


def shard_order(uris: list[str], seed: int) -> list[str]:
    """The training split's shards in the order the workers read them: a permutation drawn from the seed, the
    same every epoch (so a resumed run reads what it read), so that a shuffle buffer of a large corpus holds text
    from across it, not from one stretch of it."""
    return [uris[i] for i in np.random.default_rng([seed, 0x5A4D]).permutation(len(uris))]


def tokens_of(batch) -> np.ndarray:
    """The tokens of a batch's rows joined in order: a pyarrow Table/RecordBatch or a dict of numpy columns."""
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        return pc.list_flatten(batch.column("tokens")).to_numpy(zero_copy_only=False)
    rows = [np.asarray(r) for r in batch["tokens"]]
    return np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)


def cut_windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive windows (n, seq_len + 1) from the start of `tokens` (a strided view, no copy), and the tokens
    left over for the next one. Neighbouring windows share one token: the last target of one is the first input
    of the next."""
    n = window_count(len(tokens), seq_len, 0)
    if n == 0:
        return np.empty((0, seq_len + 1), dtype=tokens.dtype), tokens
    view = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
    return view[: n * seq_len: seq_len], tokens[n * seq_len:]


class WindowStream:
    """One epoch of one worker's rows as shuffled micro-batches (int64, shape (micro_batch, seq_len + 1)), cut
    from the rows joined into one stream that starts `offset` tokens in (by default the epoch's `epoch_offset`).

    The stream is shuffled in buffers of `shuffle_tokens` tokens, held in the rows' own dtype: each buffer's
    windows are emitted in a random order, then the next buffer is read. Rows arrive in corpus order, so for the
    batches to be as random as uniformly drawn windows (nanoGPT's) a buffer must hold a large share of the
    epoch: with buffers of half of tiny Shakespeare, a run trains on one half of the corpus, then on the other,
    and ends 0.04 higher in validation loss (benchmarks/NOTES.md). `shuffle_tokens=0`: windows in stream order."""

    def __init__(self, batches: Iterable, seq_len: int, micro_batch: int, seed: int, epoch: int, rank: int,
                 shuffle_tokens: int = 1 << 23, offset: int | None = None):
        self._source = iter(batches)
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.offset = epoch_offset(seed, epoch, seq_len) if offset is None else offset
        self.shuffle = shuffle_tokens > 0
        self.buffer_tokens = max(shuffle_tokens, micro_batch * seq_len + 1)  # at least one micro-batch
        self.rng = np.random.default_rng([seed, epoch, rank, 0xB0F])

    def __iter__(self) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        count = 0
        carry = np.empty((0, self.seq_len + 1), dtype=np.int64)
        for tokens in self._stream():
            pending.append(tokens)
            count += len(tokens)
            if count >= self.buffer_tokens or not self.shuffle:
                carry, rest = yield from self._emit(carry, np.concatenate(pending))
                pending, count = [rest], len(rest)
        yield from self._emit(carry, np.concatenate(pending) if pending else np.empty(0, dtype=np.int64))

    def _stream(self) -> Iterator[np.ndarray]:
        """The worker's token stream, one source batch at a time, without its first `offset` tokens."""
        skip = self.offset
        for batch in self._source:
            tokens = tokens_of(batch)
            dropped = min(skip, len(tokens))
            skip -= dropped
            yield tokens[dropped:]

    def _emit(self, carry: np.ndarray, buffer: np.ndarray):
        """The micro-batches of one buffer's windows, in a random order, the first completing `carry` (the last
        buffer's windows short of a micro-batch). Returns (the windows short of a micro-batch now, the tokens
        after the buffer's last window)."""
        windows, rest = cut_windows(buffer, self.seq_len)
        n, mb = len(windows), self.micro_batch
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        take = min(n, (mb - len(carry)) % mb)
        if take:
            carry = np.concatenate([carry, windows[order[:take]]])
        if len(carry) == mb:
            yield carry
            carry = carry[:0]
        full = take + (n - take) // mb * mb
        for i in range(take, full, mb):
            yield windows[order[i:i + mb]].astype(np.int64)
        return np.concatenate([carry, windows[order[full:]]]).astype(np.int64), rest.copy()

    def drain(self) -> None:
        """Consume the rest of the epoch's rows so the next epoch can start on every worker."""
        for _ in self._source:
            pass


class ExampleStream:
    """One epoch of one worker's examples (images and labels) as shuffled batches, reproducible like
    WindowStream: examples are shuffled in buffers with an RNG seeded by (seed, epoch, rank)."""

    def __init__(self, batches: Iterable, decode, batch_size: int, seed: int, epoch: int, rank: int,
                 shuffle_buffer: int = 4096):
        self._source = iter(batches)
        self.decode, self.batch_size = decode, batch_size
        self.buffer = max(shuffle_buffer, batch_size)
        self.rng = np.random.default_rng([seed, epoch, rank, 0x1A6E])

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        pending: list[tuple[np.ndarray, ...]] = []
        count, carry = 0, None
        for batch in self._source:
            arrays = self.decode(batch)
            pending.append(arrays)
            count += len(arrays[0])
            if count >= self.buffer:
                carry = yield from self._emit(carry, pending)
                pending, count = [], 0
        yield from self._emit(carry, pending)

    def _emit(self, carry, pending):
        parts = ([carry] if carry is not None else []) + pending
        if not parts:
            return None
        columns = [np.concatenate(cols) for cols in zip(*parts)]
        order = self.rng.permutation(len(columns[0]))
        columns = [c[order] for c in columns]
        full = len(order) // self.batch_size * self.batch_size
        for i in range(0, full, self.batch_size):
            yield tuple(c[i:i + self.batch_size] for c in columns)
        return tuple(c[full:] for c in columns)

    def drain(self) -> None:
        """Consume the rest of the epoch's rows so the next epoch can start on every worker."""
        for _ in self._source:
            pass
