"""Resharded resume (genai/train/reshard.py): a checkpoint written by 2 workers resumes on 1 and one written by 1
resumes on 2, with the fp32 master weights, Adam's moments and step counts, and the learning-rate schedule carried
exactly, under ZeRO 0-3 in fp32 and bf16 (and ZeRO-2/3 with the optimizer offloaded), for an engine with a
schedule and two parameter groups (a GPT's) and one without (a GAN network's). Real DeepSpeed engines, one process
per rank (CPU, gloo; no Ray): tests/reshard_check.py, every case in one launch per phase (2 ranks save, 1 rank
resumes and saves, 2 ranks resume)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

CASES = [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"),
         (2, "bf16:offload"), (3, "bf16:offload")]
IDS = [f"zero{stage}-{precision.replace(':', '-')}" for stage, precision in CASES]


def run_ranks(world: int, cases: list[dict]) -> None:
    """tests/reshard_check.py's `cases` on `world` ranks of one gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "reshard_check.py"), json.dumps(cases)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} of {world}:\n{out[-4000:]}"


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """Per case: a (2 ranks train 3 steps and save), b (1 rank resumes a, trains 2 steps and saves), c (2 ranks
    resume b)."""
    root = tmp_path_factory.mktemp("reshard")
    phases: dict = {"a": [], "b": [], "c": []}
    for (stage, precision), name in zip(CASES, IDS):
        d = root / name
        common = dict(stage=stage, precision=precision.split(":")[0], offload=precision.endswith(":offload"))
        phases["a"].append(dict(common, steps=3, save=str(d / "two"), out=str(d / "a.pt")))
        phases["b"].append(dict(common, load=str(d / "two"), steps=2, save=str(d / "one"), out=str(d / "b.pt")))
        phases["c"].append(dict(common, load=str(d / "one"), out=str(d / "c.pt")))
    broken = root / "broken"  # a 2-rank ZeRO-2 checkpoint that lost its optimizer shards
    phases["b"].append(dict(stage=2, precision="fp32", load=str(broken), expect_error=True, out=str(broken / "b.pt")))
    for phase, world in (("a", 2), ("b", 1), ("c", 2)):
        if phase == "b":
            shutil.copytree(root / "zero2-fp32" / "two", broken)
            for f in broken.glob("*/*optim_states.pt"):
                f.unlink()
        run_ranks(world, phases[phase])
    out = {name: {phase: torch.load(root / name / f"{phase}.pt", weights_only=False) for phase in phases}
           for name in IDS}
    out["broken"] = torch.load(broken / "b.pt", weights_only=False)
    return out


def assert_same(got: dict, saved: dict, what: str) -> None:
    assert got.keys() == saved.keys(), what
    for k in saved:
        assert torch.equal(got[k], saved[k]), f"{what} {k}: max diff {(got[k] - saved[k]).abs().max().item()}"


def assert_carried(resumed: dict, saved: dict) -> None:
    for name in ("model", "critic"):
        got, ref = resumed[name], saved[f"saved_{name}"]
        assert_same(got["weights"], ref["weights"], f"{name} fp32 master weights")
        assert_same(got["moments"], ref["moments"], f"{name} Adam moments")
        assert any(v.abs().sum() > 0 for v in ref["moments"].values()), name  # trained, not freshly zero
        assert got["adam_steps"] == ref["adam_steps"] != [], name
        assert (got["global_steps"], got["sched_step"], got["lrs"]) == (ref["global_steps"], ref["sched_step"],
                                                                       ref["lrs"]), name


@pytest.mark.parametrize("case", IDS)
def test_two_workers_checkpoint_resumes_on_one_with_its_optimizer_state(reports, case):
    a, b = reports[case]["a"], reports[case]["b"]
    assert_carried(b, a)
    assert b["model"]["sched_step"] == 3 and b["saved_model"]["sched_step"] == 5  # the schedule goes on
    assert b["saved_model"]["adam_steps"] == [b["model"]["adam_steps"][0] + 2]  # Adam's counter goes on too


@pytest.mark.parametrize("case", IDS)
def test_one_workers_checkpoint_resumes_on_two_with_its_optimizer_state(reports, case):
    b, c = reports[case]["b"], reports[case]["c"]
    assert_carried(c, b)
    assert c["restored_state"]["world_size"] == 2 and c["restored_state"]["step"] == 5


def test_a_resized_resume_restarts_the_epochs_data_and_says_so(reports):
    b = reports["zero2-fp32"]["b"]
    assert b["restored_state"] == {"step": 3, "epoch": 0, "epoch_step": 0, "world_size": 1,
                                   "tags": {"model": "model-step00000003", "critic": "critic-step00000003"}}
    log = b["restore_log"]
    assert "at step 3 (epoch 0, step 3 of it)" in log
    assert "resharded from 2 to 1 workers" in log and "the rows of its first 3 steps are seen again" in log


def test_a_checkpoint_that_cannot_be_resharded_fails_in_one_line(reports):
    error = reports["broken"]["error"]
    assert "\n" not in error
    assert error.startswith("cannot reshard checkpoint ") and "from 2 to 1 workers" in error
    assert "ZeRO-2" in error and "optim_states.pt" in error
