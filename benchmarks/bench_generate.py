"""Generation speed with the KV cache against without it, same model, same prompt, same run (no Ray).

    python benchmarks/bench_generate.py [--new-tokens 256] [--repeats 3] [--threads 1] [--smoke]

For both architectures (gpt2, llama with 2 kv heads of 4) at the demo's widths (the shakespeare-char recipe:
4 layers, 4 heads, 128 wide, a 128-row character vocabulary) with a 512-token context, greedy decoding of
--new-tokens tokens (batch 1) from random weights:
  - fits: a prompt of 512 - new tokens, so prompt + new tokens fill the context exactly; the cache serves every
    step (the bar: with the cache at least 3x the tokens/s of without);
  - past-the-context: a prompt of the whole context, so every step crops to the last 512 tokens; cached keys are
    then stale (positions shift), so generation recomputes the window like the uncached path: the same speed is
    expected, and reported.
Each pair runs --repeats times, interleaved (cache, no cache, then again); the figures are medians with their
range, and the tokens of the two are checked to be identical. Prints a markdown table and writes
benchmarks/out/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from genai.models import GPTConfig, LlamaConfig, build_model  # noqa: E402
from genai.models.decoder import generate  # noqa: E402
from _stats import medians, spread  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
DEMO = dict(vocab_size=128, n_layer=4, n_head=4, n_embd=128)  # genai/recipes/shakespeare-char.yaml, padded vocab


def model_of(arch: str, block_size: int):
    cfg = (GPTConfig(block_size=block_size, **DEMO) if arch == "gpt2"
           else LlamaConfig(block_size=block_size, n_kv_head=2, intermediate_size=384, **DEMO))
    torch.manual_seed(0)
    return build_model(cfg).eval()


def timed(model, prompt: torch.Tensor, new: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = generate(model, prompt, new, temperature=0, use_cache=use_cache)
    return time.perf_counter() - t0, out


def measure(arch: str, case: str, context: int, new: int, repeats: int) -> dict:
    model = model_of(arch, context)
    prompt_len = context - new if case == "fits" else context
    prompt = torch.randint(0, DEMO["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(1))
    timed(model, prompt[:, :8], 4, True), timed(model, prompt[:, :8], 4, False)  # warm-up
    runs = []
    for _ in range(repeats):
        cached_s, cached = timed(model, prompt, new, True)
        plain_s, plain = timed(model, prompt, new, False)
        if not torch.equal(cached, plain):
            raise AssertionError(f"{arch} {case}: tokens with the cache differ from tokens without it")
        runs.append({"cached_tokens_per_s": new / cached_s, "plain_tokens_per_s": new / plain_s,
                     "speedup": plain_s / cached_s})
    row = medians(runs)
    row.update(arch=arch, case=case, context=context, prompt_tokens=prompt_len, new_tokens=new,
               params=model.num_params(non_embedding=False))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--context", type=int, default=512, help="the models' block_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (decoding one sequence is latency-bound)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks the script, not the speed")
    args = p.parse_args()
    if args.smoke:
        args.new_tokens, args.context, args.repeats = 8, 16, 1
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} thread(s)"
    rows = [measure(arch, case, args.context, args.new_tokens, args.repeats)
            for arch in ("gpt2", "llama") for case in ("fits", "past-the-context")]
    result = {"machine": machine, "repeats": args.repeats, "smoke": args.smoke,
              "measured": time.strftime("%Y-%m-%d"), "rows": rows}
    (OUT / "generate.json").write_text(json.dumps(result, indent=2))
    print(f"\ngreedy generation, demo widths, batch 1, {machine}, medians of {args.repeats}\n")
    print("| arch | case | context | prompt + new | with KV cache tok/s | without tok/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['case']} | {r['context']} | {r['prompt_tokens']} + {r['new_tokens']} "
              f"| {spread(r, 'cached_tokens_per_s')} | {spread(r, 'plain_tokens_per_s')} | {r['speedup']:.1f}x |")


if __name__ == "__main__":
    main()
