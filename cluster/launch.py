"""Launching distributed training: Ray Data datasets, ScalingConfig, RunConfig and TorchTrainer."""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable

from cluster.storage import Location, resolve


def run_location(storage: str, name: str) -> Location:
    return resolve(storage).join(name)


def storage_for_ray(storage: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) as RunConfig wants them: S3 paths go without the scheme."""
    loc = resolve(storage)
    if loc.local:
        return loc.path, None
    return loc.path, loc.fs


def parquet_datasets(shards: dict[str, list[str]]) -> dict:
    """One Ray Data dataset per split, streamed from the parquet shards (read in order)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the training loop prints progress
    datasets = {}
    for split, uris in shards.items():
        loc = resolve(uris[0])
        paths = [resolve(u).path for u in uris]
        datasets[split] = ray.data.read_parquet(paths, filesystem=loc.fs, shuffle=None)
    return datasets


def scaling_config(num_workers: int, use_gpu: bool, cpus_per_worker: float):
    from ray.train import ScalingConfig

    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def fit(train_fn: Callable[[dict], None], loop_config: dict, *, datasets: dict, num_workers: int, use_gpu: bool,
        cpus_per_worker: float, storage: str, name: str, max_failures: int, keep_checkpoints: int | None,
        callbacks: list | None = None):
    """Run `train_fn` on `num_workers` Ray Train workers and return Ray's Result.

    Rerunning with the same storage and name resumes from the run's latest checkpoint.
    """
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = storage_for_ray(storage)
    options = ray.data.ExecutionOptions(preserve_order=True)  # resume replays each worker's row stream
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=scaling_config(num_workers, use_gpu, cpus_per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=options, enable_shard_locality=False),
    )
    return trainer.fit()


def call_in_thread(fn: Callable[[], Any], wait: Callable[[], None] = lambda: time.sleep(0.2)) -> Any:
    """Run fn() in a thread and return its result (or raise its error) here, calling wait() in this
    thread until fn is done."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="fit", daemon=True)
    thread.start()
    while thread.is_alive():
        wait()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def error_cause(exc: BaseException) -> str:
    """The line of a (Ray Train) failure that says what went wrong: the last `SomeError: message` line of
    the workers' tracebacks, else the last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", line)]
    return (causes or lines or [type(exc).__name__])[-1]


def run_name_default(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"

