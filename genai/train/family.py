"""The interface of a model family (gpt, gan, ...): what the one training skeleton (genai/train/loop.py) asks of it.

Driver side (no Ray): `plan` checks a recipe against its data before any cluster time is spent and gives the
workers' loop config; `summary` words the finished run. Worker side: one instance per Ray Train worker, called by
the skeleton in this order: build (models and DeepSpeed engines), restore_extra + rebase (on a resume), prepare
(evaluation data, fixed noise), then per step `step` and, at the intervals, log_train / samples / evaluate +
log_eval / write_meta (with every checkpoint), and `export` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from genai.config import recipe_to_yaml
from genai.run import write_meta
from genai.train.tracking import RunLogger
from genai.train.worker import EpochRows


@dataclass
class Worker:
    """This worker's place in the run: rank, world size, device, the run folder's URI and its TensorBoard logger
    (set by the skeleton once the start step is known)."""

    rank: int
    world: int
    device: torch.device
    run_uri: str
    logger: RunLogger | None = None


class Family:
    """One kind of model. Subclasses set the class attributes and implement the methods."""

    kind: str  # the recipes' `kind`
    job: str  # the job script that trains a recipe of this kind
    counter: str  # what the trainer state counts besides steps ("tokens", "images"), also a reported metric
    rows_per_fetch: int  # rows per Ray Data batch of the training split; 0: no split streamed (the family makes batches)
    prefetch_batches: int
    eval_defaults: dict = {}  # the evaluation metrics reported before the first evaluation
    batches_per_step: int  # batches one step takes from the stream (set by __init__ from the recipe)
    model_config: object  # the model's config (its to_dict() goes into every checkpoint's meta/; set by build)

    # Driver side.
    @staticmethod
    def plan(recipe, log=print):
        """The run's plan (loop_config(run_uri), dataset_uris(), verify_data(), data_uri, manifest); raises
        ConfigError / DatasetError naming what does not fit."""
        raise NotImplementedError

    @staticmethod
    def summary(run, metrics: dict) -> tuple[str, list[str]]:
        """The result headline (", val loss 1.23") and lines of what to do next."""
        raise NotImplementedError

    # Worker side.
    def __init__(self, recipe, cfg: dict, worker: Worker):
        self.recipe, self.cfg, self.worker = recipe, cfg, worker
        self.t = recipe.train
        self.recipe_yaml = recipe_to_yaml(recipe)

    def build(self) -> dict:
        """Models and their DeepSpeed engines, by name (the checkpoint tags' names); the torch seed is the recipe's
        (identical initial weights on every rank)."""
        raise NotImplementedError

    def new_state(self) -> dict:
        """The trainer state of a fresh run (saved as trainer_state.json): step, epoch, epoch_step, the counter."""
        raise NotImplementedError

    def restore_extra(self, folder: str) -> None:
        """Read what write_meta saved besides the engines from a checkpoint folder being restored."""

    def rank_state(self) -> dict | None:
        """What this rank keeps besides its RNG and the engines (every rank, with every checkpoint), or None."""
        return None

    def restore_rank_state(self, state: dict) -> None:
        """Take back what rank_state saved for this rank (on a resume, before prepare)."""

    def rebase(self) -> None:
        """After a restore: the recipe's learning rates and optimizer settings win over the saved ones."""

    def describe(self) -> str:
        """The line rank 0 says when a run starts: model size, precision, device."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Evaluation and sampling set-up, after the restore (it may draw from the restored RNG)."""

    def epoch_steps(self, epoch: int) -> int:
        """Steps every worker takes in `epoch` (the same on all workers)."""
        raise NotImplementedError

    def open_epoch(self, epoch: int, rows: EpochRows):
        """The worker's batch stream of `epoch` (iterable, with drain()) from `rows.epoch()`."""
        raise NotImplementedError

    def step(self, batches: Iterator, state: dict) -> None:
        """One optimizer step (taking batches_per_step batches); accumulates the training statistics and counts
        state[counter]."""
        raise NotImplementedError

    def log_train(self, step: int, seconds_per_step: float) -> dict:
        """Called after each step that logs (log interval, last step) or checkpoints: raise if training diverged
        (the last checkpoint is intact), write the training scalars and the progress line on the steps the family
        logs and return the metrics to report (then the statistics restart), else {}."""
        raise NotImplementedError

    def samples(self, step: int) -> None:
        """Samples into TensorBoard (and the run folder); every rank calls it."""

    def evaluate(self) -> dict:
        """The evaluation metrics now (every rank calls it; they may be collective)."""
        return {}

    def log_eval(self, step: int, metrics: dict) -> None:
        """Write and say the evaluation of `step`."""

    def write_meta(self, meta_dir: str) -> None:
        """A checkpoint's meta/ folder on rank 0: the model config and recipe; subclasses add what sampling and
        restore_extra need."""
        write_meta(meta_dir, self.model_config.to_dict(), self.recipe_yaml)

    def export(self, state: dict) -> str:
        """Write `<run>/export/` (every rank calls it; rank 0 writes) and name what it exported ("the model")."""
        raise NotImplementedError
