"""Generate text from a trained run (its export, or its latest checkpoint), local or in object storage.

    python jobs/generate.py --checkpoint ~/genai-runs/shakespeare-demo --prompt "ROMEO:"
"""

from __future__ import annotations

import _cli
import torch

from genai.sampling import load_model, sample_text


def main() -> int:
    p = _cli.ArgumentParser(description=__doc__, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, export folder or checkpoint folder (path or URI)")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=300, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same text)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = p.parse_args()
    if args.max_new_tokens < 1 or args.num_samples < 1 or args.temperature < 0 or args.top_k < 0:
        p.error("--max-new-tokens and --num-samples must be >= 1, --temperature and --top-k >= 0")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    loaded = load_model(args.checkpoint, device=device)
    step = f" (step {loaded.step})" if loaded.step is not None else ""
    print(f"# model from {loaded.source}{step}", flush=True)
    texts = sample_text(loaded, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                        args.seed, args.num_samples)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return _cli.EXIT_OK


if __name__ == "__main__":
    _cli.run_main(main)
