"""Single-GPU check of the training steps, without Ray: GPT-2 small over a matrix of speed knobs (tokens/s, MFU,
peak memory, a torch.profiler breakdown of the fastest), DCGAN images/s.

    python benchmarks/gpu_check.py                 # on a GPU machine: every variant, bf16, ZeRO-2 (< 8 min)
    python benchmarks/gpu_check.py --variants baseline,compile      # some of them
    python benchmarks/gpu_check.py --smoke         # anywhere (CPU): tiny sizes, checks the path works

Drives the per-worker steps the Ray Train loops run (genai/train/steps.py: `lm_step`, `gan_step`) on
DeepSpeed engines built from the shipped recipes' settings (gpt2-small with its micro-batch and grad_accum,
dcgan-mnist), in one process with torch.distributed world size 1. Each GPT variant is the recipe with a few fields
set (VARIANTS: train.compile, train.tf32, train.pin_memory, model.activation_checkpointing,
model.loss_chunk_tokens, precision and batch shape), built afresh from the same weights and fed the same random
token windows from host memory; its first loss is checked against the baseline's before its speed counts. MFU is
given against the matmul peak measured in the same run (an 8192^3 bf16 product) and the datasheet's dense bf16
peak. Needs torch, DeepSpeed and DeepSpeed's few pure-Python needs (pydantic among them); not Ray or pyarrow
(benchmarks/README.md: carrying them to an offline GPU machine). Writes gpu_check.json, gpu_check.md (the
tables) and gpu_check_profile.txt to $OUT (if set) or benchmarks/out/.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cluster.deepspeed_config import build_deepspeed_config, gan_engine_config  # noqa: E402
from genai.config import load_recipe  # noqa: E402
from genai.models.gan import Discriminator, GANConfig, Generator, init_weights  # noqa: E402
from genai.models.gpt import GPT, GPTConfig  # noqa: E402
from genai.train.steps import gan_step, lm_step, set_tf32  # noqa: E402

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


@dataclass(frozen=True)
class Variant:
    """One row of the GPT matrix: the gpt2-small recipe with `knobs` set (recipe fields, genai/config.py).
    `exact`: it changes no arithmetic, so its first loss must equal the baseline's; `step_share`: its share of
    --gpt-steps and --warmup (fp32 steps are several times slower); `on_cpu`: run by default on CPU too (not where
    its knobs do nothing there, or take minutes: inductor's CPU compile)."""

    knobs: dict = field(default_factory=dict)
    exact: bool = False
    step_share: float = 1.0
    on_cpu: bool = True


# In priority order: a matrix out of --budget-s skips from the end. Chunks of 4096 positions hold a quarter of a
# 16 x 1024 micro-batch's logits at a time (50k vocabulary: 0.8 GB in fp32 instead of 3.3 GB).
# The mb64 variants take the same 64 sequences per step in one micro-batch (the baseline: 16 x grad_accum 4).
VARIANTS = {
    "baseline": Variant(),
    "fp32": Variant({"train.precision": "fp32"}, step_share=0.25, on_cpu=False),
    "fp32+tf32": Variant({"train.precision": "fp32", "train.tf32": True}, step_share=0.25, on_cpu=False),
    "act-ckpt": Variant({"model.activation_checkpointing": True}, exact=True),
    "chunked-loss": Variant({"model.loss_chunk_tokens": 4096}),
    "chunked-loss+mb64": Variant({"model.loss_chunk_tokens": 8192, "train.micro_batch_size": 64,
                                  "train.grad_accum": 1}),
    "compile": Variant({"train.compile": True}, on_cpu=False),
    "compile+chunked-loss+mb64": Variant({"train.compile": True, "model.loss_chunk_tokens": 8192,
                                         "train.micro_batch_size": 64, "train.grad_accum": 1}, on_cpu=False),
    "pageable-copies": Variant({"train.pin_memory": False}, exact=True, on_cpu=False),
}
# The smoke run's tiny shapes, and its stand-ins for knob values sized for the real ones.
SMOKE_SHAPES = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.block_size=64",
                "train.micro_batch_size=4", "train.grad_accum=2"]
SMOKE_KNOBS = {"model.loss_chunk_tokens": 96, "train.micro_batch_size": 8}
# Windows every variant draws from, in order: a step takes the next micro_batch x grad_accum of them, so every
# variant's first step sees the same sequences (each micro-batch size must divide it). They repeat every few steps,
# so the loss falls even on random tokens (the smoke run's few steps see each window twice).
POOL_WINDOWS, SMOKE_POOL_WINDOWS = 256, 16
# Relative difference of a variant's first loss from the baseline's that bf16 rounding explains.
LOSS_RTOL = 1e-2
# Where a profiled operation's time goes (first match wins; CUDA kernel names and aten op names).
TIME_KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product"),
    ("softmax / loss", r"softmax|cross_entropy|nll_loss|logsumexp"),
    ("optimizer step", r"adam|multi_tensor|optimizer"),
    ("matmul", r"gemm|xmma|nvjet|cutlass|cublas|gemv|^aten::(mm|addmm|bmm|matmul|linear)$"),
    ("data copy", r"memcpy|pin_memory"),
]


