"""Train a GPT-style language model with Ray Train + DeepSpeed.

Runs on an embedded local Ray, or on the cluster in RAY_ADDRESS (as under `ray job submit`).
Rerunning with the same --name (and storage) resumes from the run's latest checkpoint.

    python jobs/train_nlg.py --recipe tiny
    python jobs/train_nlg.py --recipe shakespeare-char --name demo --set cluster.num_workers=2
"""

from __future__ import annotations

import _cli

from cluster.launch import fit, parquet_datasets, run_location, run_name_default
from cluster.ray_env import connect
from cluster.storage import StorageError, check_access
from genai.config import ConfigError, available_recipes, load_recipe, recipe_to_yaml
from genai.train.nlg import plan_nlg_run, train_loop_per_worker

RECIPE_FILE = "recipe.yaml"
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")


def parse_args(argv: list[str] | None = None):
    p = _cli.ArgumentParser(description=__doc__, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="shakespeare-char",
                   help=f"shipped recipe ({', '.join(available_recipes())}) or a YAML path")
    p.add_argument("--data", help="prepared dataset folder or URI (overrides data.uri)")
    p.add_argument("--storage", help="where runs live: folder or URI (overrides cluster.storage)")
    p.add_argument("--name", help="run name; an existing run of that name resumes (overrides cluster.run_name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.lr=3e-4 (repeatable)")
    return p.parse_args(argv)


def recipe_from_args(args):
    """The recipe named on the command line with --data/--storage/--name and every --set applied, validated."""
    overrides = list(args.overrides)
    for flag, key in ((args.data, "data.uri"), (args.storage, "cluster.storage"), (args.name, "cluster.run_name")):
        if flag:
            overrides.append(f"{key}={flag}")
    return load_recipe(args.recipe, overrides)


def check_run_matches(run, recipe) -> None:
    """Resuming a run with a different model shape would fail deep inside DeepSpeed: say so now."""
    import yaml

    previous = run.join(RECIPE_FILE)
    if not previous.exists():
        return
    old = yaml.safe_load(previous.read_text())
    new = recipe.model_dump(mode="json")
    for section, keys in (("model", MODEL_KEYS), ("cluster", ("num_workers",)), ("deepspeed", ("zero_stage",))):
        for key in keys:
            if old.get(section, {}).get(key) != new[section][key]:
                raise ConfigError(
                    f"run {run.uri} exists with {section}.{key}={old[section].get(key)}, this recipe has "
                    f"{new[section][key]}: use another --name to start a new run")


def main() -> int:
    recipe = recipe_from_args(parse_args())
    check_access(recipe.cluster.storage)  # bucket and credentials, before any work
    plan = plan_nlg_run(recipe)
    c = recipe.cluster
    name = c.run_name or run_name_default(recipe.name)
    run = run_location(c.storage, name)
    try:
        check_run_matches(run, recipe)
        run.join(RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    except OSError as exc:
        raise StorageError(f"{run.uri}: cannot write the run folder ({exc})") from None

    print(f"run {name}: {run.uri}", flush=True)
    connect(cpus_needed=c.num_workers * c.cpus_per_worker)
    try:
        result = fit(train_loop_per_worker, plan.loop_config(run.uri),
                     datasets=parquet_datasets(plan.dataset_uris()), num_workers=c.num_workers, use_gpu=c.use_gpu,
                     cpus_per_worker=c.cpus_per_worker, storage=c.storage, name=name,
                     max_failures=c.max_failures, keep_checkpoints=recipe.train.keep_checkpoints)
    except Exception as exc:  # Ray raises TrainingFailedError carrying the workers' errors
        return _cli.fail(f"training failed: {exc}\nresume with: --name {name}", _cli.EXIT_FAILED)
    if result.error:
        return _cli.fail(f"training failed: {result.error}\nresume with: --name {name}", _cli.EXIT_FAILED)
    metrics = result.metrics or {}
    val = metrics.get("val_loss")
    print(f"done: run {name} at step {metrics.get('step', recipe.train.max_steps)}"
          + (f", val loss {val:.4f}" if isinstance(val, float) else ""))
    print(f"  checkpoint:  {result.checkpoint.path if result.checkpoint else '-'}")
    print(f"  generate:    python jobs/generate.py --checkpoint {run.uri} --prompt 'ROMEO:'")
    print(f"  tensorboard: tensorboard --logdir {run.join('tensorboard').uri}")
    return _cli.EXIT_OK


if __name__ == "__main__":
    _cli.run_main(main)
