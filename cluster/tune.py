"""Ray Tune sweeps where every trial is its own distributed Ray Train run.

Ray Train V2 (the default since Ray 2.51) does not accept a trainer as a Tune trainable: each trial is
a small driver function that builds a TorchTrainer. Ray's TuneReportCallback forwards only metrics, so
Population Based Training would have nothing to clone; `fit_reporting_to_tune` forwards each Train report
to Tune together with a small pointer checkpoint naming the Train checkpoint it came with.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

from cluster.launch import call_in_thread, storage_for_ray

POINTER_FILE = "pointer.json"


def _forwarding_callback(queue):
    from ray.train.v2.api.callback import UserCallback

    class ForwardReports(UserCallback):
        """Runs in the Train controller: hands every report (rank 0's metrics, checkpoint name) to the trial."""

        def after_report(self, run_context, metrics, checkpoint):
            queue.put((metrics[0], os.path.basename(checkpoint.path.rstrip("/")) if checkpoint else None))

    return ForwardReports()


def fit_reporting_to_tune(fit_fn: Callable[[list], Any], pointer: dict):
    """Call `fit_fn(callbacks)` (a Ray Train fit) and report each of its results to Tune as it arrives.

    Every result carries the `pointer` entries (trial, run, ...) among its metrics. One that came with a
    Train checkpoint is reported with a Tune checkpoint holding `pointer` plus that checkpoint's folder name
    and step; `read_pointer` gives it back when Tune restarts the trial (a resumed sweep, or PBT cloning one
    trial's checkpoint into another). Metrics without a value are dropped (the schedulers compare numbers)."""
    from queue import Empty

    from ray import tune
    from ray.util.queue import Queue

    queue = Queue(1, actor_options={"num_cpus": 0})  # Train waits for Tune, as with Ray's TuneReportCallback
    last = {"step": None}

    def report(metrics: dict, checkpoint: str | None) -> None:
        metrics = {**{k: v for k, v in metrics.items() if v is not None}, **pointer}
        last["step"] = metrics.get("step")
        if checkpoint is None:
            tune.report(metrics)
            return
        folder = tempfile.mkdtemp(prefix="genai-pointer-")
        try:
            with open(os.path.join(folder, POINTER_FILE), "w") as f:
                json.dump(dict(pointer, checkpoint=checkpoint, step=metrics["step"]), f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def forward(timeout: float | None) -> bool:
        try:
            metrics, checkpoint = queue.get(block=timeout is not None, timeout=timeout)
        except Empty:
            return False
        report(metrics, checkpoint)
        return True

    try:
        result = call_in_thread(lambda: fit_fn([_forwarding_callback(queue)]), wait=lambda: forward(0.5))
    finally:
        while forward(None):  # the reports that arrived as the run ended (or failed)
            pass
    # Tune's last result must be the run's last: should the final report not have come through the callback,
    # report what Train itself kept (its last metrics and checkpoint).
    final = result.metrics or {}
    if final.get("step") is not None and final.get("step") != last["step"]:
        print(f"the final report (step {final['step']}) had not reached Tune (last: step {last['step']}); "
              "reporting it now", flush=True)
        name = os.path.basename(result.checkpoint.path.rstrip("/")) if result.checkpoint else None
        report(final, name if name == f"checkpoint_{final['step']:08d}" else None)
    return result


def read_pointer() -> dict | None:
    """The pointer of the checkpoint Tune (re)starts this trial from, or None for a fresh trial."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, POINTER_FILE)) as f:
            return json.load(f)


def search_space(parameters: dict[str, Any]) -> dict:
    """Tune domains from the sweep's parameter specs (objects with choice/grid/uniform/loguniform/randint)."""
    from ray import tune

    space = {}
    for key, spec in parameters.items():
        if spec.choice is not None:
            space[key] = tune.choice(spec.choice)
        elif spec.grid is not None:
            space[key] = tune.grid_search(spec.grid)
        elif spec.uniform is not None:
            space[key] = tune.uniform(*spec.uniform)
        elif spec.loguniform is not None:
            space[key] = tune.loguniform(*spec.loguniform)
        else:
            space[key] = tune.randint(*spec.randint)
    return space


def _scheduler(sched, *, mutations: dict, max_t: int, checkpoint_interval: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler

    class PBT(PopulationBasedTraining):
        """PBT that leaves a trial's last result alone: cloning a finished run helps nothing."""

        def on_trial_result(self, tune_controller, trial, result):
            if result.get("step", 0) >= max_t:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    if sched.type == "asha":
        return ASHAScheduler(time_attr="step", max_t=max_t, grace_period=min(sched.grace_period, max_t),
                             reduction_factor=sched.reduction_factor)
    if sched.type == "pbt":
        return PBT(
            time_attr="step", perturbation_interval=sched.perturbation_interval or checkpoint_interval,
            hyperparam_mutations=mutations, quantile_fraction=sched.quantile_fraction,
            resample_probability=sched.resample_probability, synch=sched.synch, require_attrs=False)
    return FIFOScheduler()


def _search_alg(search: str, seed: int | None):
    """Tune's search algorithm: None (Tune's own random/grid sampling of the param space) or OptunaSearch (TPE;
    Tune gives it the metric, mode and the param space's domains)."""
    if search != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=seed)


def run_sweep(trial_fn: Callable[[dict], None], parameters: dict, *, name: str, storage: str, metric: str,
              mode: str, num_samples: int, max_concurrent_trials: int, scheduler, max_t: int,
              checkpoint_interval: int, resume: bool, search: str = "random", seed: int | None = None):
    """Run (or with `resume`, continue) a sweep; returns Tune's ResultGrid.

    The trial driver takes almost no CPU: the resources are reserved by each trial's Ray Train workers.
    """
    from ray import tune

    storage_path, storage_fs = storage_for_ray(storage)
    trainable = tune.with_resources(trial_fn, {"cpu": 0.01})
    experiment = f"{storage_path.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, storage_filesystem=storage_fs,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
        return tuner.fit()
    param_space = search_space(parameters)
    # PBT explores the same ranges it started from (grids as choices).
    mutations = {k: (spec.grid if spec.grid is not None else param_space[k]) for k, spec in parameters.items()}
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=num_samples, max_concurrent_trials=max_concurrent_trials,
            search_alg=_search_alg(search, seed),
            scheduler=_scheduler(scheduler, mutations=mutations, max_t=max_t,
                                 checkpoint_interval=checkpoint_interval)),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    return tuner.fit()
