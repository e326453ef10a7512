"""What every Ray Train worker does first: rank, world size, device, threads, torch.distributed, console."""

from __future__ import annotations

import warnings

import torch


def init_worker(torch_threads: int | None, console=None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this worker, with DeepSpeed's process group up (NCCL on GPU, gloo on CPU).

    torch runs `torch_threads` intra-op threads, by default as many as the CPUs Ray reserved for this worker.
    Rank 0 sends its lines and progress to the driver's `console` (a ProgressChannel) when there is one."""
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
    return rank, ctx.get_world_size(), device
