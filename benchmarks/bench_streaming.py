"""Ray Data streaming from the local object store (SeaweedFS S3) to 2 Ray Train workers, against plain
pyarrow reading the same shards in one process, in the same run.

    python benchmarks/bench_streaming.py [--copies 8] [--repeats 3]

Starts its own SeaweedFS on loopback, prepares tiny Shakespeare (repeated --copies times) into the bucket
as char-level parquet shards, then measures tokens/s and time to first batch for both readers. The last
column compares streaming with what a training step consumes (the per-worker tokens/s of the demo model
from benchmarks/out/nlg.json when present, else the value of --consume-tokens-per-s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from _stats import medians, spread  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def plain_pyarrow(uri: str) -> dict:
    """Read every train shard with pyarrow's S3 filesystem in this process."""
    import pyarrow.parquet as pq

    from cluster.storage import resolve
    from genai.data.text_dataset import load_manifest

    m = load_manifest(uri)
    t0 = time.perf_counter()
    first, tokens = None, 0
    for shard_uri in m.shard_uris("train"):
        loc = resolve(shard_uri)
        pf = pq.ParquetFile(loc.fs.open_input_file(loc.path))
        for batch in pf.iter_batches(batch_size=32, columns=["tokens"]):
            tokens += len(batch.column("tokens").values)
            if first is None:
                first = time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    return {"tokens": tokens, "tokens_per_s": tokens / elapsed, "first_batch_s": first, "elapsed_s": elapsed}


def stream_worker(cfg: dict) -> None:
    """Runs in each Ray Train worker: iterate this worker's shard through the training loop's window path."""
    import ray.train

    from genai.data.batches import WindowStream

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = WindowStream(shard.iter_batches(batch_format="pyarrow", batch_size=32, prefetch_batches=4),
                          seq_len=64, micro_batch=12, seed=0, epoch=0, rank=rank)
    for mb in stream:
        tokens += mb.shape[0] * (mb.shape[1] - 1)
        if first is None:
            first = time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    Path(cfg["out"], f"rank{rank}.json").write_text(json.dumps(
        {"tokens": tokens, "first_batch_s": first, "elapsed_s": elapsed}))
    ray.train.report({"tokens": tokens})


def ray_streaming(uri: str, workers: int) -> dict:
    from cluster.launch import fit, parquet_datasets
    from cluster.ray_env import connect
    from genai.data.text_dataset import load_manifest

    m = load_manifest(uri)
    connect(cpus_needed=workers * 0.5)
    out = tempfile.mkdtemp(prefix="bench-stream-")
    t0 = time.perf_counter()
    fit(stream_worker, {"out": out}, datasets=parquet_datasets({"train": m.shard_uris("train")}),
        num_workers=workers, use_gpu=False, cpus_per_worker=0.5, storage=tempfile.mkdtemp(), name="stream",
        max_failures=0, keep_checkpoints=1)
    wall = time.perf_counter() - t0
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(workers)]
    tokens = sum(r["tokens"] for r in ranks)
    elapsed = max(r["elapsed_s"] for r in ranks)
    return {"tokens": tokens, "tokens_per_s": tokens / elapsed, "first_batch_s": max(r["first_batch_s"] for r in ranks),
            "elapsed_s": elapsed, "wall_with_startup_s": wall,
            "per_worker_tokens_per_s": [r["tokens"] / r["elapsed_s"] for r in ranks]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=8, help="repeat the corpus this many times")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="reads by each reader; figures are medians")
    p.add_argument("--consume-tokens-per-s", type=float, default=5000.0,
                   help="training consumption per worker when benchmarks/out/nlg.json is absent")
    args = p.parse_args()

    from cluster.objectstore import ObjectStore
    from genai.data.sources import read_corpus
    from genai.data.text_dataset import prepare_text_dataset

    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    store = ObjectStore(str(work / "seaweedfs"), ["datasets"]).start()
    try:
        os.environ.update(store.env())
        text = SHAKESPEARE.read_text() if SHAKESPEARE.exists() else read_corpus("builtin:shakespeare")
        corpus = work / "corpus.txt"
        corpus.write_text(text * args.copies)
        uri = "s3://datasets/bench-char"
        prepare_text_dataset(str(corpus), uri, chunk_tokens=1024, shard_tokens=1 << 20, overwrite=True)
        plains, streams = [], []
        for _ in range(args.repeats):
            plains.append(plain_pyarrow(uri))
            streams.append(ray_streaming(uri, args.workers))
        plain, ray_stream = medians(plains), medians(streams)
        ray_stream["per_worker_tokens_per_s"] = [statistics.median(r["per_worker_tokens_per_s"][w] for r in streams)
                                                 for w in range(args.workers)]
    finally:
        store.stop()

    consume = args.consume_tokens_per_s
    nlg = OUT / "nlg.json"
    if nlg.exists():
        consume = json.loads(nlg.read_text())["rows"]["ours-zero0-1w"]["tokens_per_s"]
    per_worker = min(ray_stream["per_worker_tokens_per_s"])
    result = {"plain_pyarrow": plain, "ray_data": ray_stream, "training_tokens_per_s_per_worker": consume,
              "headroom": per_worker / consume, "copies": args.copies, "cpus": os.cpu_count(),
              "repeats": args.repeats}
    (OUT / "streaming.json").write_text(json.dumps(result, indent=2))
    print(f"\nStreaming {plain['tokens']:,.0f} tokens from SeaweedFS S3 on loopback ({os.cpu_count()} CPU cores), "
          f"medians of {args.repeats}\n")
    print("| reader | tokens/s | time to first batch (s) | per worker tokens/s | vs training step |")
    print("|---|---|---|---|---|")
    print(f"| plain pyarrow, 1 process | {spread(plain, 'tokens_per_s')} | {plain['first_batch_s']:.2f} | - | - |")
    print(f"| Ray Data -> {args.workers} Train workers (windows, shuffle) | {spread(ray_stream, 'tokens_per_s')} | "
          f"{ray_stream['first_batch_s']:.2f} | {per_worker:,.0f} | {per_worker / consume:.0f}x of {consume:,.0f} |")


if __name__ == "__main__":
    main()
