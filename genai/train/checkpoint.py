"""Checkpoints: every rank saves its DeepSpeed shards and Ray Train merges them in storage.

A checkpoint folder holds, besides DeepSpeed's `<tag>/` shards:
    trainer_state.json      step, data position and world size (rank 0)
    rng/rank<N>.pt          each rank's RNG state (dropout continues exactly on resume)
    meta/                   model config, tokenizer and recipe: enough to sample from it
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

from genai.train.tracking import say

TRAINER_STATE = "trainer_state.json"


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
                    write_meta: Callable[[str], None] | None = None) -> float:
    """Save every engine under its own tag on every rank, then report the merged checkpoint to Ray.
    Returns the seconds it took (written locally, uploaded to storage, registered by Ray)."""
    import ray.train

    t0 = time.perf_counter()
    step = trainer_state["step"]
    tmp = tempfile.mkdtemp(prefix=f"genai-ckpt-{step}-")
    try:
        for name, engine in engines.items():
            engine.save_checkpoint(tmp, tag=f"{name}-step{step:08d}", save_latest=False)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(tmp, "rng", f"rank{rank}.pt"))
        if rank == 0:
            state = dict(trainer_state, tags={n: f"{n}-step{step:08d}" for n in engines})
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                json.dump(state, f, indent=2)
            if write_meta:
                write_meta(os.path.join(tmp, "meta"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    if rank == 0:
        say(f"checkpoint_{step:08d} saved ({seconds:.1f}s)")
    return seconds


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
            load_extra: Callable[[str], None] | None = None) -> tuple[dict, float]:
    """Load every engine's shards and this rank's RNG state; return (the trainer state, seconds it took).

    `load_extra(folder)` reads anything else the loop saved in the checkpoint (e.g. an EMA under meta/)."""
    t0 = time.perf_counter()
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, TRAINER_STATE)) as f:
            state = json.load(f)
        if state["world_size"] != world_size:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} was written by {state['world_size']} workers; this run has "
                f"{world_size}. Resume with cluster.num_workers={state['world_size']} or start a new run name.")
        for name, engine in engines.items():
            load_path, _ = engine.load_checkpoint(d, tag=state["tags"][name])
            if load_path is None:
                raise RuntimeError(f"checkpoint {checkpoint.path}: no DeepSpeed shards for {name}")
        rng_file = os.path.join(d, "rng", f"rank{rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        if load_extra:
            load_extra(d)
    seconds = time.perf_counter() - t0
    if rank == 0:
        say(f"resumed from {checkpoint.path} at step {state['step']} (epoch {state['epoch']}, step "
              f"{state['epoch_step']} of it) in {seconds:.1f}s")
    return state, seconds
