"""Launching distributed training: Ray Data datasets, ScalingConfig, RunConfig and TorchTrainer."""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable

from cluster.storage import resolve


def storage_for_ray(storage: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) as RunConfig wants them: S3 paths go without the scheme."""
    loc = resolve(storage)
    if loc.local:
        return loc.path, None
    return loc.path, loc.fs


def parquet_datasets(shards: dict[str, list[str]]) -> dict:
    """One Ray Data dataset per split, streamed from the parquet shards (read in order)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the training loop prints progress
    # Ray 2.60's default parquet reader (DataSourceV2: ListFiles -> ReadFiles, footer-reader actors) took 4.6 s
    # to a first batch of a one-shard dataset here, the V1 reader 1.3 s: the start-up of every run.
    ctx.use_datasource_v2 = False
    datasets = {}
    for split, uris in shards.items():
        loc = resolve(uris[0])
        paths = [resolve(u).path for u in uris]
        datasets[split] = ray.data.read_parquet(paths, filesystem=loc.fs, shuffle=None)
    return datasets


def scaling_config(num_workers: int, use_gpu: bool, cpus_per_worker: float, placement: str = "pack"):
    """Ray Train's ScalingConfig; `placement` pack|spread is the workers' placement group strategy (PACK or
    SPREAD: both best effort, unlike STRICT_*, so a run still starts on fewer nodes than workers)."""
    from ray.train import ScalingConfig

    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                         placement_strategy=placement.upper())


class ResourceError(ValueError):
    """The cluster cannot hold the run's workers (and none appeared within the wait)."""


def worker_slots(nodes: list[dict], cpus_per_worker: float, use_gpu: bool) -> int:
    """How many workers of (cpus_per_worker CPUs, 1 GPU if use_gpu) the alive nodes can hold at once."""
    slots = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        res = node.get("Resources", {})
        fit_cpu = int(res.get("CPU", 0) / cpus_per_worker + 1e-9)
        slots += min(fit_cpu, int(res.get("GPU", 0))) if use_gpu else fit_cpu
    return slots


def wait_for_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool, wait_s: float, log=print,
                       nodes: Callable[[], list[dict]] | None = None) -> None:
    """Before fit(): Ray Train would retry a worker group the cluster cannot hold forever (every 60 s, with
    tracebacks). Fail at once when nothing can change (wait_s 0, e.g. the embedded local Ray); on a cluster,
    say once what is awaited (an autoscaler may add nodes) and give up after wait_s seconds.
    `nodes()` lists the cluster's nodes as ray.nodes() does (the default)."""
    if nodes is None:
        import ray

        nodes = ray.nodes
    need = f"{num_workers} worker(s) of {cpus_per_worker:g} CPU{' + 1 GPU' if use_gpu else ''}"
    deadline, said = time.monotonic() + wait_s, False
    while True:
        alive = [n for n in nodes() if n.get("Alive", True)]
        slots = worker_slots(alive, cpus_per_worker, use_gpu)
        if slots >= num_workers:
            return
        gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in alive)
        have = f"its nodes hold {slots} ({gpus:g} GPU(s) in all)"
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait_s:.0f}s" if wait_s else ""
            raise ResourceError(
                f"the Ray cluster cannot hold {need}: {have}{waited}; lower cluster.num_workers or "
                f"cluster.cpus_per_worker{', or set cluster.use_gpu=false' if use_gpu else ''}")
        if not said:
            log(f"waiting up to {wait_s:.0f}s (cluster.resource_wait_s) for room for {need}: {have}", flush=True)
            said = True
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def fit(train_fn: Callable[[dict], None], loop_config: dict, *, datasets: dict, num_workers: int, use_gpu: bool,
        cpus_per_worker: float, storage: str, name: str, max_failures: int, keep_checkpoints: int | None,
        callbacks: list | None = None, placement: str = "pack", embedded: bool = False):
    """Run `train_fn` on `num_workers` Ray Train workers and return Ray's Result.

    Rerunning with the same storage and name resumes from the run's latest checkpoint. `embedded`: Ray is this
    process's own local Ray (cluster/ray_env.py), which goes down with it.
    """
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig

    storage_path, storage_fs = storage_for_ray(storage)
    options = ray.data.ExecutionOptions(preserve_order=True)  # resume replays each worker's row stream
    trainer = trainer_class(embedded)(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=scaling_config(num_workers, use_gpu, cpus_per_worker, placement),
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


def trainer_class(embedded: bool):
    """Ray Train's TorchTrainer; on an embedded Ray, without its placement-group cleaner.

    The cleaner is a detached actor that removes a run's placement groups when its driver dies without doing so,
    on a cluster that outlives the driver. An embedded Ray does not outlive it, and runs no dashboard for the
    cleaner's state queries (they fail every second): one process fewer starting beside the workers (~0.5 s
    sooner to the first step here). Overrides a Ray 2.60 internal; the plain trainer if it moves."""
    from ray.train.torch import TorchTrainer

    if not embedded:
        return TorchTrainer
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer

    class EmbeddedTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks()
                    if not isinstance(cb, PlacementGroupCleanerCallback)]

    return EmbeddedTorchTrainer


def call_in_thread(fn: Callable[[], Any], wait: Callable[[], None] | None = None) -> Any:
    """Run fn() in a thread and return its result (or raise its error) here, calling wait() in this
    thread until fn is done (by default, sleeping 0.2 s)."""
    wait = wait or (lambda: time.sleep(0.2))
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

