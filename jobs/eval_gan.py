"""Evaluate a trained GAN with the project's digit classifier (no download needed).

Prints the Frechet distance between generated and real training digits in the classifier's feature
space, beside the same distance for held-out real digits (the floor a perfect generator would reach),
and, for class-conditional models, the share of samples classified as their requested label.

    python jobs/train_classifier.py --data ~/datasets/mnist --out ~/digit-classifier      # once
    python jobs/eval_gan.py --checkpoint ~/genai-runs/dcgan-mnist --classifier ~/digit-classifier
"""

from __future__ import annotations

import json

import _cli

from cluster.storage import check_access
from genai.config import GANRecipe, parse_yaml, validate_recipe
from genai.run import META_DIR, RECIPE_FILE, find_model_source


def main() -> int:
    p = _cli.ArgumentParser(description=__doc__, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="GAN run, export or checkpoint folder (path or URI)")
    p.add_argument("--classifier", required=True, help="digit classifier folder or URI (jobs/train_classifier.py)")
    p.add_argument("--data", help="image dataset to compare with (default: the run's own dataset)")
    p.add_argument("--num", type=int, default=5000, help="generated and real images compared")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--json", dest="json_out", action="store_true", help="print the figures as one JSON line")
    args = p.parse_args()
    if args.num < 10:
        p.error("--num must be at least 10")
    for uri in (args.classifier, args.data):  # before the generator loads and the data is planned
        if uri:
            check_access(uri, must_exist=True, expect="folder")
    import torch

    from genai.sampling import load_generator
    from genai.train.gan import QualityEval, generator_quality, plan_gan_run

    generator = load_generator(args.checkpoint)
    kind, loc = find_model_source(args.checkpoint)
    recipe_file = loc.join(RECIPE_FILE) if kind == "export" else loc.join(META_DIR, RECIPE_FILE)
    raw = parse_yaml(recipe_file.read_text(), recipe_file.uri)
    recipe = validate_recipe(raw, origin=recipe_file.uri, cls=GANRecipe)
    if args.data:
        recipe.data.uri = args.data
    data_uri = plan_gan_run(recipe, log=lambda *_: None).data_uri
    figures = generator_quality(QualityEval(args.classifier, data_uri, args.num, torch.device("cpu")),
                                generator.model, generator.config, args.seed)
    figures = {"checkpoint": generator.source, "step": generator.step, "num": args.num, **figures}
    if args.json_out:
        print(json.dumps(figures))
        return _cli.EXIT_OK
    print(f"{generator.source} (step {generator.step}), {args.num} samples vs {data_uri}:")
    print(f"  digit-feature Frechet distance: generated {figures['fd']:.2f}, held-out real digits "
          f"{figures['fd_real']:.2f}")
    if "label_agreement" in figures:
        print(f"  label agreement: {100 * figures['label_agreement']:.1f}% of samples classified as their label")
    return _cli.EXIT_OK


if __name__ == "__main__":
    _cli.run_main(main)
