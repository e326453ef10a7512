"""GAN bars: quality of the conditional DCGAN on MNIST, and the overhead of Ray Train + DeepSpeed.

    python benchmarks/bench_gan.py [--mnist ../shared/data/mnist] [--steps 1500] [--repeats 3] [--smoke]

Quality: prepares MNIST, trains the project's digit classifier (jobs/train_classifier.py), trains the
`dcgan-mnist` recipe (class-conditional, hinge + spectral norm, 2 workers, ZeRO-2 for both engines) for
--steps generator steps on CPU, then scores 10,000 samples of its EMA generator with jobs/eval_gan.py:
label agreement (bar: >= 90 %) and the digit-feature Frechet distance beside the same distance for
10,000 held-out real test digits. The quality run is repeated with --repeats seeds (train.seed 1337, 1338,
...); the table gives the medians and the range.

Overhead: images/s of jobs/train_gan.py with 1 worker (two DeepSpeed engines, Ray Data batches) against a
plain single-process PyTorch loop of the same models, losses, batch, optimizers and EMA, same threads
(bar: ratio >= 0.85), --repeats pairs interleaved, medians. Prints a markdown table and writes
benchmarks/out/gan.json.
"""

from __future__ import annotations

import argparse
import json
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

from genai.config import load_recipe  # noqa: E402
from genai.data.image_dataset import load_image_arrays, load_image_manifest, prepare_image_dataset  # noqa: E402
from genai.models.gan import EMA, GANConfig, Discriminator, Generator, d_loss, g_loss, init_weights  # noqa: E402
from _stats import earlier_section, medians, spread  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def job(script: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], capture_output=True, text=True,
                       cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def sets(*pairs: str) -> list[str]:
    return [a for s in pairs for a in ("--set", s)]


def plain_loop(images: np.ndarray, labels: np.ndarray, cfg: GANConfig, recipe, steps: int, threads: int) -> dict:
    """The same models and step as genai/train/gan.py, without Ray or DeepSpeed: batches from memory."""
    torch.set_num_threads(threads)
    torch.manual_seed(1337)
    t = recipe.train
    G, D = Generator(cfg), Discriminator(cfg)
    init_weights(G)
    init_weights(D)
    opt_g = torch.optim.Adam(G.parameters(), lr=t.lr_g, betas=(t.beta1, t.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=(t.beta1, t.beta2))
    ema = EMA(G, t.ema_decay)
    rng = np.random.default_rng(0)
    x_all = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    y_all = torch.from_numpy(labels)
    b, times = t.batch_size, []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(t.n_critic):
            idx = torch.from_numpy(rng.integers(0, len(x_all), b))
            real, y = x_all[idx], (y_all[idx] if cfg.num_classes else None)
            with torch.no_grad():
                fake = G(torch.randn(b, cfg.z_dim), y)
            scores = D(torch.cat([real, fake]), None if y is None else torch.cat([y, y]))
            loss = d_loss(scores[:b], scores[b:], cfg.loss)
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_d.step()
        D.requires_grad_(False)
        gy = torch.randint(0, cfg.num_classes, (b,)) if cfg.num_classes else None
        loss_g = g_loss(D(G(torch.randn(b, cfg.z_dim), gy), gy), cfg.loss)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)
        ema.update(G)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[10:])
    return {"images_per_s": b * t.n_critic / step_s, "step_ms": 1000 * step_s}


