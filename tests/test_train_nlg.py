"""End to end on real Ray, DeepSpeed and parquet: train, checkpoint, resume, export, generate, TensorBoard."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, ray_job_env, run_job

pytestmark = pytest.mark.slow


def train_args(data: str, storage: Path, name: str, *sets: str) -> list[str]:
    args = ["--recipe", "tiny", "--data", data, "--storage", str(storage), "--name", name]
    for s in sets:
        args += ["--set", s]
    return args


def train(data, storage, name, *sets, timeout=600, env=None):
    r = run_job("train_nlg.py", *train_args(data, storage, name, *sets), timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def final_val_loss(stdout: str) -> float:
    return float(re.search(r"^done: run \S+ at step \d+, val loss ([0-9.]+)", stdout, re.M).group(1))


def tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["tensors"]


def test_one_worker_trains_logs_exports_and_generates(char_dataset, tmp_path):
    r = train(char_dataset, tmp_path, "one", "train.max_steps=60")
    assert "step 60/60" in r.stdout and "exported the model" in r.stdout
    # The console: progress, evaluations, checkpoints and the summary; Ray's own output stays in its logs.
    assert re.search(r"^step 30/60 \| loss [0-9.]+ \| lr \S+ \| tok/s [0-9,]+ \| eta \d+m\d\ds$", r.stdout, re.M)
    assert re.search(r"^step 60: val loss [0-9.]+ \(perplexity", r.stdout, re.M)
    assert "checkpoint_00000060 saved" in r.stdout and "done: run one at step 60" in r.stdout
    for chatter in ("RayTrainWorker", "TrainingReport(", "core_worker", "worker processes have been started",
                    "(raylet)", "Execution plan", "Token authentication"):
        assert chatter not in r.stdout + r.stderr, chatter
    scalars, tensors = tensorboard(tmp_path / "one")
    losses = [v for _, v in scalars["train/loss"]]
    assert losses[-1] < losses[0] - 0.5, losses
    assert {"val/loss", "val/perplexity", "train/lr", "perf/tokens_per_s"} <= set(scalars)
    assert any(t.startswith("samples") for t in tensors)
    export = tmp_path / "one" / "export"
    assert {"export.json", "model.safetensors", "model_config.json", "tokenizer.json", "recipe.yaml", "hf"} <= {
        p.name for p in export.iterdir()}

    gen = ["--checkpoint", str(tmp_path / "one"), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "7"]
    a, b = run_job("generate.py", *gen), run_job("generate.py", *gen)
    assert a.returncode == 0, a.stderr
    assert "ROMEO:" in a.stdout and a.stdout == b.stdout  # same seed, same text
    assert len(a.stdout.split("ROMEO:", 1)[1].strip()) > 20


@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_with_zero_stage(stage, char_dataset, tmp_path):
    name = f"zero{stage}"
    r = train(char_dataset, tmp_path, name, "cluster.num_workers=2", f"deepspeed.zero_stage={stage}",
              "train.max_steps=40")
    assert f"2 worker(s), ZeRO-{stage}" in r.stdout
    scalars, _ = tensorboard(tmp_path / name)
    losses = [v for _, v in scalars["train/loss"]]
    assert losses[-1] < losses[0] - 0.5, losses
    # Both ranks' ZeRO shards were merged into one checkpoint folder.
    ckpt = tmp_path / name / "checkpoint_00000030"
    shards = {p.name for p in (ckpt / "model-step00000030").iterdir()}
    assert any("rank_1" in s for s in shards) and any("rank_0" in s for s in shards), shards
    assert {p.name for p in (ckpt / "rng").iterdir()} == {"rank0.pt", "rank1.pt"}
    # An intermediate checkpoint is consolidated from its shards for sampling.
    g = run_job("generate.py", "--checkpoint", str(ckpt), "--max-new-tokens", "20")
    assert g.returncode == 0, g.stderr
    assert "(step 30)" in g.stdout


PEAK_FLOPS = 1e12


@pytest.fixture(scope="module")
def zero0_and_zero3(char_dataset, tmp_path_factory) -> dict[int, tuple[str, Path]]:
    """The same 2-worker run (same seed, data and steps) under ZeRO-0 and ZeRO-3, with train.peak_flops set:
    {stage: (console output, run folder)}."""
    storage = tmp_path_factory.mktemp("zero0-zero3")
    sets = ("cluster.num_workers=2", "train.max_steps=6", "train.warmup_steps=1", "train.log_interval=2",
            "train.eval_interval=6", "train.checkpoint_interval=6", "train.sample_interval=0",
            f"train.peak_flops={PEAK_FLOPS}")
    return {stage: (train(char_dataset, storage, f"zero{stage}", *sets, f"deepspeed.zero_stage={stage}").stdout,
                    storage / f"zero{stage}") for stage in (0, 3)}


def test_parameter_count_and_mfu_do_not_depend_on_the_zero_stage(zero0_and_zero3):
    """Counted before ZeRO-3 partitions the parameters: the start line and MFU are the model's under every stage
    (MFU = FLOPs/token x tokens/s / (peak x workers), so MFU / tokens/s is exact, free of timing noise)."""
    import json

    from genai.models.gpt import GPT, GPTConfig

    starts = {}
    for stage, (stdout, run) in zero0_and_zero3.items():
        m = re.search(rf"^model: ([0-9.]+)M parameters, ([0-9.]+) MFLOPs/token; 2 worker\(s\), ZeRO-{stage},",
                      stdout, re.M)
        assert m, stdout[-3000:]
        starts[stage] = m.groups()
        model = GPT(GPTConfig(**json.loads((run / "export" / "model_config.json").read_text())))
        flops_per_token = model.flops_per_token(32)  # tiny: seq_len = model.block_size = 32
        scalars, _ = tensorboard(run)
        mfu, tokens_per_s = dict(scalars["perf/mfu"]), dict(scalars["perf/tokens_per_s"])
        assert sorted(mfu) == [2, 4, 6] and all(v > 0 for v in mfu.values())
        for step, value in mfu.items():
            assert value / tokens_per_s[step] == pytest.approx(flops_per_token / (PEAK_FLOPS * 2), rel=1e-5)
    assert starts[0] == starts[3] and float(starts[0][0]) > 0 and float(starts[0][1]) > 0, starts


def test_a_zero3_export_equals_the_zero0_export_of_the_same_run(zero0_and_zero3):
    """ZeRO-3 consolidates its sharded fp32 weights one parameter at a time; the result is the ZeRO-0 model."""
    import json

    import torch
    from safetensors.torch import load_file

    from genai.models.gpt import GPT, GPTConfig

    (_, run0), (_, run3) = zero0_and_zero3[0], zero0_and_zero3[3]
    zero0, zero3 = (load_file(run / "export" / "model.safetensors") for run in (run0, run3))
    assert zero0.keys() == zero3.keys() and all(v.dtype == torch.float32 for v in zero3.values())
    for key in zero0:
        torch.testing.assert_close(zero3[key], zero0[key], rtol=1e-4, atol=1e-5, msg=key)
    torch.manual_seed(1337)  # the recipe's seed: the weights both runs started from
    start = GPT(GPTConfig(**json.loads((run0 / "export" / "model_config.json").read_text()))).state_dict()
    assert max((zero0[k] - start[k]).abs().max().item() for k in zero0) > 1e-3  # they trained


def test_optimizer_offload_to_cpu_trains(char_dataset, tmp_path):
    r = train(char_dataset, tmp_path, "offload", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu",
              "train.max_steps=30")
    losses = [v for _, v in tensorboard(tmp_path / "offload")[0]["train/loss"]]
    assert losses[-1] < losses[0] - 0.5, losses
    assert "exported the model" in r.stdout


def test_rerun_with_the_same_name_continues_from_the_last_checkpoint(char_dataset, tmp_path):
    fixed = ("train.lr_decay_steps=40", "train.checkpoint_interval=10")
    train(char_dataset, tmp_path, "again", "train.max_steps=20", *fixed)
    r = run_job("train_nlg.py", *train_args(char_dataset, tmp_path, "again", "train.max_steps=40", *fixed),
                "--verbose")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert re.search(r"resumed from \S+checkpoint_00000020 at step 20", r.stdout), r.stdout[-3000:]
    assert "(RayTrainWorker pid=" in r.stdout  # --verbose: the workers' own output, as Ray streams it
    assert "step 40/40" in r.stdout and "step  5/40" not in r.stdout
    scalars, _ = tensorboard(tmp_path / "again")
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def adam_steps(checkpoint: Path) -> set[int]:
    """Every Adam `step` count in a checkpoint's ZeRO optimizer files (whatever their nesting)."""
    import torch

    found: set[int] = set()

    def walk(obj):
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key == "step" and isinstance(value, (int, torch.Tensor)):
                    found.add(int(value))
                else:
                    walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    for shard in checkpoint.glob("*/*optim_states.pt"):
        walk(torch.load(shard, map_location="cpu", weights_only=False))
    return found