def init_single_process(device: torch.device) -> None:
    import tempfile

    import deepspeed
    import torch.distributed as dist

    # A process group of one over a file, which DeepSpeed then reuses: a TCP port picked free and bound again
    # later can be taken in between by another process on a busy machine.
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="gpu-check-"), "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend=backend)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    times = []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def matmul_peak(device: torch.device, smoke: bool) -> float:
    """Dense matmul FLOP/s measured here: an 8192^3 bf16 product on GPU (256^3 fp32 in a smoke run), the median of
    10 after 3 warm-ups; the ceiling MFU is also given against (random data: ~790 TFLOP/s on an H200)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" and not smoke else (256, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = timed(lambda: a @ b, 13, 3, device)
    return 2 * n ** 3 / statistics.median(times)


def gpt_recipe(knobs: dict, args, device: torch.device):
    """gpt2-small as one worker trains it (its micro-batch and grad_accum), with the variant's fields set."""
    # data.uri: the recipe requires one; this check builds the engines only and reads no dataset.
    overrides = ["data.uri=unused", f"train.precision={args.precision}", "cluster.num_workers=1",
                 "train.global_batch_size=null", f"cluster.use_gpu={str(device.type == 'cuda').lower()}"]
    overrides += SMOKE_SHAPES if args.smoke else []
    for key, value in knobs.items():
        overrides.append(f"{key}={json.dumps(SMOKE_KNOBS.get(key, value) if args.smoke else value)}")
    return load_recipe("gpt2-small", overrides)


def build_gpt_engine(recipe, vocab: int, device: torch.device):
    """(engine, parameters, FLOPs per token) from the same initial weights, set up as the Ray Train loop does."""
    import deepspeed

    m, t = recipe.model, recipe.train
    set_tf32(t.tf32, device)
    cfg = GPTConfig(vocab_size=vocab, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                    dropout=m.dropout, bias=m.bias)
    torch.manual_seed(0)
    model = GPT(cfg, activation_checkpointing=m.activation_checkpointing, loss_chunk_tokens=m.loss_chunk_tokens)
    # Counted before deepspeed.initialize: ZeRO-3 partitions the parameters (numel() is 0 afterwards).
    n_params, flops_per_token = model.num_params(), model.flops_per_token(cfg.block_size)
    ds_config = build_deepspeed_config(recipe.deepspeed, t, 1, device.type == "cuda")
    groups = model.optimizer_groups(t.weight_decay)
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    if t.compile:
        engine.compile()
    return engine, n_params, flops_per_token


