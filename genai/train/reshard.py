"""Resharded resume: a checkpoint saved by N data-parallel workers loaded by M != N workers, optimizer state included.

Under ZeRO 1-3 each rank saved its own partition of the fp32 master weights and the Adam moments, cut for N ranks,
and DeepSpeed refuses to load them on another world size. DeepSpeed's universal checkpoint
(deepspeed/checkpoint/ds_to_universal.py) rewrites them as one whole tensor per parameter and state
(`zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt`), which any world size loads with the config's
`checkpoint.load_universal` (each ZeRO optimizer's `_load_universal_checkpoint`). The engine's learning-rate
scheduler, global step and loss scaler come from the model-states file, copied as it was.

ZeRO-0 needs nothing: its optimizer state (torch's Adam, or DeepSpeed's fp16/bf16 wrapper with its fp32 copies) is
whole on every rank and rank 0 saves it in `mp_rank_00_model_states.pt`, which DeepSpeed loads on any world size.

The saving world size is the trainer state's `world_size` (genai/train/checkpoint.py writes it with every
checkpoint; DeepSpeed's own files also hold it as `dp_world_size`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
from dataclasses import dataclass

import torch

UNIVERSAL_DIR = "universal"  # beside the engines' tag folders: universal/<tag>/ (kept with a local checkpoint)


@dataclass
class LoadSpec:
    """What one engine's load_checkpoint is called with: the folder, the tag, and whether DeepSpeed reads it as a
    universal checkpoint (config checkpoint.load_universal)."""

    load_dir: str
    tag: str
    universal: bool


def load_spec(engine, folder: str, tag: str, saved_world: int, world: int) -> LoadSpec:
    """How `engine` (every rank calls this, collectively) loads its shards `folder/tag`, saved by `saved_world`
    workers, on this run's `world` workers. On another world size under ZeRO 1-3 the shards are converted to the
    universal layout under `folder/universal/<tag>` once: by the first rank of each node that sees the folder
    (ranks on one node share Ray's download; nodes do not), the others waiting. Raises RuntimeError (one line)
    when the conversion fails, on every rank."""
    if saved_world == world or engine.zero_optimization_stage() == 0:
        return LoadSpec(folder, tag, universal=False)
    import torch.distributed as dist

    out_dir = os.path.join(folder, UNIVERSAL_DIR)
    key = (socket.gethostname(), os.path.realpath(folder))
    keys: list = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    error = None
    if keys.index(key) == dist.get_rank() and not os.path.isdir(os.path.join(out_dir, tag, "zero")):
        try:
            convert_to_universal(os.path.join(folder, tag), out_dir)
        except Exception as e:  # noqa: BLE001 - any failure becomes the one line every rank raises
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)  # the barrier: nobody loads before its node's conversion is done
    failed = next((e for e in errors if e), None)
    if failed:
        raise RuntimeError(f"cannot reshard checkpoint {folder} (engine tag {tag}, ZeRO-"
                           f"{engine.zero_optimization_stage()}) from {saved_world} to {world} workers: {failed}")
    return LoadSpec(out_dir, tag, universal=True)


def convert_to_universal(tag_dir: str, out_dir: str) -> str:
    """DeepSpeed's ds_to_universal of one engine's shards `tag_dir` into `out_dir/<tag>`, written beside it first
    and renamed into place (a half-written conversion is never found). Returns the converted folder."""
    from deepspeed.checkpoint import ds_to_universal

    tag = os.path.basename(os.path.normpath(tag_dir))
    final = os.path.join(out_dir, tag)
    scratch = f"{out_dir}.tmp-{socket.gethostname()}-{os.getpid()}"
    args = argparse.Namespace(input_folder=tag_dir, output_folder=os.path.join(scratch, tag),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)  # our engines save no universal info
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
        os.makedirs(out_dir, exist_ok=True)
        try:
            os.rename(args.output_folder, final)
        except OSError:
            if not os.path.isdir(os.path.join(final, "zero")):  # not another node's finished conversion
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


@contextlib.contextmanager
def loading(engine, spec: LoadSpec):
    """The engine's config reads the checkpoint as universal for the duration of the load (DeepSpeed consults
    `checkpoint.load_universal` only in load_checkpoint), and as before afterwards."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = spec.universal or before
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
    if spec.universal:
        _unshare_steps(engine.optimizer)


def _unshare_steps(optimizer) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load gives every sub-group's Adam state the same `step` tensor, which
    torch's Adam increments in place: with two groups each optimizer step would count twice (and skew the bias
    correction). Each state gets its own copy."""
    inner = getattr(optimizer, "optimizer", None)
    for state in getattr(inner, "state", {}).values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = step.clone()
