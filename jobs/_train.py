"""The driver side shared by the training jobs: arguments, recipe, run folder, Ray, fit, summary."""

from __future__ import annotations

import signal
from typing import Callable

import _cli
import yaml

from cluster.launch import (call_in_thread, error_cause, fit, parquet_datasets, run_location, run_name_default,
                            wait_for_resources)
from cluster.progress import ProgressChannel, ProgressDisplay
from cluster.ray_env import connect
from cluster.storage import StorageError
from genai.config import ConfigError, available_recipes, json_value, load_recipe, recipe_to_yaml
from genai.data.shards import DatasetError
from genai.sampling import incomplete_checkpoints, registered_checkpoints
from genai.train.interrupt import clear_stop, request_stop

RECIPE_FILE = "recipe.yaml"
# Fields a resumed run must keep: its checkpoints hold weights and optimizer shards of this shape.
FIXED_FIELDS = {
    "gpt": {"model": ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"),
            "cluster": ("num_workers",), "deepspeed": ("zero_stage",)},
    "gan": {"model": ("image_size", "channels", "z_dim", "ngf", "ndf", "conditional", "spectral_norm"),
            "cluster": ("num_workers",)},
}


def parse_args(doc: str, kind: str, default_recipe: str, argv: list[str] | None = None):
    p = _cli.ArgumentParser(description=doc, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=default_recipe,
                   help=f"shipped recipe ({', '.join(available_recipes(kind))}) or a YAML path")
    p.add_argument("--data", help="prepared dataset folder or URI (overrides data.uri)")
    p.add_argument("--storage", help="where runs live: folder or URI (overrides cluster.storage)")
    p.add_argument("--name", help="run name; an existing run of that name resumes (overrides cluster.run_name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.max_steps=500 (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (every worker's lines, Ray Train and Ray Data logs) instead of the "
                        "progress bar; without it they go to Ray's session logs")
    return p.parse_args(argv)


def recipe_from_args(args, kind: str):
    """The recipe named on the command line with --data/--storage/--name and every --set applied, validated."""
    overrides = list(args.overrides)
    for flag, key in ((args.data, "data.uri"), (args.storage, "cluster.storage"), (args.name, "cluster.run_name")):
        if flag is not None:  # a string as given (`--name 42` is a name, `--name ''` an empty one), not YAML
            overrides.append(f"{key}={json_value(flag)}")
    return load_recipe(args.recipe, overrides, kind=kind)


def check_run_matches(run, recipe) -> None:
    """Resuming a run with a different model shape would fail deep inside DeepSpeed: say so now."""
    previous = run.join(RECIPE_FILE)
    if not previous.exists():
        return
    old = yaml.safe_load(previous.read_text())
    new = recipe.model_dump(mode="json")
    if old.get("kind", "gpt") != recipe.kind:
        raise ConfigError(f"run {run.uri} is a {old.get('kind', 'gpt')} run: use another --name")
    for section, keys in FIXED_FIELDS[recipe.kind].items():
        for key in keys:
            if old.get(section, {}).get(key) != new[section][key]:
                raise ConfigError(
                    f"run {run.uri} exists with {section}.{key}={old[section].get(key)}, this recipe has "
                    f"{new[section][key]}: use another --name to start a new run")


def train(recipe, plan, train_fn: Callable[[dict], None],
          summary: Callable[[object, dict], tuple[str, list[str]]], verbose: bool = False) -> int:
    """Connect to Ray, check it can hold the workers, write the run's recipe, run the workers and print the
    outcome. Returns the exit code.

    `summary(run, final_metrics)` gives the result headline (", val loss 1.23") and lines of what to do next."""
    c = recipe.cluster
    name = c.run_name or run_name_default(recipe.name)
    run = run_location(c.storage, name)
    try:
        check_run_matches(run, recipe)
    except OSError as exc:
        raise StorageError(f"{run.uri}: cannot read the run folder ({exc})") from None
    where = connect(cpus_needed=c.num_workers * c.cpus_per_worker, quiet=not verbose)
    wait_for_resources(c.num_workers, c.cpus_per_worker, c.use_gpu, c.resource_wait_s if where == "cluster" else 0)
    try:
        run.join(RECIPE_FILE).write_text(recipe_to_yaml(recipe))
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

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # In a thread: signals reach the main thread only, and Ray Train replaces the SIGINT handler (with an
        # immediate abort) only when fit() runs in the main thread.
        result = call_in_thread(lambda: fit(
            train_fn, dict(plan.loop_config(run.uri), console=console), datasets=parquet_datasets(plan.dataset_uris()),
            num_workers=c.num_workers, use_gpu=c.use_gpu, cpus_per_worker=c.cpus_per_worker, storage=c.storage,
            name=name, max_failures=c.max_failures, keep_checkpoints=recipe.train.keep_checkpoints),
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
    headline, lines = summary(run, metrics)
    print(f"done: run {name} at step {metrics.get('step', recipe.train.max_steps)}{headline}")
    print(f"  checkpoint:  {result.checkpoint.path if result.checkpoint else '-'}")
    for line in lines:
        print(f"  {line}")
    print(f"  tensorboard: tensorboard --logdir {run.join('tensorboard').uri}")
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
