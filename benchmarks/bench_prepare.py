"""Corpus preparation at scale: tokens/s of jobs/prepare_data.py against a single-process `tokenizers`
`encode_batch` loop over the same files, and its peak memory on a small and a 10x larger corpus, in the same run.

    python benchmarks/bench_prepare.py [--sizes 50,500] [--repeats 3] [--workers 0]

Builds JSON-lines corpora of the given sizes (MB) from what every machine has: CPython's standard library sources
(one document per module) and the builtin Shakespeare plays (one document), repeated, in files of --file-mb MB.
Each size is prepared with byte-level BPE by the real job in a fresh process (--workers 0: in that process without
Ray; N: N Ray Data workers on an embedded local Ray), and the same files are tokenized by the baseline, a plain
loop that reads each file's lines, decodes the JSON and calls the same trained tokenizer's `encode_batch` on
batches of documents (no shards, no manifest). Both run with TOKENIZERS_PARALLELISM=true, so both use every core
through the tokenizer's own threads. Peak RSS is each process's own (os.wait4). BPE trains on the same bounded
sample (--bpe-sample-mb) at every size, so that what is measured is how memory grows with the corpus, not with
the sample. The memory bar: peak RSS at the largest size is at most 1.3x that at the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _stats import medians, spread  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
RSS_BAR = 1.3
BASELINE = r'''
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_str(json.dumps(json.load(open(sys.argv[1]))["hf"]))
t0, tokens, batch = time.perf_counter(), 0, []
for path in sys.argv[2:]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 256:
                tokens += sum(len(e.ids) for e in tok.encode_batch(batch))
                batch = []
if batch:
    tokens += sum(len(e.ids) for e in tok.encode_batch(batch))
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}))
'''


def documents() -> list[str]:
    """The standard library's modules (one document each) and the builtin plays (one document), in a fixed order."""
    from genai.data.sources import read_corpus

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.rglob("*.py"))
            if "site-packages" not in p.parts]
    return [d for d in docs if d.strip()] + [read_corpus("builtin:shakespeare")]


def build_corpus(folder: Path, size_mb: int, file_mb: int, docs: list[str]) -> list[Path]:
    """JSON-lines files of about file_mb MB each, holding the documents repeated until size_mb MB; reused when
    a complete one is already there."""
    done = folder / "_COMPLETE"  # an underscore file: preparation ignores it, as it does Spark's _SUCCESS
    if done.exists():
        return sorted(folder.glob("*.jsonl"))
    folder.mkdir(parents=True, exist_ok=True)
    target, written, index, files = size_mb * 1_000_000, 0, 0, []
    out = None
    while written < target:
        for doc in docs:
            if out is None or out.tell() >= file_mb * 1_000_000:
                if out:
                    out.close()
                files.append(folder / f"part-{len(files):05d}.jsonl")
                out = open(files[-1], "w", encoding="utf-8")
            line = json.dumps({"text": doc, "id": index}) + "\n"
            out.write(line)
            written += len(line.encode())
            index += 1
            if written >= target:
                break
    out.close()
    done.write_text(str(written))
    return files


