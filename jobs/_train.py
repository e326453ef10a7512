"""The driver side shared by the training jobs: arguments, recipe, run folder, Ray, fit, summary."""

from __future__ import annotations

import json
import signal
from typing import Callable

import _cli
import yaml

from cluster.launch import (call_in_thread, error_cause, fit, parquet_datasets, run_location, run_name_default,
                            wait_for_resources)
from cluster.processes import STOP_SIGNALS
from cluster.progress import ProgressChannel, ProgressDisplay
from cluster.ray_env import connect
from cluster.storage import StorageError
from genai.config import ConfigError, available_recipes, json_value, load_recipe, recipe_to_yaml
from genai.data.shards import DatasetError
from genai.resume_policy import dataset_identity, resume_conflicts
from genai.sampling import incomplete_checkpoints, registered_checkpoints
from genai.train.interrupt import clear_stop, request_stop

RECIPE_FILE = "recipe.yaml"
DATASET_FILE = "dataset.json"  # the dataset the run trains on: its URI and content fingerprint


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


def check_run_matches(run, recipe, dataset: dict | None = None) -> None:
    """Refuse to resume a run with a change its checkpoints cannot take (genai/resume_policy.py: the model's
    shape, sharding, precision, data order or dataset), in one line naming each field with its saved and new
    value: otherwise DeepSpeed fails deep inside a worker, or the data guarantee silently breaks.

    `dataset` is this recipe's resolved dataset (resume_policy.dataset_identity), compared with the one the run
    recorded; without either, the recipe's data fields are compared as written."""
    previous = run.join(RECIPE_FILE)
    if not previous.exists():
        return
    old = yaml.safe_load(previous.read_text()) or {}
    if not isinstance(old, dict):
        raise ConfigError(f"run {run.uri}: {RECIPE_FILE} is not a recipe: use another --name")
    if old.get("kind", "gpt") != recipe.kind:
        raise ConfigError(f"run {run.uri} is a {old.get('kind', 'gpt')} run: use another --name")
    new = yaml.safe_load(recipe_to_yaml(recipe))  # the same YAML round trip as the saved recipe
    conflicts = resume_conflicts(recipe.kind, old, new, _recorded_dataset(run), dataset)
    if conflicts:
        raise ConfigError(f"run {run.uri} exists with {_assignments(conflicts, 1)}, this recipe has "
                          f"{_assignments(conflicts, 2)}: its checkpoints fix these; use another --name to start a "
                          "new run")


def _recorded_dataset(run) -> dict | None:
    """The dataset identity the run recorded; None for a run folder from before it was recorded (or a damaged one:
    the recipe's data fields are compared instead)."""
    recorded = run.join(DATASET_FILE)
    if not recorded.exists():
        return None
    try:
        data = json.loads(recorded.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) and "fingerprint" in data else None


def _assignments(conflicts: list[tuple], which: int) -> str:
    """`a=1 and b=2` from (field, saved, new) triples: the saved (1) or the new (2) values."""
    return " and ".join(f"{c[0]}={json_value(c[which])}" for c in conflicts)


def train(recipe, plan, train_fn: Callable[[dict], None],
          summary: Callable[[object, dict], tuple[str, list[str]]], verbose: bool = False) -> int:
    """Connect to Ray, check it can hold the workers, write the run's recipe, run the workers and print the
    outcome. Returns the exit code.

    `summary(run, final_metrics)` gives the result headline (", val loss 1.23") and lines of what to do next."""
    c = recipe.cluster
    name = c.run_name or run_name_default(recipe.name)
    run = run_location(c.storage, name)
    dataset = dataset_identity(plan.data_uri, plan.manifest.raw)
    try:
        check_run_matches(run, recipe, dataset)
    except OSError as exc:
        raise StorageError(f"{run.uri}: cannot read the run folder ({exc})") from None
    where = connect(cpus_needed=c.num_workers * c.cpus_per_worker, quiet=not verbose)
    wait_for_resources(c.num_workers, c.cpus_per_worker, c.use_gpu, c.resource_wait_s if where == "cluster" else 0)
    try:
        run.join(RECIPE_FILE).write_text(recipe_to_yaml(recipe))
        run.join(DATASET_FILE).write_text(json.dumps(dataset, indent=2))
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
            train_fn, dict(plan.loop_config(run.uri), console=console), datasets=parquet_datasets(plan.dataset_uris()),
            num_workers=c.num_workers, use_gpu=c.use_gpu, cpus_per_worker=c.cpus_per_worker, storage=c.storage,
            name=name, max_failures=c.max_failures, keep_checkpoints=recipe.train.keep_checkpoints,
            placement=c.placement),
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
