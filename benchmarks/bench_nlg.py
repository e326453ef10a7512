"""GPT bars: quality and overhead of Ray Train + DeepSpeed against a plain PyTorch loop, same run.

    python benchmarks/bench_nlg.py [--corpus ../shared/data/tinyshakespeare/input.txt] [--steps 2000] [--repeats 3]

Measures, on nanoGPT's shakespeare_char CPU configuration (4 layers, 4 heads, 128 wide, block 64,
batch 12, lr 1e-3, dropout 0):
  - plain: a single-process PyTorch loop (torch AdamW, same model, batch, schedule, --threads threads);
  - plain-default-threads: the same loop with torch's default thread count (every core), as nanoGPT runs;
  - ours: jobs/train_nlg.py, 1 worker, DeepSpeed ZeRO-0, batches streamed by Ray Data, --threads threads;
  - ours-demo: the demo as `make demo` runs it (the recipe's CPUs per worker, threads from them);
  - ours with 2 workers under ZeRO-2 and ZeRO-3 (same per-worker batch).
Both models are scored by the same function on the whole validation split. Each configuration runs
--repeats times, interleaved (plain, ours, ... then again) so that load on the machine falls on both sides;
the figures are medians, with the tokens/s range. Prints a markdown table and writes benchmarks/out/nlg.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from genai.data.text_dataset import load_manifest, prepare_text_dataset  # noqa: E402
from genai.models.gpt import GPT, GPTConfig  # noqa: E402
from genai.sampling import load_model  # noqa: E402
from genai.train.schedule import warmup_cosine  # noqa: E402
from _stats import medians, spread  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def shakespeare_dataset(corpus: str) -> str:
    """The char-level dataset every GPT benchmark trains on, prepared once under benchmarks/out/."""
    ds = str(OUT / "shakespeare-char")
    if not (Path(ds) / "manifest.json").exists():
        prepare_text_dataset(corpus, ds, chunk_tokens=1024, overwrite=True)
    return ds


def split_tokens(ds: str, split: str) -> np.ndarray:
    import pyarrow.parquet as pq

    m = load_manifest(ds)
    rows = [r for s in m.splits[split].shards for r in pq.read_table(Path(ds) / s["path"])["tokens"].to_numpy(
        zero_copy_only=False)]
    return np.concatenate(rows).astype(np.int64)


@torch.no_grad()
def full_val_loss(model: GPT, val: np.ndarray, block: int) -> float:
    """Mean loss over every non-overlapping window of the validation split."""
    model.eval()
    n = (len(val) - 1) // block
    x = torch.from_numpy(val[: n * block].reshape(n, block))
    y = torch.from_numpy(val[1: n * block + 1].reshape(n, block))
    losses = []
    for i in range(0, n, 256):
        logits, _ = model(x[i:i + 256], y[i:i + 256])
        losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[i:i + 256].reshape(-1),
                                      reduction="sum").item())
    return sum(losses) / (n * block)


def plain_loop(train: np.ndarray, vocab: int, steps: int, threads: int) -> dict:
    """nanoGPT-style loop: random windows from memory, torch AdamW, same schedule as the recipe."""
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    torch.manual_seed(1337)
    cfg = GPTConfig(vocab_size=vocab, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.99))
    rng = np.random.default_rng(1337)
    times = []
    first_step = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, 1e-3, 1e-4, 100, steps)
        t0 = time.perf_counter()
        ix = rng.integers(0, len(train) - 65, 12)
        b = torch.from_numpy(np.stack([train[i:i + 65] for i in ix]))
        _, loss = model(b[:, :-1], b[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        if first_step is None:
            first_step = time.perf_counter() - t_start
    step_s = statistics.median(times[10:])
    return {"model": model, "tokens_per_s": 12 * 64 / step_s, "step_ms": 1000 * step_s, "first_step_s": first_step,
            "wall_s": time.perf_counter() - t_start}


def ours(ds: str, storage: Path, name: str, steps: int, threads: int | None, *sets: str) -> dict:
    """jobs/train_nlg.py as a user runs it; `threads` None keeps the recipe's (threads from its CPUs per worker)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = [sys.executable, str(ROOT / "jobs" / "train_nlg.py"), "--recipe", "shakespeare-char", "--data", ds,
           "--storage", str(storage), "--name", name, "--set", f"train.max_steps={steps}",
           "--set", "train.log_interval=50", "--set", "train.sample_interval=0",
           *(["--set", f"cluster.torch_threads={threads}"] if threads else []), *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    acc = EventAccumulator(str(storage / name / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tok_s = [e.value for e in acc.Scalars("perf/tokens_per_s")][1:]  # first interval includes start-up
    first = acc.Scalars("train/loss")[0]
    # time to first step ≈ first logged step's wall time minus its share of the interval, from process start
    step_time = [e.value for e in acc.Scalars("perf/step_time_s")]
    first_step_s = first.wall_time - t0 - step_time[0] * (first.step - 1)
    return {"tokens_per_s": statistics.median(tok_s), "wall_s": wall, "first_step_s": first_step_s,
            "run": storage / name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(SHAKESPEARE) if SHAKESPEARE.exists() else "builtin:shakespeare")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker and for the plain loop")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration; figures are medians")
    p.add_argument("--skip-zero", action="store_true", help="skip the 2-worker ZeRO-2/3 rows")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    ds = shakespeare_dataset(args.corpus)
    train, val = split_tokens(ds, "train"), split_tokens(ds, "val")
    vocab = 64 * math.ceil(load_manifest(ds).vocab_size / 64)
    storage = OUT / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"

    default_threads = os.cpu_count() or 1
    runs = [("ours-zero0-1w", args.threads, ()), ("ours-demo", None, ())]
    if not args.skip_zero:
        runs += [("ours-zero2-2w", args.threads, ("cluster.num_workers=2", "cluster.cpus_per_worker=0.5",
                                                  "deepspeed.zero_stage=2")),
                 ("ours-zero3-2w", args.threads, ("cluster.num_workers=2", "cluster.cpus_per_worker=0.5",
                                                  "deepspeed.zero_stage=3"))]
    plains = [("plain", args.threads), ("plain-default-threads", default_threads)]
    samples: dict[str, list[dict]] = {name: [] for name, _ in plains} | {name: [] for name, _, _ in runs}
    for i in range(args.repeats):
        for name, threads in plains:
            plain = plain_loop(train, vocab, args.steps, threads)
            samples[name].append({**{k: v for k, v in plain.items() if k != "model"},
                                  "val_loss": full_val_loss(plain["model"], val, 64)})
        for name, threads, sets in runs:
            r = ours(ds, storage, f"{name}-{i}", args.steps, threads, *sets)
            model = load_model(str(r.pop("run"))).model
            samples[name].append({**r, "val_loss": full_val_loss(model, val, 64)})
            print(f"repeat {i + 1}/{args.repeats} {name}: {r['tokens_per_s']:,.0f} tokens/s "
                  f"(plain {plain['tokens_per_s']:,.0f})", flush=True)
    rows = {name: medians(s) for name, s in samples.items()}

    machine = (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} thread(s) per process "
               f"unless the row says otherwise")
    result = {"machine": machine, "steps": args.steps, "repeats": args.repeats, "corpus": args.corpus, "rows": rows,
              "bars": {"val_loss_max": 1.90, "tokens_per_s_ratio_min": 0.95, "demo_vs_default_threads_min": 1.0}}
    (OUT / "nlg.json").write_text(json.dumps(result, indent=2))
    base = rows["plain"]["tokens_per_s"]
    print(f"\nGPT shakespeare_char, {args.steps} steps, {machine}, medians of {args.repeats}\n")
    print("| run | val loss (full val split) | tokens/s | vs plain | time to first step (s) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['val_loss']:.4f} | {spread(r, 'tokens_per_s')} | {r['tokens_per_s'] / base:.3f} "
              f"| {r['first_step_s']:.1f} | {r['wall_s']:.0f} |")
    ok = rows["ours-zero0-1w"]
    print(f"\nbar: val loss <= 1.90: {ok['val_loss']:.4f} -> {'PASS' if ok['val_loss'] <= 1.90 else 'FAIL'}")
    ratio = ok["tokens_per_s"] / base
    print(f"bar: tokens/s ratio >= 0.95: {ratio:.3f} -> {'PASS' if ratio >= 0.95 else 'FAIL'}")
    demo = rows["ours-demo"]["tokens_per_s"] / rows["plain-default-threads"]["tokens_per_s"]
    print(f"bar: demo tokens/s vs a default-threads plain loop >= 1.0: {demo:.3f} -> {'PASS' if demo >= 1.0 else 'FAIL'}")


if __name__ == "__main__":
    main()
