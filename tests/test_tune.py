"""Sweeps: sweep files are validated before Ray starts; ASHA stops bad trials; a crashing trial does not stop the sweep."""

from __future__ import annotations

import csv

import pytest
import yaml

from conftest import run_job
from genai.config import ConfigError, load_sweep

SWEEP = {
    "name": "t",
    "base_recipe": "tiny",
    "overrides": ["train.max_steps=60", "train.eval_interval=10", "train.checkpoint_interval=20",
                  "train.sample_interval=0"],
    "parameters": {"train.lr": {"grid": [3.0e-3, 1.0e-5]}, "train.micro_batch_size": {"grid": [8, 100000]}},
    "search": "grid",
    "scheduler": {"type": "asha", "grace_period": 20, "reduction_factor": 2},
    "num_samples": 1,
    "max_concurrent_trials": 1,
}


def write(tmp_path, **changes):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, **changes}))
    return str(path)


def test_shipped_sweeps_are_valid():
    sweep, base = load_sweep("sweeps/nlg-lr-width.yaml")
    assert sweep.scheduler.type == "asha" and base.train.max_steps == 60 and set(sweep.parameters) == {
        "train.lr", "model.n_embd"}
    sweep, base = load_sweep("sweeps/nlg-shakespeare-asha.yaml")
    assert base.name == "shakespeare-char" and sweep.num_samples == 8
    sweep, base = load_sweep("sweeps/nlg-optuna.yaml")
    assert sweep.search == "optuna" and sweep.scheduler.type == "asha" and base.name == "shakespeare-char"
    sweep, base = load_sweep("sweeps/nlg-pbt.yaml")
    assert sweep.scheduler.type == "pbt" and sweep.scheduler.perturbation_interval % base.train.checkpoint_interval == 0


@pytest.mark.parametrize("changes, message", [
    ({"parameters": {"train.lrr": {"grid": [1]}}}, "parameters.train.lrr=1 gives an invalid recipe"),
    ({"parameters": {"train.lr": {"uniform": [1, 0.1]}}, "search": "random"}, "low 1.0 must be below high 0.1"),
    ({"parameters": {"train.lr": {"choice": [1], "grid": [2]}}}, "give exactly one of"),
    ({"parameters": {"model.n_head": {"grid": [3]}}}, "not divisible by model.n_head=3"),
    ({"search": "random"}, "grid values need search=grid"),
    ({"search": "optuna"}, "grid values need search=grid (use choice for optuna search"),
    ({"search": "optuna", "scheduler": {"type": "pbt"}, "parameters": {"train.lr": {"loguniform": [1e-4, 1e-2]}}},
     "search=optuna with scheduler.type=pbt: PBT picks the new values itself"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler.type"),
    ({"scheduler": {"type": "pbt"}, "parameters": {"model.n_embd": {"grid": [32, 64]}}},
     "parameters.model.n_embd: PBT continues trials from other trials' checkpoints"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 15}, "parameters": {"train.lr": {"grid": [1e-3, 1e-2]}}},
     "scheduler.perturbation_interval=15 is not a multiple of the base recipe's train.checkpoint_interval=20"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 60}, "parameters": {"train.lr": {"grid": [1e-3, 1e-2]}}},
     "scheduler.perturbation_interval=60 must be below train.max_steps=60"),
    ({"metricz": "x"}, "metricz: unknown field"),
])
def test_bad_sweep_files_are_refused_with_the_field(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_sweep(write(tmp_path, **changes))
    r = run_job("tune.py", "--sweep", write(tmp_path, **changes))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_asha_stops_the_bad_trial_and_a_crashing_trial_does_not_stop_the_sweep(char_dataset, tmp_path):
    r = run_job("tune.py", "--sweep", write(tmp_path), "--storage", str(tmp_path / "runs"),
                "--set", f"data.uri={char_dataset}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "runs" / "t" / "results.csv")))
    by = {(float(row["train.lr"]), int(row["train.micro_batch_size"])): row for row in rows}
    assert len(rows) == 4
    # micro-batches larger than the dataset: those trials fail; the others still run.
    assert by[(3e-3, 100000)]["status"] == by[(1e-5, 100000)]["status"] == "ERROR"
    assert "too few" in by[(3e-3, 100000)]["error"]
    good, bad = by[(3e-3, 8)], by[(1e-5, 8)]
    assert good["status"] == "DONE" and int(good["step"]) == 60
    assert bad["status"] == "STOPPED" and int(bad["step"]) < 60  # ASHA stopped it early
    assert float(good["final_val_loss"]) < float(bad["final_val_loss"])
    best = yaml.safe_load((tmp_path / "runs" / "t" / "best-recipe.yaml").read_text())
    assert best["train"]["lr"] == 3e-3 and best["train"]["micro_batch_size"] == 8
    assert (tmp_path / "runs" / "t" / "trials" / good["trial"] / "export" / "export.json").exists()
    # TensorBoard's HParams view: one run per trial with its parameters and final metric.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "t" / "tensorboard" / good["trial"]))
    acc.Reload()
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))
    assert acc.Scalars("hparams/final_val_loss")[0].value == pytest.approx(float(good["final_val_loss"]), rel=1e-5)


