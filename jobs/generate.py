"""Generate from a trained run (its export, or its latest checkpoint), local or in object storage.
The run's kind decides what comes out: text from a GPT run, a PNG grid of images from a GAN or VAE run, the
reconstruction of an image by a VAE, the super-resolved image (scale times the size) by an SR run, the image
translated into the other domain by a CycleGAN run.

    python jobs/generate.py --checkpoint ~/genai-runs/shakespeare-demo --prompt "ROMEO:"
    python jobs/generate.py --checkpoint ~/genai-runs/dcgan-mnist --num 64 --out grid.png [--label 7]
    python jobs/generate.py --checkpoint ~/genai-runs/vae-mnist --num 64 --out samples.png
    python jobs/generate.py --checkpoint ~/genai-runs/vae-mnist --input digit.png --out recon.png
    python jobs/generate.py --checkpoint ~/genai-runs/srresnet-x4 --input low.png --out high.png
    python jobs/generate.py --checkpoint ~/genai-runs/cyclegan-digits --input digit.png --out bold.png [--direction b2a]
"""

from __future__ import annotations

import _cli

from cluster.storage import check_access, resolve
from genai.config import ConfigError
from genai.run import model_kind


def parse_args():
    p = _cli.ArgumentParser(description=__doc__, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, export folder or checkpoint folder (path or URI)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same output)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--out", help="write the output here (path or URI): a .png for image runs, text for GPT runs")
    text = p.add_argument_group("text (GPT runs)")
    text.add_argument("--prompt", default="\n", help="text to continue")
    text.add_argument("--max-new-tokens", type=int, default=300, help="tokens to generate")
    text.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    text.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens; 0 = all")
    text.add_argument("--num-samples", type=int, default=1, help="independent text samples")
    images = p.add_argument_group("images (GAN, VAE, SR and CycleGAN runs)")
    images.add_argument("--num", type=int, default=64, help="images in the grid (GAN, VAE)")
    images.add_argument("--label", type=int, help="class to draw (class-conditional GANs and VAEs; for a VAE's "
                        "--input, the image's class); default: every class in turn")
    images.add_argument("--nrow", type=int, help="images per grid row (default: square grid, or one row per class)")
    images.add_argument("--input", help="an image (PNG/JPEG path or URI): reconstructed by a VAE, super-resolved by "
                        "an SR run (required), translated by a CycleGAN run (required)")
    images.add_argument("--direction", choices=["a2b", "b2a"], default="a2b",
                        help="CycleGAN: translate domain A to B (default) or B to A")
    args = p.parse_args()
    if args.max_new_tokens < 1 or args.num_samples < 1 or args.temperature < 0 or args.top_k < 0:
        p.error("--max-new-tokens and --num-samples must be >= 1, --temperature and --top-k >= 0")
    if not 1 <= args.num <= 4096 or (args.nrow is not None and args.nrow < 1):
        p.error("--num must be between 1 and 4096 and --nrow >= 1")
    return args


def generate_images(args, kind: str, device: str) -> None:
    """A grid of samples (GAN, VAE), or one image made from --input (VAE, SR, CycleGAN)."""
    from genai.sampling import image_grid, load_image_model, png_bytes

    loaded = load_image_model(args.checkpoint, device=device)
    step = f" (step {loaded.step})" if loaded.step is not None else ""
    out = args.out or ("grid.png" if args.input is None else "out.png")
    if args.input is None:
        if kind in ("sr", "cyclegan"):
            raise ConfigError(f"--input: a {kind} run maps an image to an image; give the image to "
                              f"{'upscale' if kind == 'sr' else 'translate'} (PNG/JPEG)")
        from genai.sampling import sample_images

        images = sample_images(loaded, args.num, args.seed, args.label)
        classes = getattr(loaded.config, "num_classes", 0)
        nrow = args.nrow or (classes if classes and args.label is None and args.num % classes == 0 else None)
        size = loaded.config.image_size
        resolve(out).write_bytes(png_bytes(image_grid(images, nrow)))
        print(f"wrote {args.num} images ({size}x{size}) from {loaded.source}{step} to {out}", flush=True)
        return
    from genai.sampling import image_to_image

    image, what = image_to_image(loaded, args.input, label=args.label, direction=args.direction)
    resolve(out).write_bytes(png_bytes(image_grid(image, nrow=1, pad=0)))
    print(f"wrote {what} ({image.shape[-1]}x{image.shape[-2]}) of {args.input} from {loaded.source}{step} to {out}",
          flush=True)


def generate_text(args, device: str) -> None:
    from genai.sampling import load_model, sample_text

    loaded = load_model(args.checkpoint, device=device)
    step = f" (step {loaded.step})" if loaded.step is not None else ""
    print(f"# model from {loaded.source}{step}", flush=True)
    texts = sample_text(loaded, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                        args.seed, args.num_samples)
    if args.out:
        resolve(args.out).write_text("\n\n".join(texts) + "\n")
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)


def main() -> int:
    args = parse_args()
    if args.out:
        check_access(args.out, expect="file")
    if args.input:
        check_access(args.input, must_exist=True, expect="file")
    kind = model_kind(args.checkpoint)  # names a missing or unusable checkpoint before torch is imported
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if kind != "gpt":
        generate_images(args, kind, device)
    else:
        generate_text(args, device)
    return _cli.EXIT_OK


if __name__ == "__main__":
    _cli.run_main(main)
