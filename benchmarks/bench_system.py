"""System bars: checkpoint save/restore time vs model size, time to first step with a cold and a warm
DeepSpeed op cache, and 1 -> 2 worker scaling. Medians of repeated runs, each beside its baseline.

    python benchmarks/bench_system.py [--repeats 3] [--skip-scaling] [--skip-startup] [--skip-checkpoint]

- Checkpoint vs model size: jobs/train_nlg.py on GPT shapes from 0.8M to ~85M parameters (4 steps, a checkpoint
  every 2, then a resumed run); the loop logs each save (DeepSpeed shards + RNG + meta written locally, copied
  to storage and registered by Ray Train: perf/checkpoint_s) and the restore (perf/restore_s); batch 1, since
  only the checkpoint is timed. Baseline: one
  process torch.save / torch.load of the same model and AdamW state to the same folder.
- Time to first step, cold vs warm op cache: the tiny recipe with TORCH_EXTENSIONS_DIR pointing at an empty
  folder (DeepSpeed compiles its CPU communication op in the first run) and then at the filled one. Baseline:
  a plain PyTorch process building the same model and taking one step. Then where a warm start's time goes
  (Ray start, Train controller, worker group, deepspeed.initialize, first Ray Data batch), from the times its
  --verbose lines reach the console.
- Scaling: shakespeare-char, 300 steps, 1 worker and 2 workers (same per-worker batch, ZeRO-2, one thread each):
  tokens/s and its efficiency tokens/s(2) / (2 x tokens/s(1)). On a 2-core machine, 2 workers use every core.

Prints markdown tables and writes benchmarks/out/system.json after each part (a part skipped with --skip-*
keeps its figures from the last run that measured it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_nlg import OUT, ROOT, SHAKESPEARE, shakespeare_dataset, ours

import torch  # noqa: E402

from genai.models.gpt import GPT, GPTConfig  # noqa: E402

SIZES = [(4, 128), (6, 384), (12, 768)]  # (n_layer, n_embd): ~0.8M, ~11M, ~85M parameters


def scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def train(ds: str, storage: Path, name: str, *sets: str, env: dict | None = None) -> float:
    cmd = [sys.executable, str(ROOT / "jobs" / "train_nlg.py"), "--recipe", "shakespeare-char", "--data", ds,
           "--storage", str(storage), "--name", name, "--set", "train.sample_interval=0",
           "--set", "cluster.torch_threads=1", *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return t0


def checkpoint_sizes(ds: str, storage: Path, vocab: int, repeats: int) -> list[dict]:
    rows = []
    for n_layer, n_embd in SIZES:
        model = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=n_layer, n_head=4, n_embd=n_embd))
        n_params = model.num_params()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
        opt.step()  # materialise Adam's state
        saves, loads = [], []
        folder = storage / f"torch-{n_embd}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(repeats):
            path = folder / f"state-{i}.pt"
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            state = torch.load(path, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            loads.append(time.perf_counter() - t0)
            path.unlink()
        ckpt, restore = [], []
        for i in range(repeats):
            name = f"ckpt-{n_embd}-{i}"
            shape = (f"model.n_layer={n_layer}", f"model.n_embd={n_embd}", "train.checkpoint_interval=2",
                     "train.eval_interval=1000", "train.eval_batches=1", "train.log_interval=2",
                     "train.warmup_steps=1", "train.keep_checkpoints=1", "train.micro_batch_size=1")
            train(ds, storage, name, "train.max_steps=4", *shape)
            train(ds, storage, name, "train.max_steps=6", *shape)
            ckpt += scalars(storage / name, "perf/checkpoint_s")
            restore += scalars(storage / name, "perf/restore_s")
        size = sum(f.stat().st_size for f in (storage / f"ckpt-{n_embd}-0" / "checkpoint_00000006").rglob("*")
                   if f.is_file())
        rows.append({"params": n_params, "checkpoint_bytes": size, "save_s": statistics.median(ckpt),
                     "restore_s": statistics.median(restore), "torch_save_s": statistics.median(saves),
                     "torch_load_s": statistics.median(loads), "saves": len(ckpt), "restores": len(restore)})
        print(f"checkpoint, {n_params / 1e6:.1f}M parameters: {rows[-1]}", flush=True)
    return rows


def plain_first_step(vocab: int) -> float:
    code = (
        "import time; t0 = time.time(); import torch; from genai.models.gpt import GPT, GPTConfig; "
        f"m = GPT(GPTConfig(vocab_size={vocab}, block_size=32, n_layer=2, n_head=2, n_embd=32)); "
        "o = torch.optim.AdamW(m.parameters()); x = torch.zeros(8, 32, dtype=torch.long); "
        "m(x, x)[1].backward(); o.step(); print(time.time() - t0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return float(r.stdout.strip())


def first_step_seconds(ds: str, storage: Path, name: str, env: dict) -> float:
    t0 = train(ds, storage, name, "train.max_steps=2", "train.warmup_steps=0", "train.log_interval=1",
               "train.eval_interval=1000",
               "train.eval_batches=1", "train.checkpoint_interval=1000", "model.n_layer=2", "model.n_embd=32",
               "model.n_head=2", env=env)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(storage / name / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    first = acc.Scalars("train/loss")[0]
    return first.wall_time - t0


# Where the time to first step goes: the first console line (with --verbose) of each stage's end, in order.
PHASES = [("imports, plan and Ray start (ray.init)", "started an embedded local Ray"),  # printed after ray.init
          ("Train controller up", "Attempting to start training worker group"),
          ("worker group started", "Started training worker group"),
          ("deepspeed.initialize and model", "model: "),
          ("first Ray Data batch and step", "step 1/")]


def startup_phases(ds: str, storage: Path, name: str, env: dict) -> dict:
    """Seconds of each PHASES stage of a warm tiny run, timed from the lines as they reach the console."""
    cmd = [sys.executable, str(ROOT / "jobs" / "train_nlg.py"), "--recipe", "tiny", "--data", ds, "--storage",
           str(storage), "--name", name, "--verbose", "--set", "train.max_steps=2", "--set", "train.warmup_steps=0",
           "--set", "train.log_interval=1",
           "--set", "train.sample_interval=0", "--set", "train.eval_interval=1000",
           "--set", "train.checkpoint_interval=1000"]
    t0 = time.time()
    seen: dict[str, float] = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **env})
    for line in proc.stdout:
        for phase, marker in PHASES:
            if phase not in seen and marker in line:
                seen[phase] = time.time() - t0
    if proc.wait() != 0 or len(seen) != len(PHASES):
        raise RuntimeError(f"{name}: exit {proc.returncode}, stages seen {sorted(seen)}")
    ends = [seen[phase] for phase, _ in PHASES]
    return {phase: end - start for (phase, _), start, end in zip(PHASES, [0.0] + ends, ends)} | {"total": ends[-1]}


def startup(ds: str, storage: Path, vocab: int, repeats: int) -> dict:
    cold, warm, phases = [], [], []
    for i in range(repeats):
        cache = tempfile.mkdtemp(prefix="torch-ext-")
        cold.append(first_step_seconds(ds, storage, f"cold-{i}", {"TORCH_EXTENSIONS_DIR": cache}))
        warm.append(first_step_seconds(ds, storage, f"warm-{i}", {"TORCH_EXTENSIONS_DIR": cache}))
        phases.append(startup_phases(ds, storage, f"phases-{i}", {"TORCH_EXTENSIONS_DIR": cache}))
    plain = [plain_first_step(vocab) for _ in range(repeats)]
    return {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm), "plain_s": statistics.median(plain),
            "cold_all": cold, "warm_all": warm,
            "phases": {k: statistics.median(p[k] for p in phases) for k in phases[0]}, "phases_all": phases}


def scaling(ds: str, storage: Path, repeats: int) -> dict:
    one, two = [], []
    for i in range(repeats):
        common = ("train.log_interval=50", "train.eval_interval=100000", "train.checkpoint_interval=100000")
        one.append(ours(ds, storage, f"scale1-{i}", 300, 1, *common)["tokens_per_s"])
        two.append(ours(ds, storage, f"scale2-{i}", 300, 1, *common, "cluster.num_workers=2",
                        "cluster.cpus_per_worker=0.5", "deepspeed.zero_stage=2")["tokens_per_s"])
    t1, t2 = statistics.median(one), statistics.median(two)
    return {"tokens_per_s_1w": t1, "tokens_per_s_2w": t2, "efficiency": t2 / (2 * t1), "all_1w": one, "all_2w": two}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(SHAKESPEARE) if SHAKESPEARE.exists() else "builtin:shakespeare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-checkpoint", action="store_true")
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    ds = shakespeare_dataset(args.corpus)
    vocab = 128
    storage = OUT / f"system-{time.strftime('%Y%m%d-%H%M%S')}"
    # Sections skipped this time keep their figures from an earlier run (each beside its own baseline).
    path = OUT / "system.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(machine=f"{os.cpu_count()} CPU cores, torch {torch.__version__}", repeats=args.repeats)

    def save() -> None:
        path.write_text(json.dumps(result, indent=2))
    print(f"\nsystem benchmarks, {result['machine']}, medians of {args.repeats}\n")
    if not args.skip_checkpoint:
        rows = result["checkpoint"] = checkpoint_sizes(ds, storage, vocab, args.repeats)
        save()
        print("| parameters | checkpoint size | save (ours) | torch.save | restore (ours) | torch.load |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['params'] / 1e6:.1f}M | {r['checkpoint_bytes'] / 2**20:.0f} MiB | {r['save_s']:.2f} s "
                  f"| {r['torch_save_s']:.2f} s | {r['restore_s']:.2f} s | {r['torch_load_s']:.2f} s |")
    if not args.skip_startup:
        s = result["startup"] = startup(ds, storage, vocab, args.repeats)
        save()
        print(f"\n| time to first step | ours | plain PyTorch process |\n|---|---|---|\n"
              f"| cold DeepSpeed op cache | {s['cold_s']:.1f} s | {s['plain_s']:.1f} s |\n"
              f"| warm DeepSpeed op cache | {s['warm_s']:.1f} s | {s['plain_s']:.1f} s |")
        print("\n| where a warm start's time goes (tiny, --verbose lines) | seconds |\n|---|---|")
        for phase, seconds in s["phases"].items():
            print(f"| {phase} | {seconds:.1f} |")
    if not args.skip_scaling:
        s = result["scaling"] = scaling(ds, storage, args.repeats)
        save()
        print(f"\n| shakespeare-char tokens/s | 1 worker | 2 workers (ZeRO-2) | efficiency |\n|---|---|---|---|\n"
              f"| medians | {s['tokens_per_s_1w']:,.0f} | {s['tokens_per_s_2w']:,.0f} | {s['efficiency']:.2f} |")


if __name__ == "__main__":
    main()
