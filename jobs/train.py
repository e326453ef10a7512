"""Train a model of any family with Ray Train + DeepSpeed: the recipe's `kind` picks the family (gpt, gan, vae, sr,
cyclegan).

Runs on an embedded local Ray, or on the cluster in RAY_ADDRESS (as under `ray job submit`).
Rerunning with the same --name (and storage) resumes from the run's latest checkpoint.
jobs/train_nlg.py and jobs/train_gan.py are this job for one kind (with its default recipe).

    python jobs/train.py --recipe tiny
    python jobs/train.py --recipe tiny-gan --name quick
    python jobs/train.py --recipe tiny-vae | tiny-sr | tiny-translate
    python jobs/train.py --recipe finetune --init-from ./my-hf-model --data ~/datasets/corpus-ft --name ft
"""

from __future__ import annotations

import signal

import _cli

from cluster.launch import call_in_thread, error_cause, fit, parquet_datasets, run_name_default, wait_for_resources
from cluster.processes import STOP_SIGNALS
from cluster.progress import ProgressChannel, ProgressDisplay
from cluster.ray_env import connect
from cluster.storage import StorageError, check_access
from genai.config import available_recipes, json_value, load_recipe
from genai.data.shards import DatasetError
from genai.resume_policy import dataset_identity
from genai.run import (TENSORBOARD_DIR, check_run_matches, clear_stop, incomplete_checkpoints, registered_checkpoints,
                       request_stop, run_location, write_run_files)


def parse_args(doc: str, kind: str | None, default_recipe: str | None, argv: list[str] | None = None):
    """The training jobs' flags; without a `kind` every shipped recipe is offered and --recipe is required."""
    p = _cli.ArgumentParser(description=doc, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=default_recipe, required=default_recipe is None,
                   help=f"shipped recipe ({', '.join(available_recipes(kind))}) or a YAML path")
    p.add_argument("--data", help="prepared dataset folder or URI (overrides data.uri)")
    p.add_argument("--init-from", help="gpt: start from a pretrained Hugging Face model, a folder or s3:// prefix "
                                       "(overrides model.init_from; the finetune recipe needs it)")
    p.add_argument("--storage", help="where runs live: folder or URI (overrides cluster.storage)")
    p.add_argument("--name", help="run name; an existing run of that name resumes (overrides cluster.run_name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.max_steps=500 (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (every worker's lines, Ray Train and Ray Data logs) instead of the "
                        "progress bar; without it they go to Ray's session logs")
    return p.parse_args(argv)


def recipe_from_args(args, kind: str | None):
    """The recipe named on the command line with --data/--init-from/--storage/--name and every --set applied,
    validated."""
    overrides = list(args.overrides)
    for flag, key in ((args.data, "data.uri"), (args.init_from, "model.init_from"), (args.storage, "cluster.storage"),
                      (args.name, "cluster.run_name")):
        if flag is not None:  # a string as given (`--name 42` is a name, `--name ''` an empty one), not YAML
            overrides.append(f"{key}={json_value(flag)}")
    return load_recipe(args.recipe, overrides, kind=kind)


def main(doc: str = __doc__, kind: str | None = None, default_recipe: str | None = None) -> int:
    """Parse the command line, plan the run with the family of the recipe's kind (of `kind` only, when given) and
    train it. Returns the exit code."""
    args = parse_args(doc, kind, default_recipe)
    recipe = recipe_from_args(args, kind)
    check_access(recipe.cluster.storage, expect="folder")  # bucket and credentials, before any work
    from genai.train.loop import FAMILIES  # torch and the models: only once the recipe has passed

    family = FAMILIES[recipe.kind]
    return train(recipe, family.plan(recipe), family, verbose=args.verbose)


