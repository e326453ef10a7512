"""Train a GPT-style language model with Ray Train + DeepSpeed.

Runs on an embedded local Ray, or on the cluster in RAY_ADDRESS (as under `ray job submit`).
Rerunning with the same --name (and storage) resumes from the run's latest checkpoint.

    python jobs/train_nlg.py --recipe tiny
    python jobs/train_nlg.py --recipe shakespeare-char --name demo --set cluster.num_workers=2
"""

from __future__ import annotations

import _cli
import _train

from cluster.storage import check_access
from genai.train.nlg import plan_nlg_run, train_loop_per_worker


def summary(run, metrics: dict) -> tuple[str, list[str]]:
    val = metrics.get("val_loss")
    return (f", val loss {val:.4f}" if isinstance(val, float) else "",
            [f"generate:    python jobs/generate.py --checkpoint {run.uri} --prompt 'ROMEO:'"])


def main() -> int:
    args = _train.parse_args(__doc__, "gpt", "shakespeare-char")
    recipe = _train.recipe_from_args(args, "gpt")
    check_access(recipe.cluster.storage, expect="folder")  # bucket and credentials, before any work
    plan = plan_nlg_run(recipe)
    return _train.train(recipe, plan, train_loop_per_worker, summary, verbose=args.verbose)


if __name__ == "__main__":
    _cli.run_main(main)
