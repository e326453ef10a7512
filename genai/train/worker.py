"""What every Ray Train worker does first: rank, world size, device, threads, torch.distributed."""

from __future__ import annotations

import warnings

import torch


def init_worker(torch_threads: int | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this worker, with DeepSpeed's process group up (NCCL on GPU, gloo on CPU)."""
    import deepspeed
    import ray.train
    import ray.train.torch

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    ctx = ray.train.get_context()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = ray.train.torch.get_device()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return ctx.get_world_rank(), ctx.get_world_size(), device