@pytest.mark.slow
def test_optuna_tpe_search_with_asha_runs_every_trial_in_the_ranges(char_dataset, tmp_path):
    sweep = write(tmp_path, search="optuna", seed=0, num_samples=4, max_concurrent_trials=2,
                  parameters={"train.lr": {"loguniform": [1.0e-5, 3.0e-3]}, "model.n_embd": {"choice": [32, 48]}},
                  overrides=["train.max_steps=40", "train.eval_interval=10", "train.checkpoint_interval=20",
                             "train.sample_interval=0"], scheduler={"type": "asha", "grace_period": 10})
    r = run_job("tune.py", "--sweep", sweep, "--storage", str(tmp_path / "runs"), "--set", f"data.uri={char_dataset}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "runs" / "t" / "results.csv")))
    assert len(rows) == 4 and {row["status"] for row in rows} <= {"DONE", "STOPPED"}
    assert all(1e-5 <= float(row["train.lr"]) <= 3e-3 and int(row["model.n_embd"]) in (32, 48) for row in rows)
    assert len({row["train.lr"] for row in rows}) == 4
    assert any(int(row["step"]) == 40 for row in rows)
    # The values came from Optuna's sampler: Tune keeps its state beside the experiment (a random search has none).
    assert list((tmp_path / "runs" / "t").glob("searcher-state-*.pkl")), sorted(p.name for p in (tmp_path / "runs" / "t").iterdir())


@pytest.mark.slow
def test_gan_sweep_over_losses_reports_frechet_distance(digits_dataset, classifier, tmp_path):
    sweep = {"name": "g", "base_recipe": "tiny-gan",
             "overrides": ["train.max_steps=20", "train.eval_interval=10", "train.checkpoint_interval=10",
                           "train.eval_samples=200", f"train.classifier={classifier}", f"data.uri={digits_dataset}"],
             "parameters": {"model.loss": {"grid": ["nonsaturating", "hinge", "wgan-gp"]}},
             "search": "grid", "scheduler": {"type": "fifo"}, "metric": "fd", "mode": "min", "num_samples": 1,
             "max_concurrent_trials": 2}
    path = tmp_path / "gan.yaml"
    path.write_text(yaml.safe_dump(sweep))
    r = run_job("tune.py", "--sweep", str(path), "--storage", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "runs" / "g" / "results.csv")))
    assert sorted(row["model.loss"] for row in rows) == ["hinge", "nonsaturating", "wgan-gp"]
    assert all(row["status"] == "DONE" and float(row["final_fd"]) > 0 for row in rows)
    best = yaml.safe_load((tmp_path / "runs" / "g" / "best-recipe.yaml").read_text())
    assert best["kind"] == "gan" and "python jobs/train_gan.py --recipe" in r.stdout


def test_shipped_gan_sweep_is_valid():
    sweep, base = load_sweep("sweeps/gan-loss.yaml")
    assert base.kind == "gan" and sweep.metric == "fd" and len(sweep.parameters["model.loss"].grid) == 3


@pytest.mark.parametrize("path, kind, metric, mode", [("sweeps/vae-beta.yaml", "vae", "val_nelbo", "min"),
                                                     ("sweeps/sr-lr.yaml", "sr", "psnr", "max"),
                                                     ("sweeps/cyclegan-cycle.yaml", "cyclegan", "cycle_l1_a", "min")])