@pytest.mark.parametrize("stage", [2, 3])
def test_a_run_resumes_on_fewer_then_more_workers_with_its_optimizer_state(stage, char_dataset, tmp_path):
    """2 -> 1 -> 2 workers (issue 14 part 5): each resume reshards the ZeRO checkpoint (DeepSpeed's universal
    layout), says so, and goes on from the next step with Adam's state carried (its step count is the run's, not
    the steps since the resize) and the loss where it was, not back at a fresh model's."""
    fixed = (f"deepspeed.zero_stage={stage}", "train.lr_decay_steps=30", "train.checkpoint_interval=10",
             "train.log_interval=1", "train.eval_interval=10", "train.sample_interval=0")
    train(char_dataset, tmp_path, "resized", "cluster.num_workers=2", "train.max_steps=10", *fixed)
    for workers, steps in ((1, 20), (2, 30)):
        r = train(char_dataset, tmp_path, "resized", f"cluster.num_workers={workers}", f"train.max_steps={steps}",
                  *fixed)
        assert f"resharded from {3 - workers} to {workers} workers (optimizer state carried)" in r.stdout, \
            r.stdout[-3000:]
        assert "epoch 0 restarts its data from the beginning" in r.stdout
        resumed_from = tmp_path / "resized" / f"checkpoint_{steps - 10:08d}"
        assert (resumed_from / "universal").is_dir()  # converted once, beside the shards
        assert adam_steps(tmp_path / "resized" / f"checkpoint_{steps:08d}") == {steps}
    scalars, _ = tensorboard(tmp_path / "resized")
    loss = dict(scalars["train/loss"])
    assert sorted(loss) == list(range(1, 31))  # every step once, none trained again
    for resumed in (11, 21):  # no jump back towards the untrained model's loss
        assert loss[resumed] < loss[1] - 0.5 * (loss[1] - loss[resumed - 1]), loss


