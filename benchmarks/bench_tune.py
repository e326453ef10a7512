"""Tune bars: the scheduling overhead of a sweep, and what an ASHA search finds against the hand-set recipe.

    python benchmarks/bench_tune.py [--corpus ../shared/data/tinyshakespeare/input.txt] [--repeats 3] [--skip-quality]

Overhead: sweeps/nlg-lr-width.yaml (tiny recipe, 4 trials of 60 steps) run first-in-first-out, one trial
at a time, so the sweep's wall time compares directly with the sum of its trials' own times (Tune's
time_total_s: each trial's driver, Ray Train worker start-up included) and with the time their training
loops ran (first to last step, from each trial's TensorBoard events). The sweep runs --repeats times;
the figures are medians.

Quality: sweeps/nlg-shakespeare-asha.yaml (ASHA over train.lr and model.n_embd on the shakespeare-char
recipe; its budget is fixed by the sweep file: 8 trials, rungs at steps 250 and 750, at most 2000 steps each)
against the shakespeare-char recipe trained alone in the same run, and sweeps/nlg-optuna.yaml (the same space,
scheduler and budget with Optuna's TPE instead of random search); every model is scored on the whole validation
split (bench_nlg.full_val_loss). The compute the sweep spent is reported in tokens and in
recipe-run equivalents. One sweep (it is itself 8 runs); --skip-quality keeps the quality section of an
earlier benchmarks/out/tune.json, which carries the date it was measured.

Prints a markdown table and writes benchmarks/out/tune.json.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench_nlg import OUT, ROOT, SHAKESPEARE, shakespeare_dataset, full_val_loss, ours, split_tokens
from _stats import earlier_section, medians

from genai.sampling import load_model


def sweep(sweep_file: Path, storage: Path, ds: str, **changes) -> tuple[float, Path, str]:
    """Run jobs/tune.py on a copy of `sweep_file` with `changes`; returns (wall s, sweep folder, stdout)."""
    spec = {**yaml.safe_load(sweep_file.read_text()), **changes}
    path = storage / f"{spec['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "tune.py"), "--sweep", str(path), "--storage",
                        str(storage), "--set", f"data.uri={ds}"], capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"sweep {spec['name']} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall, storage / spec["name"], r.stdout


def trial_results(folder: Path) -> list[dict]:
    """Each trial's last Tune result (time_total_s, tokens, step, ...)."""
    results = []
    for f in sorted(glob.glob(str(folder / "run_trial_*" / "result.json"))):
        lines = Path(f).read_text().strip().splitlines()
        results.append(json.loads(lines[-1]))
    return results