def ours_images_per_s(run: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return statistics.median([e.value for e in acc.Scalars("perf/images_per_s")][1:])  # first includes start-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default=str(MNIST), help="folder with MNIST's IDX .gz files")
    p.add_argument("--steps", type=int, default=1500, help="generator steps of the quality run")
    p.add_argument("--overhead-steps", type=int, default=300, help="steps of each overhead run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker and for the plain loop")
    p.add_argument("--eval-samples", type=int, default=10000)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script works (numbers meaningless)")
    p.add_argument("--repeats", type=int, default=3, help="overhead pairs and quality seeds; figures are medians")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-overhead", action="store_true", help="keep an earlier run's overhead section")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.overhead_steps, args.eval_samples, args.repeats = 20, 30, 500, 1
    OUT.mkdir(parents=True, exist_ok=True)
    ds = OUT / "mnist"
    if not (ds / "manifest.json").exists():
        prepare_image_dataset(f"mnist:{args.mnist}", str(ds), overwrite=True)
    storage = OUT / f"gan-runs-{time.strftime('%Y%m%d-%H%M%S')}"
    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} thread(s) per process"
    result: dict = {"machine": machine, "smoke": args.smoke, "repeats": args.repeats}

    # Overhead: 1 worker vs the plain loop, same recipe (conditional, hinge, spectral norm).
    recipe = load_recipe("dcgan-mnist")
    m = load_image_manifest(str(ds))
    cfg = GANConfig(image_size=28, channels=1, z_dim=recipe.model.z_dim, ngf=recipe.model.ngf, ndf=recipe.model.ndf,
                    num_classes=m.num_classes, loss=recipe.model.loss, spectral_norm=recipe.model.spectral_norm)
    images, labels = load_image_arrays(str(ds), "train", limit=20000)
    kept = earlier_section(OUT / "gan.json", "overhead") if args.skip_overhead else None
    if kept:
        result["overhead"] = kept
    else:
        pairs = []
        for i in range(args.repeats):
            plain = plain_loop(images, labels, cfg, recipe, args.overhead_steps, args.threads)
            job("train_gan.py", "--recipe", "dcgan-mnist", "--data", str(ds), "--storage", str(storage), "--name",
                f"overhead-{i}", *sets(f"train.max_steps={args.overhead_steps}", "cluster.num_workers=1",
                                       f"cluster.torch_threads={args.threads}", "train.log_interval=10",
                                       "train.sample_interval=0", f"train.checkpoint_interval={args.overhead_steps}"))
            ours = ours_images_per_s(storage / f"overhead-{i}")
            pairs.append({"plain_images_per_s": plain["images_per_s"], "ours_images_per_s": ours,
                          "ratio": ours / plain["images_per_s"]})
            print(f"overhead {i + 1}/{args.repeats}: {ours:,.0f} vs {plain['images_per_s']:,.0f} images/s", flush=True)
        o = medians(pairs)
        o["ratio"] = o["ours_images_per_s"] / o["plain_images_per_s"]  # ratio of the medians
        result["overhead"] = {**o, "steps": args.overhead_steps, "bar": 0.85, "measured": time.strftime("%Y-%m-%d")}

    if not args.skip_quality:
        clf = OUT / ("digit-classifier-smoke" if args.smoke else "digit-classifier")  # a smoke run keeps its own
        if not (clf / "classifier.json").exists() or args.smoke:
            job("train_classifier.py", "--data", str(ds), "--out", str(clf), *(["--epochs", "1", "--limit", "2000"]
                                                                            if args.smoke else []))
        scores = []
        for i in range(args.repeats):
            t0 = time.time()
            job("train_gan.py", "--recipe", "dcgan-mnist", "--data", str(ds), "--storage", str(storage), "--name",
                f"quality-{i}", *sets(f"train.max_steps={args.steps}", f"train.classifier={clf}",
                                      f"train.seed={recipe.train.seed + i}", f"cluster.torch_threads={args.threads}"))
            train_s = time.time() - t0
            ev = json.loads(job("eval_gan.py", "--checkpoint", str(storage / f"quality-{i}"), "--classifier",
                                str(clf), "--num", str(args.eval_samples), "--json").stdout.strip().splitlines()[-1])
            scores.append({**ev, "train_wall_s": train_s, "seed": recipe.train.seed + i})
            print(f"quality {i + 1}/{args.repeats}: label agreement {100 * ev['label_agreement']:.2f}%, "
                  f"FD {ev['fd']:.1f}", flush=True)
        q = medians(scores)
        q.update(label_agreement_min=min(s["label_agreement"] for s in scores),
                 fd_min=min(s["fd"] for s in scores), fd_max=max(s["fd"] for s in scores))
        result["quality"] = {**q, "steps": args.steps, "workers": 2, "bar_label_agreement": 0.90,
                             "classifier": json.loads((clf / "classifier.json").read_text())}

    (OUT / "gan.json").write_text(json.dumps(result, indent=2, default=str))
    o = result["overhead"]
    smoke = " (SMOKE: sizes too small to mean anything)" if args.smoke else ""
    print(f"\nGAN benchmarks, {machine}, medians of {args.repeats}{smoke}\n")
    print("| measured | ours | baseline (same run) | ratio / bar |")
    print("|---|---|---|---|")
    print(f"| images/s, conditional DCGAN, 1 worker, batch {recipe.train.batch_size} | "
          f"{spread(o, 'ours_images_per_s')} (Ray Train + 2 DeepSpeed engines) | "
          f"{spread(o, 'plain_images_per_s')} (plain PyTorch loop) | "
          f"{o['ratio']:.3f} (bar >= 0.85: {'PASS' if o['ratio'] >= 0.85 else 'FAIL'}) |")
    if "quality" in result:
        q = result["quality"]
        lowest = q["label_agreement_min"]
        print(f"| label agreement, {q['num']:.0f} samples after {q['steps']} steps ({q['train_wall_s'] / 60:.1f} min, "
              f"2 workers), median of {q['repeats']} seeds (lowest) | {100 * q['label_agreement']:.1f}% "
              f"({100 * lowest:.1f}%) | - | bar: every seed >= 90%: {'PASS' if lowest >= 0.9 else 'FAIL'} |")
        print(f"| digit-feature Frechet distance | {q['fd']:.2f} ({q['fd_min']:.1f}-{q['fd_max']:.1f}, generated) "
              f"| {q['fd_real']:.2f} (held-out real test digits) | {q['fd'] / max(q['fd_real'], 1e-9):.1f}x |")


if __name__ == "__main__":
    main()
