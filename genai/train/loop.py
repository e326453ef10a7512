"""The one training skeleton every Ray Train worker runs, whatever the model family (genai/train/family.py):
restore, then per step the family's step and every N steps log / sample / evaluate / checkpoint, a graceful stop,
already-complete runs, equal steps on every worker, and the export at the end."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from genai.config import validate_recipe
from genai.run import STOP_FILE, export_location
from genai.train.checkpoint import restore, save_and_report, start_checkpoint
from genai.train.cyclegan import CycleGANFamily
from genai.train.family import Worker
from genai.train.gan import GANFamily
from genai.train.nlg import GPTFamily
from genai.train.sr import SRFamily
from genai.train.tracking import RunLogger, say
from genai.train.vae import VAEFamily
from genai.train.worker import EpochRows, init_worker

FAMILIES = {family.kind: family for family in (GPTFamily, GANFamily, VAEFamily, SRFamily, CycleGANFamily)}


class StopFlag:
    """Graceful stop: the driver writes `<run>/STOP_REQUESTED` (genai/run.py request_stop) on Ctrl-C / SIGTERM and
    the workers checkpoint at the next step and return. Rank 0 looks for the file at most once a second, and
    `requested(step)` is collective on steps divisible by `every` (the log interval, where the loop synchronises
    anyway): every rank gets the same answer, so all stop after the same step, and other steps pay nothing."""

    def __init__(self, run_uri: str, rank: int, device, every: int = 1, poll_s: float = 1.0):
        from cluster.storage import resolve

        self.marker = resolve(run_uri).join(STOP_FILE)
        self.rank, self.device, self.every, self.poll_s = rank, device, every, poll_s
        self._last, self._seen = 0.0, False

    def requested(self, step: int) -> bool:
        if step % self.every:
            return False
        import torch.distributed as dist

        if self.rank == 0 and not self._seen and time.monotonic() - self._last >= self.poll_s:
            self._last = time.monotonic()
            try:
                self._seen = self.marker.exists()
            except OSError:
                self._seen = False  # storage hiccup: look again next time
        flag = torch.tensor([1.0 if self._seen else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def run_epochs(state: dict, max_steps: int, epoch_steps: Callable[[int], int], open_epoch: Callable[[int], object],
               batches_per_step: int, train_step: Callable[[Iterator], None],
               after_step: Callable[[int, bool], None], stop_requested: Callable[[int], bool]) -> bool:
    """The epoch/step bookkeeping; returns True when it stopped on request.

    `state` holds step, epoch and epoch_step (updated here). Each epoch `open_epoch(epoch)` gives the
    worker's batch stream (iterable, with drain()), of which exactly `epoch_steps(epoch)` steps are taken
    (the same on every worker), then the rest is drained. A resumed epoch first skips the batches its
    earlier steps consumed. After each step `after_step(step, stopping)` logs, evaluates and checkpoints."""
    while state["step"] < max_steps:
        epoch = state["epoch"]
        n_steps = epoch_steps(epoch)
        stream = open_epoch(epoch)
        batches = iter(stream)
        for _ in range(state["epoch_step"] * batches_per_step):  # resume mid-epoch: skip what was trained on
            next(batches)
        while state["epoch_step"] < n_steps and state["step"] < max_steps:
            train_step(batches)
            state["step"] += 1
            state["epoch_step"] += 1
            stopping = stop_requested(state["step"])
            after_step(state["step"], stopping)
            if stopping:
                return True
        if state["epoch_step"] >= n_steps:
            stream.drain()
            state["epoch"], state["epoch_step"] = epoch + 1, 0
    return False


def train_loop_per_worker(cfg: dict) -> None:
    """Runs in each Ray Train worker: the family of the recipe's kind trains, evaluates, checkpoints and exports."""
    import ray.train

    recipe = validate_recipe(cfg["recipe"])
    t, c = recipe.train, recipe.cluster
    rank, world, device = init_worker(c.torch_threads, cfg.get("console"), cfg["run_uri"])
    worker = Worker(rank, world, device, cfg["run_uri"])
    family = FAMILIES[recipe.kind](recipe, cfg, worker)
    train_rows = None  # a family with no rows to fetch (sr, cyclegan) draws its own batches
    if family.rows_per_fetch:
        train_rows = EpochRows(ray.train.get_dataset_shard("train"), family.rows_per_fetch, family.prefetch_batches)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    engines = family.build()
    torch.manual_seed(t.seed + 1000 * rank)  # dropout and noise differ across ranks (a resume restores the RNG)
    state = dict(family.new_state(), world_size=world)
    checkpoint = start_checkpoint(cfg)
    if checkpoint:
        restored, restore_s = restore(checkpoint, engines, rank, world, load_extra=family.restore_extra,
                                      load_rank_state=family.restore_rank_state)
        state.update(restored)
        family.rebase()
    resumed_step = state["step"]

    logger = worker.logger = RunLogger(cfg["run_uri"], rank, resumed_step, t.max_steps)
    if checkpoint:
        logger.scalars(resumed_step, {"perf/restore_s": restore_s})
    if rank == 0 and resumed_step == 0:
        say(family.describe())
    family.prepare()

    last = dict(family.eval_defaults)
    step_t0, steps_timed = time.perf_counter(), 0

    def after_step(step: int, stopping: bool) -> None:
        nonlocal step_t0, steps_timed
        save = stopping or step % t.checkpoint_interval == 0 or step == t.max_steps
        metrics: dict = {}
        if save or step % t.log_interval == 0 or step == t.max_steps:
            metrics.update(family.log_train(step, (time.perf_counter() - step_t0) / max(1, steps_timed)))
        if t.sample_interval and (step % t.sample_interval == 0 or step == t.max_steps):
            family.samples(step)
        if step % t.eval_interval == 0 or step == t.max_steps:
            evaluation = family.evaluate()
            last.update(evaluation)
            family.log_eval(step, evaluation)
        if save or step % t.eval_interval == 0:
            metrics.update(step=step, epoch=state["epoch"], **{family.counter: state[family.counter]}, **last)
            logger.flush()
            if save:
                logger.scalars(step, {"perf/checkpoint_s": save_and_report(engines, dict(state), metrics, rank,
                                                                           family.write_meta, family.rank_state)})
            else:
                ray.train.report(metrics)
        if metrics:
            step_t0, steps_timed = time.perf_counter(), 0

    def train_step(batches: Iterator) -> None:
        nonlocal steps_timed
        family.step(batches, state)
        steps_timed += 1

    stopped = run_epochs(state, t.max_steps, family.epoch_steps, lambda epoch: family.open_epoch(epoch, train_rows),
                         family.batches_per_step, train_step, after_step,
                         StopFlag(cfg["run_uri"], rank, device, t.log_interval).requested)
    if stopped:
        logger.close()
        if rank == 0:
            say(f"stopped on request after step {state['step']}; its checkpoint is saved")
        return
    if resumed_step >= t.max_steps:  # already complete: report its result again (Tune, the driver's summary)
        if rank == 0:
            say(f"run already complete at step {resumed_step}; refreshing the export")
        ray.train.report({"step": resumed_step, "epoch": state["epoch"], family.counter: state[family.counter],
                          **family.evaluate()})
    exported = family.export(state)
    logger.close()
    if rank == 0:
        say(f"exported {exported} to {export_location(cfg['run_uri']).uri}")
