"""Assemble benchmarks/RESULTS.md from the raw JSON the benchmark scripts wrote under benchmarks/out/, and
copy that JSON into benchmarks/RESULTS.json (kept in git beside the table, every repeat's figures included).

    python benchmarks/report.py        # `make bench` runs every benchmark, then this

Every row puts our figure beside its baseline from the same run; a benchmark that has not been run is
listed as such rather than given a number.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
sys.path.insert(0, str(ROOT / "benchmarks"))

from _stats import spread  # noqa: E402


def load(name: str) -> dict | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def repeated(r: dict) -> str:
    return f"{r['machine']}, medians of {r.get('repeats', 1)}"


def nlg_rows(r: dict) -> list[list[str]]:
    plain, rows, machine = r["rows"]["plain"], [], repeated(r)
    default_threads = r["rows"].get("plain-default-threads")
    for name, row in r["rows"].items():
        if name == "plain":
            continue
        if name == "ours-demo" and default_threads:  # the demo as `make demo` runs it vs the loop at torch's default
            ratio = row["tokens_per_s"] / default_threads["tokens_per_s"]
            rows.append([f"GPT shakespeare_char tokens/s, {name} ({r['steps']} steps)", spread(row, "tokens_per_s"),
                         f"{spread(default_threads, 'tokens_per_s')} (plain loop, torch's default threads)",
                         f"{ratio:.3f}", f"≥ 1.0: {verdict(ratio >= 1.0)}", machine])
        else:
            ratio = row["tokens_per_s"] / plain["tokens_per_s"]
            bar = f"≥ 0.95: {verdict(ratio >= 0.95)}" if name == "ours-zero0-1w" else "-"
            rows.append([f"GPT shakespeare_char tokens/s, {name} ({r['steps']} steps)", spread(row, "tokens_per_s"),
                         f"{spread(plain, 'tokens_per_s')} (plain PyTorch loop)", f"{ratio:.3f}", bar, machine])
        rows.append([f"GPT val loss (whole val split), {name}", f"{row['val_loss']:.4f}",
                     f"{plain['val_loss']:.4f} (plain loop)", f"{row['val_loss'] / plain['val_loss']:.3f}",
                     f"≤ 1.90: {verdict(row['val_loss'] <= 1.90)}" if name == "ours-zero0-1w" else "-", machine])
        rows.append([f"time to first step (s), {name}", f"{row['first_step_s']:.1f}",
                     f"{plain['first_step_s']:.1f} (plain loop)", "-", "-", machine])
    return rows


def streaming_rows(r: dict) -> list[list[str]]:
    machine = f"{r['cpus']} CPU cores, SeaweedFS on loopback, medians of {r.get('repeats', 1)}"
    ray, plain = r["ray_data"], r["plain_pyarrow"]
    return [
        ["parquet shards from S3: tokens/s", f"{spread(ray, 'tokens_per_s')} (Ray Data → 2 workers)",
         f"{spread(plain, 'tokens_per_s')} (plain pyarrow, 1 process)", f"{ray['tokens_per_s'] / plain['tokens_per_s']:.2f}",
         "-", machine],
        ["time to first batch (s)", f"{ray['first_batch_s']:.2f}", f"{plain['first_batch_s']:.2f}", "-", "-", machine],
        ["streaming headroom over the training step (per worker)", f"{min(ray['per_worker_tokens_per_s']):,.0f} tokens/s",
         f"{r['training_tokens_per_s_per_worker']:,.0f} tokens/s consumed", f"{r['headroom']:.0f}x",
         f"> 1: {verdict(r['headroom'] > 1)}", machine],
    ]


def prepare_rows(r: dict) -> list[list[str]]:
    mode = "1 process" if r["workers"] == 0 else f"{r['workers']} Ray Data workers"
    machine = f"{r['cpus']} CPU cores, {mode}, medians of {r.get('repeats', 1)}"
    rows = []
    for size, row in r["rows"].items():
        ours, base = row["ours"], row["baseline"]
        rows.append([f"prepare {size} MB of JSON lines (BPE): tokens/s end to end", spread(ours, "tokens_per_s"),
                     f"{spread(base, 'tokens_per_s')} (tokenizers encode_batch loop)",
                     f"{ours['tokens_per_s'] / base['tokens_per_s']:.2f}", "-", machine])
        rows.append([f"prepare {size} MB: tokens/s while tokenizing and writing", spread(ours, "stream_tokens_per_s"),
                     f"{spread(base, 'tokens_per_s')}", f"{ours['stream_tokens_per_s'] / base['tokens_per_s']:.2f}",
                     "-", machine])
    small, large = r["sizes_mb"][0], r["sizes_mb"][-1]
    if small != large:
        rows.append([f"peak RSS, {large} MB corpus vs {small} MB", f"{r['rows'][str(large)]['ours']['peak_rss_mb']:,.0f} MB",
                     f"{r['rows'][str(small)]['ours']['peak_rss_mb']:,.0f} MB", f"{r['rss_ratio']:.2f}",
                     f"≤ 1.3: {verdict(r['rss_ratio'] <= 1.3)}", machine])
    return rows


def gan_rows(r: dict) -> list[list[str]]:
    o, rows, machine = r["overhead"], [], repeated(r)
    rows.append([f"GAN images/s, conditional DCGAN, 1 worker ({o['steps']} steps)", spread(o, "ours_images_per_s"),
                 f"{spread(o, 'plain_images_per_s')} (plain PyTorch loop)", f"{o['ratio']:.3f}",
                 f"≥ 0.85: {verdict(o['ratio'] >= 0.85)}", machine])
    q = r.get("quality")
    if q:
        budget = f"{q['steps']} steps, {q['train_wall_s'] / 60:.1f} min, {q['workers']} workers, CPU"
        lowest = q.get("label_agreement_min", q["label_agreement"])
        rows.append([f"label agreement of {q['num']:.0f} conditional samples ({budget}); lowest seed in brackets",
                     f"{100 * q['label_agreement']:.2f}% ({100 * lowest:.2f}%)",
                     f"classifier accuracy {100 * q['classifier']['accuracy']:.1f}% on real test digits", "-",
                     f"every seed ≥ 90%: {verdict(lowest >= 0.9)}", machine])
        fd_range = f", {q['fd_min']:.0f}-{q['fd_max']:.0f}" if "fd_min" in q else ""
        rows.append(["digit-feature Fréchet distance", f"{q['fd']:.2f} (generated{fd_range})",
                     f"{q['fd_real']:.2f} (held-out real test digits)", f"{q['fd'] / q['fd_real']:.1f}x", "-", machine])
    return rows


def gpu_rows(r: dict) -> list[list[str]]:
    g, d = r["gpt2_small"], r["dcgan"]
    machine = f"{g['device']}, torch {r['torch']}"
    measured = r["peaks_TFLOPs"]["measured"]
    rows = []
    for name, v in g["variants"].items():
        if "tokens_per_s" not in v:
            rows.append([f"GPT-2 small, {name}", v.get("error") or v.get("skipped"), "-", "-", "-", machine])
            continue
        memory = f", {v['peak_memory_GiB']:.1f} GiB peak" if v.get("peak_memory_GiB") else ""
        mfu = v["mfu_datasheet"]
        rows.append([f"GPT-2 small tokens/s, {name} ({v['precision']}, batch {v['micro_batch']}x{v['grad_accum']}x"
                     f"{v['seq_len']}{memory})", f"{v['tokens_per_s']:,.0f}",
                     f"MFU vs measured matmul peak ({measured:.0f} TFLOP/s): {100 * v['mfu_measured_peak']:.1f}%",
                     f"{100 * mfu:.1f}% of datasheet" if mfu else "-",
                     ("MFU ≥ 45%: " + verdict(mfu >= 0.45)) if mfu and name == g["best"] else "-", machine])
    rows.append([f"DCGAN images/s (batch {d['batch']}, {d['precision']})", f"{d['images_per_s']:,.0f}", "-", "-", "-",
                 machine])
    return rows


def tune_rows(r: dict) -> list[list[str]]:
    o, machine = r["overhead"], repeated(r)
    rows = [[f"{o['trials']}-trial sweep, tiny recipe, {o['steps']} steps, 1 trial at a time: wall time (s)",
             f"{o['sweep_wall_s']:.1f}", f"{o['trial_s']:.1f} (sum of the trials' own times)",
             f"{o['sweep_wall_s'] / o['trial_s']:.2f}", "reported", machine],
            ["same sweep: wall time vs time inside the training loops (s)", f"{o['sweep_wall_s']:.1f}",
             f"{o['loop_s']:.1f} (sum of first-to-last-step times)", f"{o['sweep_wall_s'] / o['loop_s']:.2f}", "reported",
             machine]]
    q = r.get("quality")
    if q:
        best = f"lr {float(q['best']['train.lr']):.2e}, n_embd {q['best']['model.n_embd']}"
        when = f", measured {q['measured']}" if "measured" in q else ""
        rows.append([f"ASHA over lr x width (one sweep of 8 trials{when}, {q['budget_recipe_runs']:.1f} recipe runs "
                     f"of tokens, {q['sweep_wall_s'] / 60:.0f} min): best val loss (whole val split; {best})",
                     f"{q['sweep_val_loss']:.4f}", f"{q['recipe_val_loss']:.4f} (shakespeare-char recipe, same run)",
                     f"{q['sweep_val_loss'] / q['recipe_val_loss']:.3f}",
                     f"< recipe: {verdict(q['sweep_val_loss'] < q['recipe_val_loss'])}", r["machine"]])
    return rows


def system_rows(r: dict) -> list[list[str]]:
    machine, rows = f"{r['machine']}, medians of {r['repeats']}", []
    for c in r.get("checkpoint", []):
        size = f"{c['params'] / 1e6:.1f}M parameters, {c['checkpoint_bytes'] / 2**20:.0f} MiB"
        rows.append([f"checkpoint save (s), {size}", f"{c['save_s']:.2f}", f"{c['torch_save_s']:.2f} (torch.save)",
                     f"{c['save_s'] / c['torch_save_s']:.2f}", "-", machine])
        rows.append([f"checkpoint restore (s), {size}", f"{c['restore_s']:.2f}", f"{c['torch_load_s']:.2f} (torch.load)",
                     f"{c['restore_s'] / c['torch_load_s']:.2f}", "-", machine])
    s = r.get("startup")
    if s:
        for kind in ("cold", "warm"):
            rows.append([f"time to first step (s), tiny recipe, {kind} DeepSpeed op cache", f"{s[kind + '_s']:.1f}",
                         f"{s['plain_s']:.1f} (plain PyTorch process)", "-", "-", machine])
    s = r.get("scaling")
    if s:
        rows.append(["shakespeare-char tokens/s, 2 workers ZeRO-2 vs 1 worker (same per-worker batch)",
                     f"{s['tokens_per_s_2w']:,.0f}", f"{s['tokens_per_s_1w']:,.0f} (1 worker)",
                     f"{s['efficiency']:.2f} efficiency", "-", machine])
    return rows


def generate_rows(r: dict) -> list[list[str]]:
    machine, rows = f"{r['machine']}, medians of {r['repeats']}", []
    for g in r["rows"]:
        fits = g["case"] == "fits"
        bar = f"≥ 3: {verdict(g['speedup'] >= 3)}" if fits else "-"
        rows.append([f"greedy generation tokens/s, {g['arch']} at demo widths, context {g['context']}, prompt "
                     f"{g['prompt_tokens']} + {g['new_tokens']} new ({g['case']})", spread(g, "cached_tokens_per_s"),
                     f"{spread(g, 'plain_tokens_per_s')} (no KV cache)", f"{g['speedup']:.2f}", bar, machine])
    return rows


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sections = [("GPT (benchmarks/bench_nlg.py)", "nlg", nlg_rows),
                ("Streaming from object storage (benchmarks/bench_streaming.py)", "streaming", streaming_rows),
                ("Corpus preparation (benchmarks/bench_prepare.py)", "prepare", prepare_rows),
                ("GAN (benchmarks/bench_gan.py)", "gan", gan_rows),
                ("Sweeps (benchmarks/bench_tune.py)", "tune", tune_rows),
                ("Checkpoints, start-up and scaling (benchmarks/bench_system.py)", "system", system_rows),
                ("Generation with the KV cache (benchmarks/bench_generate.py)", "generate", generate_rows),
                ("One GPU, no Ray (benchmarks/gpu_check.py)", "gpu_check", gpu_rows)]
    lines = ["# Benchmark results", "",
             f"Written by `benchmarks/report.py` on {time.strftime('%Y-%m-%d')} from `benchmarks/out/*.json` "
             "(copied, every repeat included, into `RESULTS.json`). Each figure sits beside its baseline measured "
             "in the same run; the machine column says how many runs each median is over.", ""]
    raw = {}
    for title, name, rows_of in sections:
        lines += [f"## {title}", ""]
        data = load(name)
        if data is None or data.get("smoke"):
            lines += ["Not run yet on this machine (or only its smoke test).", ""]
            continue
        raw[name] = data
        lines += ["| measured | ours | baseline | ratio | bar | machine |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows_of(data)]
        lines.append("")
    extra = ROOT / "benchmarks" / "NOTES.md"
    if extra.exists():
        lines += [extra.read_text().strip(), ""]
    (ROOT / "benchmarks" / "RESULTS.md").write_text("\n".join(lines))
    (ROOT / "benchmarks" / "RESULTS.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