def _child(cmd: list[str], env: dict) -> tuple[str, float, int]:
    """Run a command and wait for it with os.wait4: its output (stdout and stderr), wall seconds, peak RSS in bytes
    (its own, not this process's)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}):\n{output[-3000:]}")
    return output, wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def ours(files_dir: Path, out: Path, args, env: dict) -> dict:
    """The real job, in a fresh process."""
    cmd = [sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--source", str(files_dir), "--out", str(out),
           "--tokenizer", "bpe", "--bpe-vocab-size", str(args.bpe_vocab_size), "--bpe-sample-mb",
           str(args.bpe_sample_mb), "--workers", str(args.workers), "--overwrite"]
    stdout, wall, rss = _child(cmd, env)
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    stream_rate = float(re.search(r"tokenized and written at ([\d,]+) tokens/s", stdout).group(1).replace(",", ""))
    bpe_s = float(re.search(r"trained BPE on a sample of .*\(([\d.]+)s\)", stdout).group(1))
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "stream_tokens_per_s": stream_rate,
            "bpe_train_s": bpe_s, "peak_rss_mb": rss / 1e6, "documents": manifest["corpus"]["documents"]}


def baseline(files: list[Path], tokenizer: Path, env: dict) -> dict:
    """A single-process encode_batch loop over the same files with the same tokenizer."""
    stdout, wall, rss = _child([sys.executable, "-c", BASELINE, str(tokenizer), *map(str, files)], env)
    r = json.loads(stdout.strip().splitlines()[-1])
    return {"tokens": r["tokens"], "wall_s": wall, "tokens_per_s": r["tokens"] / r["seconds"],
            "peak_rss_mb": rss / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="50,500", help="corpus sizes in MB, comma-separated; the RSS ratio compares "
                                                    "the largest with the smallest")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side per size; figures are medians")
    p.add_argument("--workers", type=int, default=0, help="the job's --workers (0: one process, no Ray)")
    p.add_argument("--bpe-vocab-size", type=int, default=8192)
    p.add_argument("--bpe-sample-mb", type=float, default=32, help="the BPE sample (the same at every size)")
    p.add_argument("--file-mb", type=int, default=25, help="size of each corpus file")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench-prepare"),
                   help="where corpora are built (and reused) and datasets written")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "PYTHONUNBUFFERED": "1"}
    docs = documents()
    rows = {}
    for size in sizes:
        files = build_corpus(work / f"corpus-{size}mb", size, args.file_mb, docs)
        out = work / f"dataset-{size}mb"
        ours_runs, base_runs = [], []
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits both
            ours_runs.append(ours(work / f"corpus-{size}mb", out, args, env))
            base_runs.append(baseline(files, out / "tokenizer.json", env))
        rows[size] = {"ours": medians(ours_runs), "baseline": medians(base_runs), "files": len(files)}
        print(f"{size} MB: ours {rows[size]['ours']['tokens_per_s']:,.0f} tokens/s, "
              f"baseline {rows[size]['baseline']['tokens_per_s']:,.0f} tokens/s", flush=True)

    small, large = rows[sizes[0]], rows[sizes[-1]]
    rss_ratio = large["ours"]["peak_rss_mb"] / small["ours"]["peak_rss_mb"]
    result = {"sizes_mb": sizes, "rows": {str(k): v for k, v in rows.items()}, "rss_ratio": rss_ratio,
              "workers": args.workers, "bpe_vocab_size": args.bpe_vocab_size, "bpe_sample_mb": args.bpe_sample_mb,
              "cpus": os.cpu_count(), "repeats": args.repeats, "measured": time.strftime("%Y-%m-%d")}
    (OUT / "prepare.json").write_text(json.dumps(result, indent=2))

    mode = "one process, no Ray" if args.workers == 0 else f"{args.workers} Ray Data workers"
    print(f"\nPreparing JSON-lines corpora with BPE ({args.bpe_vocab_size} tokens, trained on "
          f"{args.bpe_sample_mb:g} MB), {mode}, {os.cpu_count()} CPU cores, medians of {args.repeats}\n")
    print("| corpus | tokens | ours tokens/s (end to end) | ours tokens/s (tokenize + write) | baseline encode_batch "
          "tokens/s | ratio (end to end / tokenize + write) | peak RSS ours | peak RSS baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for size, r in rows.items():
        o, b = r["ours"], r["baseline"]
        print(f"| {size} MB, {r['files']} files | {o['tokens']:,.0f} | {spread(o, 'tokens_per_s')} | "
              f"{spread(o, 'stream_tokens_per_s')} | {spread(b, 'tokens_per_s')} | "
              f"{o['tokens_per_s'] / b['tokens_per_s']:.2f} / {o['stream_tokens_per_s'] / b['tokens_per_s']:.2f} | "
              f"{o['peak_rss_mb']:,.0f} MB | {b['peak_rss_mb']:,.0f} MB |")
    if len(sizes) > 1:
        verdict = "PASS" if rss_ratio <= RSS_BAR else "FAIL"
        print(f"\npeak RSS {sizes[-1]} MB / {sizes[0]} MB: {rss_ratio:.2f}x (bar <= {RSS_BAR}x: {verdict})")


if __name__ == "__main__":
    main()