def loop_seconds(run: Path) -> float:
    """Time a run's training loop took: first to last logged step, plus the first step's share."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    loss, step_time = acc.Scalars("train/loss"), acc.Scalars("perf/step_time_s")
    return loss[-1].wall_time - loss[0].wall_time + step_time[0].value * loss[0].step


def overhead(ds: str, storage: Path, repeats: int) -> dict:
    sweeps = []
    for i in range(repeats):
        wall, folder, _ = sweep(ROOT / "sweeps" / "nlg-lr-width.yaml", storage, ds, name=f"overhead-{i}",
                                scheduler={"type": "fifo"}, max_concurrent_trials=1)
        trials = trial_results(folder)
        runs = [Path(r) for r in (row["run"] for row in csv.DictReader(open(folder / "results.csv")))]
        sweeps.append({"trials": len(trials), "steps": trials[0]["step"], "sweep_wall_s": wall,
                       "trial_s": sum(t["time_total_s"] for t in trials), "loop_s": sum(map(loop_seconds, runs))})
        print(f"overhead sweep {i + 1}/{repeats}: {wall:.1f} s", flush=True)
    return medians(sweeps)


def best_of_sweep(sweep_file: Path, storage: Path, ds: str, val) -> dict:
    """Run a sweep; its best finished trial scored on the whole validation split, and what the sweep spent."""
    wall, folder, _ = sweep(sweep_file, storage, ds)
    rows = list(csv.DictReader(open(folder / "results.csv")))
    done = [r for r in rows if r["status"] == "DONE"]
    best = min(done, key=lambda r: float(r["final_val_loss"]))
    return {"val_loss": full_val_loss(load_model(best["run"]).model, val, 64), "wall_s": wall,
            "best": {k: best[k] for k in ("trial", "train.lr", "model.n_embd")},
            "trials": [{k: r[k] for k in ("train.lr", "model.n_embd", "step", "final_val_loss", "status")}
                       for r in rows],
            "tokens": sum(t["tokens"] for t in trial_results(folder))}


def quality(ds: str, storage: Path, val) -> dict:
    recipe = ours(ds, storage, "recipe", 2000, 1)
    recipe_val = full_val_loss(load_model(str(recipe["run"])).model, val, 64)
    random_search = best_of_sweep(ROOT / "sweeps" / "nlg-shakespeare-asha.yaml", storage, ds, val)
    tpe = best_of_sweep(ROOT / "sweeps" / "nlg-optuna.yaml", storage, ds, val)
    recipe_tokens = 2000 * 12 * 64
    return {"measured": time.strftime("%Y-%m-%d"), "recipe_val_loss": recipe_val, "recipe_wall_s": recipe["wall_s"],
            "sweep_val_loss": random_search["val_loss"], "sweep_wall_s": random_search["wall_s"],
            "best": random_search["best"], "trials": random_search["trials"], "tokens": random_search["tokens"],
            "budget_recipe_runs": random_search["tokens"] / recipe_tokens, "tpe": tpe}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(SHAKESPEARE) if SHAKESPEARE.exists() else "builtin:shakespeare")
    p.add_argument("--repeats", type=int, default=3, help="overhead sweeps; figures are medians")
    p.add_argument("--skip-quality", action="store_true",
                   help="only the overhead sweeps (~4 min); keeps an earlier run's quality section")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    ds = shakespeare_dataset(args.corpus)
    storage = OUT / f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    machine = f"{os.cpu_count()} CPU cores"
    result = {"machine": machine, "repeats": args.repeats, "overhead": overhead(ds, storage, args.repeats)}
    o = result["overhead"]
    print(f"\nRay Tune, {machine}, medians of {args.repeats}\n")
    print("| measured | sweep | sum over trials | ratio |\n|---|---|---|---|")
    print(f"| {o['trials']}-trial sweep, tiny recipe, {o['steps']} steps, 1 at a time: wall s vs trials' own time "
          f"| {o['sweep_wall_s']:.1f} | {o['trial_s']:.1f} | {o['sweep_wall_s'] / o['trial_s']:.2f} |")
    print(f"| same: wall s vs time inside the training loops | {o['sweep_wall_s']:.1f} | {o['loop_s']:.1f} "
          f"| {o['sweep_wall_s'] / o['loop_s']:.2f} |")
    kept = earlier_section(OUT / "tune.json", "quality") if args.skip_quality else None
    if kept:
        result["quality"] = kept
    elif not args.skip_quality:
        q = result["quality"] = quality(ds, storage, split_tokens(ds, "val"))
        print("\n| measured | ASHA sweep's best | shakespeare-char recipe | ratio |\n|---|---|---|---|")
        print(f"| val loss (whole val split) | {q['sweep_val_loss']:.4f} (lr {float(q['best']['train.lr']):.2e}, "
              f"n_embd {q['best']['model.n_embd']}) | {q['recipe_val_loss']:.4f} "
              f"| {q['sweep_val_loss'] / q['recipe_val_loss']:.3f} |")
        print(f"| compute: tokens trained | {q['tokens']:,} ({q['budget_recipe_runs']:.1f} recipe runs) "
              f"| {2000 * 12 * 64:,} | - |")
        print(f"| wall s | {q['sweep_wall_s']:.0f} | {q['recipe_wall_s']:.0f} | - |")
        if "tpe" in q:
            t = q["tpe"]
            print("\n| same budget and space (8 trials, ASHA) | TPE (optuna) | random | TPE / random |\n|---|---|---|---|")
            print(f"| best val loss (whole val split) | {t['val_loss']:.4f} (lr {float(t['best']['train.lr']):.2e}, "
                  f"n_embd {t['best']['model.n_embd']}) | {q['sweep_val_loss']:.4f} | {t['val_loss'] / q['sweep_val_loss']:.3f} |")
            print(f"| tokens trained | {t['tokens']:,} | {q['tokens']:,} | {t['tokens'] / q['tokens']:.2f} |")
            print(f"| wall s | {t['wall_s']:.0f} | {q['sweep_wall_s']:.0f} | {t['wall_s'] / q['sweep_wall_s']:.2f} |")
        verdict = "PASS" if q["sweep_val_loss"] < q["recipe_val_loss"] else "FAIL"
        print(f"\nbar: the sweep's best beats the recipe: {q['sweep_val_loss']:.4f} < {q['recipe_val_loss']:.4f} "
              f"-> {verdict}")
    (OUT / "tune.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