def train(recipe, plan, family, verbose: bool = False) -> int:
    """Connect to Ray, check it can hold the workers, write the run's recipe, run the workers and print the
    outcome (the family's summary). Returns the exit code."""
    from genai.train.loop import train_loop_per_worker

    c = recipe.cluster
    name = c.run_name or run_name_default(recipe.name)
    run = run_location(c.storage, name)
    dataset = dataset_identity(plan.data_uri, plan.manifest.raw)
    try:
        check_run_matches(run, recipe, dataset)
    except OSError as exc:
        raise StorageError(f"{run.uri}: cannot read the run folder ({exc})") from None
    where = connect(cpus_needed=c.num_workers * c.cpus_per_worker, quiet=not verbose, dashboard=False)
    wait_for_resources(c.num_workers, c.cpus_per_worker, c.use_gpu, c.resource_wait_s if where == "cluster" else 0)
    try:
        write_run_files(run, recipe, dataset)
    except OSError as exc:
        raise StorageError(f"{run.uri}: cannot write the run folder ({exc})") from None

    print(f"run {name}: {run.uri}", flush=True)
    for folder in incomplete_checkpoints(run):
        run.join(folder).delete()
        print(f"removed {folder}: an earlier attempt did not finish writing it", flush=True)
    clear_stop(run.uri)  # a stop request left by an earlier, interrupted attempt
    console = None if verbose else ProgressChannel()
    display = ProgressDisplay()
    stopping = []

    def on_signal(signum, frame):
        if stopping:  # a second Ctrl-C aborts without waiting
            raise KeyboardInterrupt
        stopping.append(signum)
        print(f"{signal.Signals(signum).name}: the workers checkpoint after their current step and stop "
              "(send it again to abort at once)", flush=True)
        request_stop(run.uri)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}  # SIGHUP: a closed terminal
    try:
        # In a thread: signals reach the main thread only, and Ray Train replaces the SIGINT handler (with an
        # immediate abort) only when fit() runs in the main thread.
        result = call_in_thread(lambda: fit(
            train_loop_per_worker, dict(plan.loop_config(run.uri), console=console), datasets=parquet_datasets(plan.dataset_uris()),
            num_workers=c.num_workers, use_gpu=c.use_gpu, cpus_per_worker=c.cpus_per_worker, storage=c.storage,
            name=name, max_failures=c.max_failures, keep_checkpoints=recipe.train.keep_checkpoints,
            placement=c.placement, embedded=where == "local"),
            wait=(lambda: display.show(console.receive(0.2))) if console else None)
    except Exception as exc:  # Ray raises TrainingFailedError carrying the workers' errors
        return _failed(exc, run, name, plan)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if console:
            display.show(console.receive(0))
            console.shutdown()
        display.close()
    if result.error:
        return _failed(result.error, run, name, plan)
    metrics = result.metrics or {}
    if stopping:
        clear_stop(run.uri)
        step = metrics.get("step", "?")
        return _cli.fail(f"stopped at step {step} with a checkpoint; resume with: --name {name}",
                         _cli.EXIT_INTERRUPTED)
    headline, lines = family.summary(run, metrics)
    print(f"done: run {name} at step {metrics.get('step', recipe.train.max_steps)}{headline}")
    print(f"  checkpoint:  {result.checkpoint.path if result.checkpoint else '-'}")
    for line in lines:
        print(f"  {line}")
    print(f"  tensorboard: tensorboard --logdir {run.join(TENSORBOARD_DIR).uri}")
    return _cli.EXIT_OK


def _failed(exc: BaseException, run, name: str, plan) -> int:
    """The cause in one line (the workers' full tracebacks are in the log above), then what is kept."""
    cause, hint = error_cause(exc), ""
    if "No space left on device" in cause or "Errno 28" in cause:
        hint = f" (the storage under {run.uri} is full: free space, then resume)"
    try:
        plan.verify_data()
    except DatasetError as bad:  # a shard went missing or changed during the run
        cause, hint = str(bad), f" (restore it or re-prepare the dataset, then resume; the workers said: {cause})"
    kept = registered_checkpoints(run)
    last = f"the last complete checkpoint is {run.join(kept[-1]).uri}" if kept else "no checkpoint was completed"
    return _cli.fail(f"training failed: {cause}{hint}\n{last}; resume with: --name {name}", _cli.EXIT_FAILED)


if __name__ == "__main__":
    _cli.run_main(main)
