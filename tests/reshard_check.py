"""One rank of a resharded-resume check (CPU, gloo; no Ray) for tests/test_reshard.py.

    python tests/reshard_check.py '[{"stage": 2, "precision": "fp32", "load": DIR|null, "save": DIR|null,
                                     "out": FILE, "steps": N, "expect_error": false}, ...]'

with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment. Builds two engines the way the
families do (a tiny GPT with AdamW's two groups and the GPT family's LR schedule, as the "model"; a small MLP with
torch's Adam and no schedule, as a GAN's "critic"), from the project's DeepSpeed config for this world size; for
each case restores them from `load` through genai.train.checkpoint.restore when given, trains `steps` steps on a
fixed token stream (each rank its own), writes a checkpoint to `save` with the project's write_checkpoint when
given, and on rank 0 saves to `out` what the test compares: the fp32 master weights, the Adam moments assembled whole
(gathered from every rank under ZeRO 1-3), the optimizer's step counts, the schedule's step and learning rates,
and the trainer state restore returned (or, with expect_error, restore's error).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.ray_env import op_cache_dir  # noqa: E402

os.environ.setdefault("TORCH_EXTENSIONS_DIR", op_cache_dir())

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed  # noqa: E402

from cluster.deepspeed_config import build_deepspeed_config  # noqa: E402
from genai.models.gpt import GPT, GPTConfig  # noqa: E402
from genai.train.checkpoint import master_weights, restore, write_checkpoint  # noqa: E402
from genai.train.images import adam_engine  # noqa: E402
from genai.train.nlg import _lr_scheduler  # noqa: E402
from genai.train.steps import lm_step  # noqa: E402

MICRO, ACCUM = 2, 2


class LocalCheckpoint:
    """What restore needs of a ray.train.Checkpoint: a path and as_directory()."""

    def __init__(self, path: str):
        self.path = path

    def as_directory(self):
        from contextlib import nullcontext

        return nullcontext(self.path)


def moments(engine) -> dict:
    """Every parameter's Adam moments (whole, fp32, on the CPU) and the optimizer's step count, by parameter name.
    Every rank calls it (collective under ZeRO 1-3)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out, steps = {}, set()
    if engine.zero_optimization_stage() == 0:
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's bf16 wrapper holds torch's
        flat = [p for g in inner.param_groups for p in g["params"]]
        for i, p in enumerate(flat):  # one tensor per parameter (fp32) or per group (the bf16 wrapper's flat copy)
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{i}.{key}"] = inner.state[p][key].detach().float().cpu().clone()
            steps.add(float(inner.state[p]["step"]))
    elif engine.zero_optimization_stage() == 3:
        for name, p in engine.module.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
        steps = {float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s}
    else:  # ZeRO 1-2: from the flat partitions' state (DeepSpeed links per-parameter views of it lazily, and
        # under several groups on 2 ranks some stay empty, so safe_get_full_optimizer_state cannot be used)
        opt = engine.optimizer
        flats = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_groups_flat_partition
        for name, p in engine.module.named_parameters():
            m = p._hp_mapping
            for key in ("exp_avg", "exp_avg_sq"):
                whole = torch.zeros(p.numel(), dtype=torch.float32)
                if m is not None:
                    part = opt.optimizer.state[flats[m.param_group_index]][key]
                    whole.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel).copy_(
                        part.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel))
                torch.distributed.all_reduce(whole)
                out[f"{name}.{key}"] = whole.view(p.shape)
        steps = {float(s["step"]) for s in opt.optimizer.state.values() if "step" in s}
    return {"moments": out, "adam_steps": sorted(steps)}


def snapshot(engine, rank: int) -> dict:
    """What a resume must carry of one engine (collective)."""
    sched = engine.lr_scheduler
    return dict(moments(engine), weights=master_weights(engine, rank), global_steps=engine.global_steps,
                lrs=[g["lr"] for g in engine.optimizer.param_groups],
                sched_step=None if sched is None else sched.last_epoch)


def build(stage: int, precision: str, world: int, offload: bool = False) -> dict:
    train = SimpleNamespace(micro_batch_size=MICRO, grad_accum=ACCUM, grad_clip=1.0, precision=precision, lr=1e-2,
                            beta1=0.9, beta2=0.95, weight_decay=0.1, warmup_steps=2, batch_size=MICRO)
    ds = SimpleNamespace(zero_stage=stage, offload_optimizer="cpu" if offload else "none", offload_param="none",
                         overlap_comm=False,
                         reduce_bucket_size=5e8, config_overrides={})
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    groups = gpt.optimizer_groups(train.weight_decay)
    config = build_deepspeed_config(ds, train, world, False)
    optimizer = None if offload else torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2))
    model, _, _, _ = deepspeed.initialize(  # with offload DeepSpeed builds its CPU AdamW (the config's optimizer)
        model=gpt, optimizer=optimizer, model_parameters=groups if offload else None, config=config,
        lr_scheduler=_lr_scheduler(train, 1e-3, 20))
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    critic_cfg = build_deepspeed_config(ds, SimpleNamespace(**dict(vars(train), grad_accum=1)), world, False)
    critic = adam_engine(mlp, critic_cfg, 5e-3, (0.5, 0.9))
    return {"model": model, "critic": critic}


def train(engines: dict, step0: int, steps: int, rank: int) -> None:
    model, critic = engines["model"], engines["critic"]
    for step in range(step0, step0 + steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        lm_step(model, iter(torch.randint(0, 64, (ACCUM, MICRO, 17), generator=g)), ACCUM, torch.device("cpu"))
        x = torch.randn(MICRO, 16, generator=g).to(next(critic.module.parameters()).dtype)
        loss = critic(x).float().pow(2).mean()
        critic.backward(loss)
        critic.step()


def check(case: dict, rank: int, world: int) -> None:
    """One case: restore from `load` (when given), train `steps`, save to `save` (when given), report to `out`."""
    engines = build(case["stage"], case["precision"], world, case.get("offload", False))
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "world_size": world}
    log = io.StringIO()
    if case.get("expect_error"):
        try:
            restore(LocalCheckpoint(case["load"]), engines, rank, world)
        except RuntimeError as e:
            if rank == 0:
                torch.save({"error": str(e)}, case["out"])
            return
        raise AssertionError("restore did not fail")
    if case.get("load"):
        with contextlib.redirect_stdout(log):
            state, _ = restore(LocalCheckpoint(case["load"]), engines, rank, world)
    report = {"restored_state": dict(state), "restore_log": log.getvalue()}
    if case.get("load"):
        report.update({name: snapshot(engine, rank) for name, engine in engines.items()})
    if case.get("steps"):
        train(engines, state["step"], case["steps"], rank)
        state = dict(state, step=state["step"] + case["steps"], epoch_step=state["epoch_step"] + case["steps"])
    if case.get("save"):
        write_checkpoint(case["save"], engines, state, rank)
        report.update({f"saved_{name}": snapshot(engine, rank) for name, engine in engines.items()})
    if rank == 0:
        report["optimizer"] = type(engines["model"].optimizer).__name__
        torch.save(report, case["out"])


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    for case in json.loads(sys.argv[1]):
        check(case, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
