"""Checkpoints: every rank saves its DeepSpeed shards and Ray Train merges them in storage.

A checkpoint folder (its place in the run folder: genai/run.py) holds, besides DeepSpeed's `<tag>/` shards:
    trainer_state.json      step, data position, the world size that wrote it (rank 0) and the engines' tags
    rng/rank<N>.pt          each rank's RNG state (dropout continues exactly on resume)
    meta/                   model config, tokenizer and recipe: enough to sample from it

`master_weights` reads an engine's fp32 master weights (for the export), whatever its ZeRO stage and precision.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from typing import Callable

import numpy as np
import torch

from genai.run import META_DIR, TRAINER_STATE, checkpoint_name
from genai.train.tracking import say, say_resumed


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_and_report(engines: dict, trainer_state: dict, metrics: dict, rank: int,
                    write_meta: Callable[[str], None] | None = None,
                    rank_state: Callable[[], dict | None] | None = None) -> float:
    """Save every engine under its own tag on every rank, then report the merged checkpoint to Ray.
    `rank_state()` is what this rank keeps besides its RNG (saved with it, e.g. a CycleGAN's image pools).
    Returns the seconds it took (written locally, uploaded to storage, registered by Ray)."""
    import ray.train

    t0 = time.perf_counter()
    step = trainer_state["step"]
    tmp = tempfile.mkdtemp(prefix=f"genai-ckpt-{step}-")
    try:
        write_checkpoint(tmp, engines, trainer_state, rank, write_meta, rank_state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(step))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    if rank == 0:
        say(f"{checkpoint_name(step)} saved ({seconds:.1f}s)")
    return seconds


def write_checkpoint(folder: str, engines: dict, trainer_state: dict, rank: int,
                     write_meta: Callable[[str], None] | None = None,
                     rank_state: Callable[[], dict | None] | None = None) -> None:
    """This rank's part of a checkpoint in the local `folder`: every engine's shards under its tag, the RNG state,
    and on rank 0 trainer_state.json (with the tags; its `world_size` is what a resharded resume converts from)
    and meta/. Every rank calls it (saving ZeRO shards is collective)."""
    step = trainer_state["step"]
    for name, engine in engines.items():
        engine.save_checkpoint(folder, tag=f"{name}-step{step:08d}", save_latest=False)
    os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
    extra = rank_state() if rank_state else None
    torch.save(dict(rng_state(), **({"family": extra} if extra is not None else {})),
               os.path.join(folder, "rng", f"rank{rank}.pt"))
    if rank == 0:
        state = dict(trainer_state, tags={n: f"{n}-step{step:08d}" for n in engines})
        with open(os.path.join(folder, TRAINER_STATE), "w") as f:
            json.dump(state, f, indent=2)
        if write_meta:
            write_meta(os.path.join(folder, META_DIR))


def master_weights(engine, rank: int) -> dict | None:
    """The model's fp32 master weights as a CPU state dict on rank 0 (None on the other ranks): under bf16/fp16 the
    optimizer's fp32 copies, not the 16-bit weights widened; under fp32 the weights themselves.

    Every rank must call it. Under ZeRO 1-3 assembling a parameter is a collective, done here one parameter at a
    time in the same order on every rank (module.parameters()), so a ZeRO-3 model is never whole on any rank:
    rank 0 keeps each assembled parameter on the CPU, the others drop it."""
    from deepspeed.utils import safe_get_full_fp32_param

    module, full, copies = engine.module, {}, None
    for p in module.parameters():  # a tied parameter once
        value = safe_get_full_fp32_param(p)  # ZeRO 1-3 and DeepSpeed's bf16 optimizer (collective); else None
        if value is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter has no fp32 copy
            value = _gathered(p)
        elif value is None:  # no ZeRO: DeepSpeed's fp16/bf16 optimizers keep fp32 copies; fp32 is its own master
            copies = _fp32_copies(engine.optimizer) if copies is None else copies
            value = copies.get(id(p), p)
        if rank == 0:
            full[id(p)] = _cpu_fp32(value)
    if rank != 0:
        return None
    return {name: full[id(t)] if id(t) in full else _cpu_fp32(t)
            for name, t in module.state_dict(keep_vars=True).items()}


def _cpu_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in fp32 on the CPU, owning its memory (never a view of the optimizer's or a gather's buffer)."""
    return tensor.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _gathered(param) -> torch.Tensor:
    """One ZeRO-3 parameter's whole value, gathered on every rank for the duration of the copy."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return _cpu_fp32(param)


def _fp32_copies(optimizer) -> dict[int, torch.Tensor]:
    """DeepSpeed's optimizer wrappers without ZeRO under bf16/fp16 keep an fp32 copy of each 16-bit parameter:
    FP16_UnfusedOptimizer one tensor per parameter, FP16_Optimizer one flat tensor per group. By parameter id."""
    from torch._utils import _unflatten_dense_tensors

    low = getattr(optimizer, "fp16_groups", None)
    if low is None:
        return {}
    if hasattr(optimizer, "fp32_groups"):
        high = optimizer.fp32_groups
    elif hasattr(optimizer, "fp32_groups_flat"):
        high = [_unflatten_dense_tensors(flat, group) for flat, group in zip(optimizer.fp32_groups_flat, low)]
    else:
        return {}
    return {id(p): q for group, copies in zip(low, high) for p, q in zip(group, copies)}


def start_checkpoint(cfg: dict):
    """The checkpoint a worker starts from: the run's own latest (Ray Train's resume), else the loop config's
    `init_checkpoint` URI (a sweep's PBT trial continuing from another trial's checkpoint), else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.get("init_checkpoint"):
        from cluster.storage import resolve

        loc = resolve(cfg["init_checkpoint"])
        checkpoint = ray.train.Checkpoint(path=loc.path, filesystem=loc.fs)
    return checkpoint


