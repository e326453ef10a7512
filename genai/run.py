"""The run folder, `<storage>/<run name>/`: one home for its layout, used by the jobs, the training loop, Tune and
generation (no Ray, no DeepSpeed here).

    recipe.yaml                     the recipe the run trains (written by the driver before the workers start)
    dataset.json                    the dataset it trains on: its URI and content fingerprint
    workers.json                    where this attempt's workers run
    STOP_REQUESTED                  the driver's request that the workers checkpoint and stop (Ctrl-C, SIGTERM)
    checkpoint_<step>/              every rank's DeepSpeed shards (merged by Ray), trainer_state.json (step, data
                                    position, world size, the engines' tags), rng/rank<N>.pt, meta/ (model config,
                                    recipe and what sampling needs: the tokenizer, the EMA generator)
    checkpoint_manager_snapshot.json  Ray's registry of the checkpoints it finished
    tensorboard/                    rank 0's events
    samples/                        image sample grids (gan, vae, sr, cyclegan)
    export/                         the final model; its export.json index, written last, names the kind and files
"""

from __future__ import annotations

import json
import os

import yaml

from cluster.storage import Location, StorageError, resolve
from genai.config import ConfigError, json_value, recipe_to_yaml
from genai.resume_policy import resume_conflicts

RECIPE_FILE = "recipe.yaml"
DATASET_FILE = "dataset.json"  # the dataset the run trains on: its URI and content fingerprint
WORKERS_FILE = "workers.json"
STOP_FILE = "STOP_REQUESTED"
TRAINER_STATE = "trainer_state.json"
META_DIR = "meta"
MODEL_CONFIG_FILE = "model_config.json"
EMA_FILE = "ema_generator.pt"
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"
EXPORT_DIR = "export"
EXPORT_INDEX = "export.json"


class CheckpointError(ValueError):
    """No usable model at the given location; the message names it."""


def run_location(storage: str, name: str) -> Location:
    return resolve(storage).join(name)


def export_location(run_uri: str) -> Location:
    return resolve(run_uri).join(EXPORT_DIR)


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def request_stop(run_uri: str) -> None:
    resolve(run_uri).join(STOP_FILE).write_text("stop requested by the driver\n")


def clear_stop(run_uri: str) -> None:
    resolve(run_uri).join(STOP_FILE).delete()


def write_run_files(run: Location, recipe, dataset: dict) -> None:
    """The recipe and dataset identity a rerun of the run is checked against (check_run_matches)."""
    run.join(RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    run.join(DATASET_FILE).write_text(json.dumps(dataset, indent=2))


def write_meta(meta_dir: str, model_config: dict, recipe_yaml: str) -> None:
    """A checkpoint's meta/ folder (on rank 0's local copy): the model config and the recipe."""
    os.makedirs(meta_dir, exist_ok=True)
    with open(os.path.join(meta_dir, MODEL_CONFIG_FILE), "w") as f:
        json.dump(model_config, f, indent=2)
    with open(os.path.join(meta_dir, RECIPE_FILE), "w") as f:
        f.write(recipe_yaml)


def check_run_matches(run: Location, recipe, dataset: dict | None = None) -> None:
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


def _recorded_dataset(run: Location) -> dict | None:
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


def registered_checkpoints(run: Location) -> list[str]:
    """Checkpoint folders Ray finished and registered, oldest first (a folder still uploading is not listed)."""
    snapshot = run.join(RAY_CHECKPOINT_SNAPSHOT)
    if snapshot.exists():
        names = [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text()).get("checkpoint_results", [])]
    else:  # written by other tools: trust folders that hold a trainer state
        names = [n for n in run.list() if n.startswith("checkpoint_")]
    return sorted(n for n in names if run.join(n, TRAINER_STATE).exists())


def incomplete_checkpoints(run: Location) -> list[str]:
    """Checkpoint folders that Ray never registered (an upload cut short by a crash or a full disk).
    Empty when the run has no Ray snapshot to tell."""
    if not run.join(RAY_CHECKPOINT_SNAPSHOT).exists():
        return []
    registered = set(registered_checkpoints(run))
    return sorted(n for n in run.list() if n.startswith("checkpoint_0") and n not in registered)


def find_model_source(uri: str) -> tuple[str, Location]:
    """('export' | 'checkpoint', location) for a run folder, an export folder or a checkpoint folder."""
    try:
        loc = resolve(uri)
        if loc.join(EXPORT_DIR, EXPORT_INDEX).exists():
            return "export", loc.join(EXPORT_DIR)
        if loc.join(EXPORT_INDEX).exists():
            return "export", loc
        if loc.join(TRAINER_STATE).exists():
            return "checkpoint", loc
        checkpoints = registered_checkpoints(loc)
    except StorageError as exc:
        raise CheckpointError(str(exc)) from None
    if checkpoints:
        return "checkpoint", loc.join(checkpoints[-1])
    if not loc.exists():
        raise CheckpointError(f"{uri} does not exist")
    if not loc.is_dir():
        raise CheckpointError(f"{uri} is a file, not a run, export or checkpoint folder")
    raise CheckpointError(f"{uri}: no export/ and no checkpoint_* folder with a {TRAINER_STATE} (not a run folder?)")


def model_kind(uri: str) -> str:
    """The kind of model ('gpt', 'gan', 'vae', 'sr', 'cyclegan') of a run, export or checkpoint folder."""
    source, loc = find_model_source(uri)
    index = loc.join(EXPORT_INDEX if source == "export" else TRAINER_STATE)
    return json.loads(index.read_text()).get("kind", "gpt")
