"""Ray Tune sweeps where every trial is its own distributed Ray Train run.

Ray Train V2 (the default since Ray 2.51) does not accept a trainer as a Tune trainable: each trial is
a small driver function that builds a TorchTrainer and reports through TuneReportCallback.
"""

from __future__ import annotations

from typing import Any, Callable

from cluster.launch import storage_for_ray


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


def run_sweep(trial_fn: Callable[[dict], None], param_space: dict, *, name: str, storage: str, metric: str,
              mode: str, num_samples: int, max_concurrent_trials: int, scheduler: str, grace_period: int,
              reduction_factor: float, max_t: int, resume: bool):
    """Run (or with `resume`, continue) a sweep; returns Tune's ResultGrid.

    The trial driver takes almost no CPU: the resources are reserved by each trial's Ray Train workers.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    storage_path, storage_fs = storage_for_ray(storage)
    trainable = tune.with_resources(trial_fn, {"cpu": 0.01})
    experiment = f"{storage_path.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, storage_filesystem=storage_fs,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
        return tuner.fit()
    sched = (ASHAScheduler(time_attr="step", max_t=max_t, grace_period=min(grace_period, max_t),
                           reduction_factor=reduction_factor)
             if scheduler == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, scheduler=sched,
                                    max_concurrent_trials=max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    return tuner.fit()