def release(engine, compiled: bool) -> None:
    """Free one variant's engine before the next is built, so that each peak memory is its own."""
    engine.destroy()
    del engine
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_kind(name: str) -> str:
    return next((kind for kind, pattern in TIME_KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def profile_steps(step, n: int, device: torch.device) -> tuple[dict, str]:
    """Where `n` steps' time goes, by TIME_KINDS (GPU: kernel time; CPU: operators' own time), and the profiler's
    table of the heaviest entries."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(n):
            step()
        sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    us = defaultdict(float)
    for e in events:
        # On GPU only the kernels and copies themselves: an operator's row repeats its kernels' time.
        if not cuda or e.device_type == DeviceType.CUDA:
            us[time_kind(e.key)] += getattr(e, key)
    total = sum(us.values()) or 1.0
    summary = {"ms_per_step": total / 1000 / n, "clock": "GPU kernels" if cuda else "CPU operators",
               "share": {kind: v / total for kind, v in sorted(us.items(), key=lambda kv: -kv[1])}}
    return summary, events.table(sort_by=key, row_limit=30)


def run_variant(name: str, variant: Variant, args, device: torch.device, vocab: int, peaks: dict) -> dict:
    """Build the variant's engine, take one step (compiles, if it does), warm up, time, profile; its figures."""
    recipe = gpt_recipe(variant.knobs, args, device)
    m, t = recipe.model, recipe.train
    micro, accum, seq_len = t.micro_batch_size, t.grad_accum, m.block_size
    windows = SMOKE_POOL_WINDOWS if args.smoke else POOL_WINDOWS
    assert windows % micro == 0, f"{name}: micro-batch {micro} must divide {windows}"
    pool = torch.randint(0, vocab, (windows, seq_len + 1), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine, n_params, flops_per_token = build_gpt_engine(recipe, vocab, device)
    try:
        # Host batches, copied by lm_step as in training (pinned unless train.pin_memory is off).
        batches = (pool[s % windows: s % windows + micro] for s in itertools.count(0, micro))
        losses = []

        def step():
            losses.append(lm_step(engine, batches, accum, device, t.pin_memory))

        first = timed(step, 1, 0, device)[0]
        warmup = max(1, round(args.warmup * variant.step_share))
        times = timed(step, warmup + max(2, round(args.gpt_steps * variant.step_share)), warmup, device)
        profile, table = profile_steps(step, args.profile_steps, device)
    finally:
        release(engine, t.compile)
    step_s = statistics.median(times)
    tok_s = micro * accum * seq_len / step_s
    return {"knobs": variant.knobs, "precision": t.precision, "micro_batch": micro, "grad_accum": accum,
            "seq_len": seq_len, "params_M": n_params / 1e6, "first_step_s": first, "steps_timed": len(times),
            "step_ms": 1000 * step_s, "tokens_per_s": tok_s,
            "mfu_measured_peak": flops_per_token * tok_s / peaks["measured"],
            "mfu_datasheet": flops_per_token * tok_s / peaks["datasheet"] if peaks["datasheet"] else None,
            "peak_memory_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "loss_first": losses[0].item() / accum, "loss_last": losses[-1].item() / accum,
            "profile": profile, "_profile_table": table}


def check_loss(row: dict, variant: Variant, baseline: dict | None) -> None:
    """The variant's first loss (same weights, same first sequences) against the baseline's: equal for a variant
    that changes no arithmetic, else within bf16 rounding. A failed check keeps the row out of `best`."""
    if baseline is None or "loss_first" not in baseline:
        row["loss_check"] = None
        return
    diff = abs(row["loss_first"] - baseline["loss_first"]) / abs(baseline["loss_first"])
    tol = 1e-6 if variant.exact else LOSS_RTOL
    row["loss_check"] = {"rel_diff": diff, "rtol": tol, "ok": diff <= tol}


def check_gpt(args, device: torch.device, names: list[str], peaks: dict) -> dict:
    """The GPT matrix: every variant in `names` while the time budget lasts, each a fresh engine."""
    vocab = 50304 if not args.smoke else 512
    start, rows, tables = time.perf_counter(), {}, {}
    for name in names:
        if time.perf_counter() - start > args.budget_s:
            rows[name] = {"knobs": VARIANTS[name].knobs, "skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            continue
        print(f"[gpu_check] {time.perf_counter() - start:.0f} s into the matrix: GPT variant {name}", flush=True)
        try:
            row = run_variant(name, VARIANTS[name], args, device, vocab, peaks)
        except Exception as exc:  # one variant failing (a compile error, out of memory) must not cost the rest
            rows[name] = {"knobs": VARIANTS[name].knobs, "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"[gpu_check] {name} failed: {rows[name]['error']}", flush=True)
            continue
        tables[name] = row.pop("_profile_table")
        check_loss(row, VARIANTS[name], rows.get("baseline"))
        rows[name] = row
    fine = {n: r for n, r in rows.items() if "tokens_per_s" in r and (r["loss_check"] or {"ok": True})["ok"]}
    best = max(fine, key=lambda n: fine[n]["tokens_per_s"]) if fine else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "variants": rows, "best": best, "best_profile_table": tables.get(best, "")}


def check_gan(args, device: torch.device) -> dict:
    import deepspeed

    recipe = load_recipe("dcgan-mnist", [f"train.precision={args.precision}", "cluster.num_workers=1",
                                         f"cluster.use_gpu={str(device.type == 'cuda').lower()}"]
                         + (["model.ngf=8", "model.ndf=8", "train.batch_size=8"] if args.smoke else
                            [f"train.batch_size={args.gan_batch}"]))
    m, t = recipe.model, recipe.train
    cfg = GANConfig(image_size=m.image_size, channels=m.channels, z_dim=m.z_dim, ngf=m.ngf, ndf=m.ndf,
                    num_classes=10 if m.conditional else 0, loss=m.loss, spectral_norm=m.spectral_norm)
    torch.manual_seed(0)
    engines = {}
    for name, net, lr, ds in (("g", Generator(cfg), t.lr_g, recipe.deepspeed.generator),
                              ("d", Discriminator(cfg), t.lr_d, recipe.deepspeed.discriminator)):
        init_weights(net)
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(t.beta1, t.beta2))
        engines[name], _, _, _ = deepspeed.initialize(model=net, optimizer=opt,
                                                      config=gan_engine_config(ds, t, lr, 1, device.type == "cuda"))
    dtype = torch.bfloat16 if engines["g"].bfloat16_enabled() else torch.float32
    images = torch.rand(16, t.batch_size, m.channels, m.image_size, m.image_size, device=device) * 2 - 1
    labels = torch.randint(0, 10, (16, t.batch_size), device=device)
    counter = iter(range(10**9))

    def next_batch():
        i = next(counter) % 16
        return images[i], labels[i]

    times = timed(lambda: gan_step(engines["g"], engines["d"], next_batch, cfg, t.n_critic, t.batch_size,
                                   t.gp_weight, device, dtype), args.gan_steps, args.warmup, device)
    step_s = statistics.median(times)
    return {"batch": t.batch_size, "n_critic": t.n_critic, "precision": args.precision, "steps_timed": len(times),
            "step_ms": 1000 * step_s, "images_per_s": t.batch_size * t.n_critic / step_s}


def pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "-"


def markdown(result: dict) -> str:
    """The tables: one row per GPT variant, the fastest one's time by kind, the DCGAN figure."""
    g, d, peaks = result["gpt2_small"], result["dcgan"], result["peaks_TFLOPs"]
    lines = [f"gpu_check on {g['device']}, torch {result['torch']}{' (SMOKE)' if result['smoke'] else ''}; "
             f"matmul peak measured {peaks['measured']:.3g} TFLOP/s, datasheet dense bf16 "
             f"{peaks['datasheet'] or '-'} TFLOP/s", "",
             "| GPT-2 small variant | precision | batch | tokens/s | ms/step | MFU (measured peak) | MFU (datasheet) "
             "| peak memory | first loss vs baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in g["variants"].items():
        if "tokens_per_s" not in r:
            lines.append(f"| {name} | {r.get('error') or r.get('skipped')} | | | | | | | |")
            continue
        check = r["loss_check"]
        check = "(reference)" if check is None else (f"{check['rel_diff']:.1e} ({'ok' if check['ok'] else 'FAILED'}"
                                                     f", rtol {check['rtol']:g})")
        memory = f"{r['peak_memory_GiB']:.1f} GiB" if r["peak_memory_GiB"] is not None else "-"
        lines.append(f"| {name}{' (best)' if name == g['best'] else ''} | {r['precision']} | "
                     f"{r['micro_batch']}x{r['grad_accum']}x{r['seq_len']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_ms']:.1f} | {pct(r['mfu_measured_peak'])} | {pct(r['mfu_datasheet'])} | {memory} | "
                     f"{check} |")
    if g["best"]:
        prof = g["variants"][g["best"]]["profile"]
        lines += ["", f"Where the time of `{g['best']}` goes ({prof['clock']}, {prof['ms_per_step']:.1f} ms per step "
                  "under the profiler):", "", "| kind | share |", "|---|---|"]
        lines += [f"| {kind} | {pct(share)} |" for kind, share in prof["share"].items()]
    lines += ["", "| DCGAN (conditional) | precision | batch | images/s |", "|---|---|---|---|",
              f"| dcgan-mnist | {d['precision']} | {d['batch']} | {d['images_per_s']:,.0f} |"]
    return "\n".join(lines)


def chosen_variants(args, device: torch.device) -> list[str]:
    """--variants, else all of them on GPU, and on CPU those marked on_cpu (tests/test_speed_knobs.py checks
    compile on CPU)."""
    if args.variants:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise SystemExit(f"gpu_check: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        return names
    return [n for n, v in VARIANTS.items() if device.type == "cuda" or v.on_cpu]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on any device (CI keeps the script working)")
    p.add_argument("--variants", help=f"comma-separated GPT variants (default: all; on CPU those that act there): "
                                      f"{', '.join(VARIANTS)}")
    p.add_argument("--gpt-steps", type=int, default=30, help="timed steps per GPT variant (fp32 ones: a quarter)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps of each variant under torch.profiler")
    p.add_argument("--budget-s", type=float, default=300,
                   help="seconds for the GPT matrix; variants not started by then are skipped (listed as such)")
    p.add_argument("--gan-steps", type=int, default=300)
    p.add_argument("--gan-batch", type=int, default=256, help="DCGAN images per step on the GPU")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after each variant's first (compiling) step")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="the baseline's; default: bf16 on GPU, fp32 on CPU")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.smoke:
        args.gpt_steps, args.gan_steps, args.warmup, args.profile_steps = 4, 8, 1, 1
    names = chosen_variants(args, device)
    init_single_process(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    peaks = {"measured": matmul_peak(device, args.smoke), "datasheet": datasheet}
    gpt = check_gpt(args, device, names, peaks)
    table = gpt.pop("best_profile_table")
    result = {"torch": torch.__version__, "smoke": args.smoke,
              "peaks_TFLOPs": {k: v / 1e12 if v else None for k, v in peaks.items()},
              "gpt2_small": gpt, "dcgan": check_gan(args, device)}
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check_profile.txt").write_text(f"torch.profiler, variant {gpt['best']}:\n{table}\n")
    print(f"\n{text}\n\ntorch.profiler, variant {gpt['best']}:\n{table}")


if __name__ == "__main__":
    main()