def test_changing_the_model_of_an_existing_run_is_refused(char_dataset, tmp_path):
    (tmp_path / "shape").mkdir()
    (tmp_path / "shape" / "recipe.yaml").write_text("model: {n_layer: 9}\n")
    r = run_job("train_nlg.py", *train_args(char_dataset, tmp_path, "shape"))
    assert r.returncode == 2
    assert "exists with model.n_layer=9" in r.stderr and "Traceback" not in r.stderr


def test_killed_worker_is_restarted_and_training_ends_as_if_uninterrupted(char_dataset, tmp_path, fault_report):
    sets = ("cluster.num_workers=2", "deepspeed.zero_stage=2", "train.max_steps=400", "train.eval_interval=50",
            "train.checkpoint_interval=50", "train.log_interval=50", "train.sample_interval=0")
    # On an embedded Ray like the killed run's: how Ray Data splits rows between workers follows the cluster's CPUs.
    reference = final_val_loss(train(char_dataset, tmp_path, "reference", *sets, env={"RAY_ADDRESS": ""}).stdout)

    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train_nlg.py"),
                             *train_args(char_dataset, tmp_path, "killed", *sets)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    # Once checkpoint 100 is being written, Ray has registered checkpoint 50 (report is a barrier).
    marker = tmp_path / "killed" / "checkpoint_00000100" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)  # this run's embedded Ray only
               if "RayTrainWorker" in " ".join(p.cmdline())]
    assert marker.exists() and workers, "no checkpoint or no worker to kill"
    workers[-1].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    m = re.search(r"resumed from \S+checkpoint_00000(050|100) at step (50|100)\b", out)
    assert m, out[-4000:]
    # Same steps, same data order, same RNG: the resumed run ends where the uninterrupted one did.
    assert final_val_loss(out) == pytest.approx(reference, abs=1e-4)
    fault_report("a worker SIGKILLed while checkpoint 100 was being written", int(m.group(2)),
                 100 - int(m.group(2)), "the final validation loss equals the uninterrupted run's")