def test_shipped_image_family_sweeps_are_valid(path, kind, metric, mode):
    sweep, base = load_sweep(path)
    assert base.kind == kind and sweep.metric == metric and sweep.mode == mode
    # ASHA compares the metric at each report: every checkpoint interval is an evaluation step
    assert base.train.checkpoint_interval % base.train.eval_interval == 0


@pytest.mark.slow
def test_killed_sweep_driver_resumes_without_retraining_finished_trials(char_dataset, tmp_path):
    import glob
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    # The shipped sweep without early stopping (with it, which trials finish depends on the sampled rates).
    sweep = yaml.safe_load(open(ROOT / "sweeps" / "nlg-lr-width.yaml"))
    sweep["scheduler"] = {"type": "fifo"}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    cmd = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--sweep", str(tmp_path / "sweep.yaml"), "--storage",
           str(tmp_path), "--set", f"data.uri={char_dataset}", "--set", "train.max_steps=40"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def finished() -> dict:
        """Final checkpoints that Ray has registered (a folder still being written is not listed)."""
        done = {}
        for snapshot in glob.glob(str(tmp_path / "nlg-lr-width" / "trials" / "*" / "checkpoint_manager_snapshot.json")):
            names = [r["checkpoint_dir_name"] for r in json.load(open(snapshot))["checkpoint_results"]]
            if "checkpoint_00000040" in names:
                state = os.path.join(os.path.dirname(snapshot), "checkpoint_00000040", "trainer_state.json")
                done[state] = os.path.getmtime(state)
        return done

    deadline = time.time() + 400
    while len(finished()) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    finished = finished()
    assert finished and proc.poll() is None, "sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray die at once
    proc.wait()

    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "sweep nlg-lr-width: 4 trials (0 failed)" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "nlg-lr-width" / "results.csv")))
    assert len(rows) == 4 and all(row["status"] == "DONE" for row in rows)
    # Trials that had finished were not trained again (at most re-evaluated): their final checkpoints are untouched.
    assert {p: os.path.getmtime(p) for p in finished} == finished


@pytest.mark.slow
def test_pbt_continues_the_worse_trial_from_the_better_trials_checkpoint(char_dataset, tmp_path):
    import glob
    import os

    # Two trials, one with a learning rate too small to learn anything in 60 steps. At a perturbation point
    # PBT must clone the good trial's checkpoint into the bad one, which then trains on from that step.
    # synch: the tiny trials run 40 steps in seconds, faster than they start, so without it one trial can
    # finish before the other reports at all. One perturbation point: step 20 (PBT leaves the last step alone).
    path = write(tmp_path, name="p", overrides=["train.max_steps=40", "train.eval_interval=10",
                                                "train.checkpoint_interval=10", "train.sample_interval=0"],
                 parameters={"train.lr": {"grid": [3.0e-3, 1.0e-6]}},
                 scheduler={"type": "pbt", "perturbation_interval": 20, "resample_probability": 0.0,
                            "synch": True},
                 max_concurrent_trials=2)
    r = run_job("tune.py", "--sweep", path, "--storage", str(tmp_path / "runs"), "--set", f"data.uri={char_dataset}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "runs" / "p" / "results.csv")))
    assert len(rows) == 2 and all(row["status"] == "DONE" for row in rows), rows
    cloned = [row for row in rows if row["cloned_from"]]
    assert cloned, f"no exploit happened: {rows}"
    row = cloned[0]
    donor, step = row["cloned_from"].split("@")
    assert donor in {other["trial"] for other in rows} - {row["trial"]} and int(step) == 20
    run = row["run"]
    assert os.path.basename(run) == f"{row['trial']}-from-{donor}-step{step}"
    # The cloned run started from the donor's checkpoint: its first checkpoint is the one after `step`.
    own = sorted(int(p.rsplit("_", 1)[1]) for p in glob.glob(os.path.join(run, "checkpoint_0*")))
    assert own == [30, 40]
    # Both trials end near the good learning rate's loss (~3.4); lr=1e-6 alone stays at the initial ~4.85.
    assert all(float(r_["final_val_loss"]) < 4.0 for r_ in rows), rows