def restore(checkpoint, engines: dict, rank: int, world_size: int,
            load_extra: Callable[[str], None] | None = None,
            load_rank_state: Callable[[dict], None] | None = None) -> tuple[dict, float]:
    """Load every engine's shards and this rank's RNG state; return (the trainer state, seconds it took).

    A checkpoint written by another number of workers is resharded (genai/train/reshard.py: ZeRO 1-3 through
    DeepSpeed's universal checkpoint, ZeRO-0 as it is), optimizer state and schedule included. Its data position
    cannot be carried: each worker's rows and their shuffle follow the worker count (the Ray Data split, the
    per-rank shuffle seed), so skipping `epoch_step` batches per worker would skip other rows than were trained
    on. A resized resume therefore restarts the current epoch's data from its beginning (logged): the rows that
    epoch's earlier steps trained on are seen again, none is skipped; the step count and schedule go on. (The
    families that draw seeded batches by index, sr and cyclegan, have one endless epoch: their indices restart
    at 0, i.e. the run's earlier random draws are drawn again.) A rank with no saved RNG state (more workers
    than saved) keeps its fresh seed, and its family rank state (a CycleGAN's image pools) starts empty.

    `load_extra(folder)` reads anything else the loop saved in the checkpoint (e.g. an EMA under meta/),
    `load_rank_state(state)` what save_and_report's `rank_state` saved for this rank."""
    from genai.train.reshard import load_spec, loading

    t0 = time.perf_counter()
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, TRAINER_STATE)) as f:
            state = json.load(f)
        saved_world = state["world_size"]
        for name, engine in engines.items():
            spec = load_spec(engine, d, state["tags"][name], saved_world, world_size)
            with loading(engine, spec):
                load_path, _ = engine.load_checkpoint(spec.load_dir, tag=spec.tag)
            if load_path is None:
                raise RuntimeError(f"checkpoint {checkpoint.path}: no DeepSpeed shards for {name}")
        rng_file = os.path.join(d, "rng", f"rank{rank}.pt")
        if os.path.exists(rng_file):
            saved = torch.load(rng_file, weights_only=False)
            set_rng_state(saved)
            if load_rank_state and "family" in saved:
                load_rank_state(saved["family"])
        if load_extra:
            load_extra(d)
    seconds = time.perf_counter() - t0
    resized, trained_in_epoch = saved_world != world_size, state["epoch_step"]
    if resized:
        state["epoch_step"] = 0
    state["world_size"] = world_size  # what the next checkpoint is written by
    if rank == 0:
        say_resumed(state["step"], f"resumed from {checkpoint.path} at step {state['step']} (epoch {state['epoch']}, "
                    f"step {trained_in_epoch} of it) in {seconds:.1f}s")
        if resized:
            say(f"resharded from {saved_world} to {world_size} workers (optimizer state carried)" + (
                f"; epoch {state['epoch']} restarts its data from the beginning: the rows of its first "
                f"{trained_in_epoch} steps are seen again" if trained_in_epoch else ""))
    return state, seconds