def test_interrupted_driver_checkpoints_and_the_run_resumes(char_dataset, tmp_path, fault_report):
    """Ctrl-C (or a SIGTERM from Kubernetes / ray job stop) loses nothing: the workers checkpoint the step
    they are on, the driver exits 130, and rerunning continues from exactly that step. The resumed run is
    interrupted again (SIGTERM this time) and resumed once more."""
    sets = ("train.max_steps=20000", "train.checkpoint_interval=100000", "train.log_interval=5",
            "train.eval_interval=100000", "train.sample_interval=0")
    step = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train_nlg.py"),
                                 *train_args(char_dataset, tmp_path, "stopped", *sets)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env=ray_job_env())
        lines = []
        for line in proc.stdout:
            lines.append(line)
            at = re.search(r"step\s+(\d+)/", line)
            if at and int(at.group(1)) >= step + 20:
                proc.send_signal(sig)
                break
        out = "".join(lines) + proc.communicate(timeout=300)[0]
        assert proc.returncode == 130, out[-4000:]
        if step:
            assert re.search(rf"resumed from \S+ at step {step}\b", out), out[-3000:]
        m = re.search(r"stopped at step (\d+) with a checkpoint; resume with: --name stopped", out)
        assert m, out[-4000:]
        assert int(m.group(1)) >= step + 20
        step = int(m.group(1))
        assert (tmp_path / "stopped" / f"checkpoint_{step:08d}" / "trainer_state.json").exists()
        fault_report(f"{sig.name} to the driver", step, 0, "the workers checkpointed the step they were on")

    r = train(char_dataset, tmp_path, "stopped", *sets[1:], f"train.max_steps={step + 5}")
    assert re.search(rf"resumed from \S+ at step {step}\b", r.stdout), r.stdout[-3000:]
    assert f"step {step + 5}/{step + 5}" in r.stdout


def test_bad_input_fails_fast_with_one_line_and_exit_2(char_dataset, tmp_path):
    cases = [
        (["--set", "train.lr=fast"], "train.lr: Input should be a valid number"),
        (["--set", "model.block_size=16", "--set", "train.seq_len=32"], "train.seq_len=32 is larger"),
        (["--data", str(tmp_path / "nowhere")], "no manifest.json"),
        (["--recipe", "nope"], "neither a file nor a shipped recipe"),
        (["--set", "train.micro_batch_size=100000"], "too few"),
        (["--storage", "ftp://x/y"], "unsupported scheme"),
    ]
    for extra, message in cases:
        args = ["--recipe", "tiny", "--data", char_dataset, "--storage", str(tmp_path), *extra]
        t0 = time.time()
        r = run_job("train_nlg.py", *args)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert time.time() - t0 < 30  # refused before Ray starts
    # A GPU run on a Ray without GPUs is not retried by Ray Train every 60 s: the embedded Ray refuses it at
    # once, a cluster (which an autoscaler might grow) after cluster.resource_wait_s.
    gpu = ["--recipe", "tiny", "--data", char_dataset, "--storage", str(tmp_path), "--set", "cluster.use_gpu=true"]
    for env, waited in (({"RAY_ADDRESS": ""}, ""), (None, " after waiting 1s")):
        r = run_job("train_nlg.py", *gpu, "--set", "cluster.resource_wait_s=1", env=env)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"cannot hold 1 worker(s) of 0.5 CPU + 1 GPU: its nodes hold 0 (0 GPU(s) in all){waited};" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert list(tmp_path.iterdir()) == []  # nothing written
