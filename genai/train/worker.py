"""What every Ray Train worker does first: rank, world size, device, threads, torch.distributed, console."""

from __future__ import annotations

import warnings

import torch



def init_worker(torch_threads: int | None, console=None,
                run_uri: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this worker, with DeepSpeed's process group up (NCCL on GPU, gloo on CPU).

    torch runs `torch_threads` intra-op threads, by default as many as the CPUs Ray reserved for this worker.
    Rank 0 sends its lines and progress to the driver's `console` (a ProgressChannel) when there is one, and,
    given the run's `run_uri`, records where this attempt's workers run (`record_placement`)."""
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch

    from genai.train.tracking import use_console

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    ctx = ray.train.get_context()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(torch_threads or max(1, round(cpus)))
    device = ray.train.torch.get_device()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank = ctx.get_world_rank()
    use_console(console if rank == 0 else None)
    if run_uri:
        record_placement(run_uri, rank)
    return rank, ctx.get_world_size(), device


def record_placement(run_uri: str, rank: int) -> list[dict]:
    """Every worker's node (Ray node id and address) and process, gathered to rank 0, which writes them to the
    run's workers.json (this attempt's; a restart after a lost node rewrites it) and says how many nodes the
    workers are on when there are several workers. Returns the list, ordered by rank."""
    import json
    import os

    import ray
    import torch.distributed as dist

    from cluster.storage import resolve
    from genai.run import WORKERS_FILE
    from genai.train.tracking import say

    ctx = ray.get_runtime_context()
    me = {"rank": rank, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    if rank == 0:
        resolve(run_uri).join(WORKERS_FILE).write_text(json.dumps({"workers": everyone}, indent=2))
        nodes = {w["node_id"] for w in everyone}
        if len(everyone) > 1:
            say(f"{len(everyone)} workers on {len(nodes)} node(s)")
    return everyone


class EpochRows:
    """A worker's training rows, one `iter_batches` pass per epoch, the first pass started at once.

    Ray Data starts a dataset's execution (its coordinator actor, read tasks) on the first request for a
    batch; asking for it in the background here lets that start overlap the model and engine set-up."""

    def __init__(self, shard, batch_size: int, prefetch_batches: int):
        import queue
        import threading

        self._shard, self._options = shard, dict(batch_format="pyarrow", batch_size=batch_size,
                                                 prefetch_batches=prefetch_batches)
        self._first: queue.Queue = queue.Queue(1)
        self._started = iter(self._shard.iter_batches(**self._options))
        threading.Thread(target=self._pull_first, name="first-rows", daemon=True).start()

    def _pull_first(self) -> None:
        try:
            self._first.put((True, next(self._started)))
        except StopIteration:
            self._first.put((False, None))
        except BaseException as exc:  # noqa: BLE001 - raised where the rows are read
            self._first.put((False, exc))

    def epoch(self):
        """The rows of the next epoch (the pass started in the background for the first one)."""
        if self._started is None:
            return self._shard.iter_batches(**self._options)
        started, self._started = self._started, None
        return self._resume(started)

    def _resume(self, started):
        ok, value = self._first.get()
        if isinstance(value, BaseException):
            raise value
        if ok:
            yield value
            yield from started
