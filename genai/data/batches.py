"""Per-worker token windows from a stream of parquet rows, reproducible for exact resume.

Rows are contiguous chunks of the corpus. Each epoch starts the window grid at an offset drawn
from (seed, epoch), the same on every worker, so the number of windows each worker gets per
epoch is known in advance and every worker can take the same number of optimizer steps. Windows
are shuffled in buffers with an RNG seeded by (seed, epoch, rank): replaying an epoch's row stream
replays its batches exactly, which is what resume relies on.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa


def epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
    """Where the window grid starts inside each row this epoch (same on all workers)."""
    return int(np.random.default_rng([seed, epoch, 0x5EED]).integers(0, seq_len))


def windows_per_row(row_tokens: int, seq_len: int, offset: int) -> int:
    """Windows of seq_len + 1 tokens (inputs and shifted targets) that fit in one row."""
    return max(0, (row_tokens - offset - 1) // seq_len)


def rows_of(batch) -> list[np.ndarray]:
    """Token arrays of the rows in a pyarrow Table/RecordBatch or a dict of numpy columns."""
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        col = batch.column("tokens")
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        values = col.values.to_numpy(zero_copy_only=False)
        offsets = col.offsets.to_numpy()
        base = offsets[0]
        return [values[offsets[i] - base:offsets[i + 1] - base] for i in range(len(col))]
    return [np.asarray(r) for r in batch["tokens"]]


def cut_windows(row: np.ndarray, seq_len: int, offset: int) -> np.ndarray:
    """Non-overlapping windows (n, seq_len + 1) starting at offset; consecutive windows share one token."""
    n = windows_per_row(len(row), seq_len, offset)
    if n == 0:
        return np.empty((0, seq_len + 1), dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(row[offset:], seq_len + 1)
    return view[: n * seq_len : seq_len].astype(np.int64)


class WindowStream:
    """One epoch of one worker's rows as shuffled micro-batches of shape (micro_batch, seq_len + 1)."""

    def __init__(self, batches: Iterable, seq_len: int, micro_batch: int, seed: int, epoch: int, rank: int,
                 shuffle_buffer: int = 8192, offset: int | None = None):
        self._source = iter(batches)
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.offset = epoch_offset(seed, epoch, seq_len) if offset is None else offset
        self.shuffle = shuffle_buffer > 1
        self.buffer_windows = max(shuffle_buffer, micro_batch)
        self.rng = np.random.default_rng([seed, epoch, rank, 0xB0F])

    def __iter__(self) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        count = 0
        carry = np.empty((0, self.seq_len + 1), dtype=np.int64)
        for batch in self._source:
            for row in rows_of(batch):
                w = cut_windows(row, self.seq_len, self.offset)
                if len(w):
                    pending.append(w)
                    count += len(w)
            if count >= self.buffer_windows:
                carry = yield from self._emit(carry, pending)
                pending, count = [], 0
        yield from self._emit(carry, pending)

    def _emit(self, carry: np.ndarray, pending: list[np.ndarray]):
        windows = np.concatenate([carry, *pending]) if pending else carry
        if self.shuffle:
            windows = windows[self.rng.permutation(len(windows))]
        full = len(windows) // self.micro_batch * self.micro_batch
        for i in range(0, full, self.micro_batch):
            yield windows[i:i + self.micro_batch]
        return windows[full:]

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
