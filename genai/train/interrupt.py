"""Graceful stop: the driver asks (Ctrl-C / SIGTERM), the workers checkpoint at the next step and return.

The driver writes `<run>/STOP_REQUESTED`; rank 0 looks for it at most once a second and every rank
learns the answer through one tiny all-reduce every `every` steps (the loops pass their log interval,
where they synchronise anyway), so all ranks stop after the same step and other steps pay nothing.
"""

from __future__ import annotations

import time

from cluster.storage import resolve

STOP_FILE = "STOP_REQUESTED"


def request_stop(run_uri: str) -> None:
    resolve(run_uri).join(STOP_FILE).write_text("stop requested by the driver\n")


def clear_stop(run_uri: str) -> None:
    resolve(run_uri).join(STOP_FILE).delete()


class StopFlag:
    """`requested(step)` is collective on steps divisible by `every`: every rank gets the same answer."""

    def __init__(self, run_uri: str, rank: int, device, every: int = 1, poll_s: float = 1.0):
        self.marker = resolve(run_uri).join(STOP_FILE)
        self.rank, self.device, self.every, self.poll_s = rank, device, every, poll_s
        self._last, self._seen = 0.0, False

    def requested(self, step: int) -> bool:
        if step % self.every:
            return False
        import torch
        import torch.distributed as dist

        if self.rank == 0 and not self._seen and time.monotonic() - self._last >= self.poll_s:
            self._last = time.monotonic()
            try:
                self._seen = self.marker.exists()
            except OSError:
                self._seen = False  # storage hiccup: look again next time
        flag = torch.tensor([1.0 if self._seen else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
