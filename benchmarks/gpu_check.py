"""Single-GPU check of the training steps, without Ray: GPT-2 small tokens/s + MFU, DCGAN images/s.

    python benchmarks/gpu_check.py                 # on a GPU machine: bf16, DeepSpeed ZeRO-2, a few hundred steps
    python benchmarks/gpu_check.py --smoke         # anywhere (CPU): tiny sizes, checks the path works

Drives the per-worker steps the Ray Train loops run (genai/train/steps.py: `lm_step`, `gan_step`) on
DeepSpeed engines built from the shipped recipes' settings (gpt2-small, dcgan-mnist), in one process with
torch.distributed world size 1. Needs torch, DeepSpeed and a few small pure-Python packages; not Ray or
pyarrow (see benchmarks/README.md for carrying them to an offline GPU machine). Batches are random tokens /
images already on the device, so the figures are the training step's own. Writes gpu_check.json to
$OUT (if set) or benchmarks/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cluster.deepspeed_config import build_deepspeed_config, gan_engine_config  # noqa: E402
from genai.config import load_recipe  # noqa: E402
from genai.models.gan import Discriminator, GANConfig, Generator, init_weights  # noqa: E402
from genai.models.gpt import GPT, GPTConfig  # noqa: E402
from genai.train.steps import gan_step, lm_step  # noqa: E402

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def init_single_process(device: torch.device) -> None:
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


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


def check_gpt(args, device: torch.device) -> dict:
    import deepspeed

    recipe = load_recipe("gpt2-small", [f"train.precision={args.precision}", "cluster.num_workers=1",
                                        "train.global_batch_size=null", "train.grad_accum=1",
                                        f"cluster.use_gpu={str(device.type == 'cuda').lower()}"]
                         + (["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.block_size=64",
                             "train.micro_batch_size=4"] if args.smoke else []))
    m, t = recipe.model, recipe.train
    cfg = GPTConfig(vocab_size=50304 if not args.smoke else 512, block_size=m.block_size, n_layer=m.n_layer,
                    n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout, bias=m.bias)
    torch.manual_seed(0)
    model = GPT(cfg)
    ds_config = build_deepspeed_config(recipe.deepspeed, t, 1, device.type == "cuda")
    groups = model.optimizer_groups(t.weight_decay)
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    data = torch.randint(0, cfg.vocab_size, (8, t.micro_batch_size, cfg.block_size + 1), device=device)
    batches = (data[i % len(data)] for i in range(10**9))
    losses = []
    times = timed(lambda: losses.append(lm_step(engine, batches, 1, device)), args.gpt_steps, args.warmup, device)
    step_s = statistics.median(times)
    tokens = t.micro_batch_size * cfg.block_size
    tok_s = tokens / step_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    mfu = model.flops_per_token(cfg.block_size) * tok_s / peak if peak else None
    return {"device": name, "params_M": model.num_params() / 1e6, "precision": args.precision,
            "zero_stage": recipe.deepspeed.zero_stage, "micro_batch": t.micro_batch_size, "seq_len": cfg.block_size,
            "steps_timed": len(times), "step_ms": 1000 * step_s, "tokens_per_s": tok_s, "mfu": mfu,
            "loss_first": losses[0].item(), "loss_last": losses[-1].item(),
            "max_memory_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on any device (CI keeps the script working)")
    p.add_argument("--gpt-steps", type=int, default=300)
    p.add_argument("--gan-steps", type=int, default=300)
    p.add_argument("--gan-batch", type=int, default=256, help="DCGAN images per step on the GPU")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.smoke:
        args.gpt_steps, args.gan_steps, args.warmup = 8, 8, 2
    init_single_process(device)
    result = {"torch": torch.__version__, "smoke": args.smoke, "gpt2_small": check_gpt(args, device),
              "dcgan": check_gan(args, device)}
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    g, d = result["gpt2_small"], result["dcgan"]
    print(f"\ngpu_check on {g['device']}, torch {torch.__version__}{' (SMOKE)' if args.smoke else ''}\n")
    print("| step | figure | MFU (dense bf16 peak) |\n|---|---|---|")
    mfu = f"{100 * g['mfu']:.1f}%" if g["mfu"] else "- (peak unknown)"
    print(f"| GPT-2 small, {g['precision']}, ZeRO-{g['zero_stage']}, batch {g['micro_batch']}x{g['seq_len']} | "
          f"{g['tokens_per_s']:,.0f} tokens/s ({g['step_ms']:.1f} ms/step) | {mfu} |")
    print(f"| DCGAN (conditional, {d['precision']}), batch {d['batch']} | {d['images_per_s']:,.0f} images/s | - |")


if __name__ == "__main__":
    main()
