"""Train a GAN (DCGAN, class-conditional, WGAN-GP) with Ray Train and two DeepSpeed engines.

Runs on an embedded local Ray, or on the cluster in RAY_ADDRESS (as under `ray job submit`).
Rerunning with the same --name (and storage) resumes from the run's latest checkpoint.

    python jobs/train_gan.py --recipe tiny-gan
    python jobs/train_gan.py --recipe dcgan-mnist --data ~/datasets/mnist --set train.classifier=~/digit-classifier
"""

from __future__ import annotations

import _cli
import _train

from cluster.storage import check_access
from genai.train.gan import plan_gan_run, train_loop_per_worker


def summary(run, metrics: dict) -> tuple[str, list[str]]:
    parts = [f"{key} {metrics[key]:.{digits}f}" for key, digits in
             (("fd", 2), ("fd_real", 2), ("label_agreement", 3), ("d_loss", 4), ("g_loss", 4))
             if isinstance(metrics.get(key), float)]
    return ("".join(f", {p}" for p in parts),
            [f"samples:     {run.join('samples').uri}",
             f"generate:    python jobs/generate.py --checkpoint {run.uri} --num 64 --out grid.png"])


def main() -> int:
    args = _train.parse_args(__doc__, "gan", "dcgan-mnist")
    recipe = _train.recipe_from_args(args, "gan")
    check_access(recipe.cluster.storage, expect="folder")  # bucket and credentials, before any work
    plan = plan_gan_run(recipe)
    return _train.train(recipe, plan, train_loop_per_worker, summary, verbose=args.verbose)


if __name__ == "__main__":
    _cli.run_main(main)
