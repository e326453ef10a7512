"""Connecting to Ray: a running cluster when RAY_ADDRESS is set (as under `ray job submit`),
otherwise an embedded local Ray started for this process."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from cluster.processes import prune_ray_sessions

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Driver-side settings that Ray Train propagates to its controller and workers.
DRIVER_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # report() blocks ~1.9 s per call at the 2 s default
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else each worker print() reaches the driver twice
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # An embedded Ray on a small machine caps concurrent worker-process starts at its core count and warns at
    # 4x that, which one run (controller, workers, Ray Data's tasks and actors) reaches on 2 cores.
    "RAY_worker_maximum_startup_concurrency": str(max(8, os.cpu_count() or 1)),
}


def op_cache_dir() -> str:
    """DeepSpeed's JIT op cache for this Python environment. Ninja rebuilds an op whenever its build file
    changes, and the build file names the DeepSpeed sources' path, so two virtual environments sharing one
    folder would rebuild each other's ops (~20 s per run): one folder per environment."""
    env_id = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
    return os.path.expanduser(f"~/.cache/genai-cluster/torch_extensions/{env_id}")


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: project importable, DeepSpeed's op cache in a stable place."""
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", op_cache_dir()),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key in ("DS_ACCELERATOR", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def connect(cpus_needed: float = 1.0, log=print, quiet: bool = False, dashboard: bool = True) -> str:
    """Connect to the cluster in RAY_ADDRESS, or start an embedded local Ray with enough logical CPUs.

    `quiet`: Ray's own output (worker processes' lines, Ray's INFO logs) stays in Ray's session logs instead of
    reaching this console; warnings and errors still show. `dashboard`: the embedded Ray runs Ray's dashboard
    (Tune under Train V2 needs it, see STACK_FACTS; one training run does not, and starts ~2 s sooner without).
    Returns "cluster" or "local".
    """
    import ray

    for key, value in DRIVER_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return "existing"
    quiet_options = {"log_to_driver": not quiet, "logging_level": logging.WARNING if quiet else logging.INFO}
    if quiet:
        for name in ("ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        import ray.data  # configures its own loggers on import: the file log keeps everything, the console less

        for handler in logging.getLogger("ray.data").handlers:
            if handler.name == "console":
                handler.setLevel(logging.WARNING)
        # Said on every ray.init of a local Ray; the embedded one keeps token auth on, nothing to act on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet_options)
        log(f"connected to the Ray cluster at {address}")
        return "cluster"
    # Logical CPUs: the workers' reservation plus one whole free CPU (and change) so that Ray Data's
    # 1-CPU read tasks can always be scheduled beside the training workers.
    num_cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed + 0.1) + 1)
    temp_dir = os.environ.get("GENAI_RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "genai-ray"))
    prune_ray_sessions(temp_dir)  # Ray keeps every run's session_* folder (its logs) forever
    # One node that nothing drains: Ray Train's preemption watcher (an actor process per run, and an error line
    # in the logs) has nothing to watch.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The workers' settings go in this process's environment, which the embedded Ray's raylet and every worker
    # process it starts inherit, and not in a job runtime env: the Python workers Ray starts ahead of the first
    # task have none, and only tasks and actors without one can take them (~1.2 s sooner to the first step).
    os.environ.update(worker_env())
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             _temp_dir=temp_dir, **quiet_options)
    start_autoscaling_coordinator()
    logs = os.path.join(temp_dir, "session_latest", "logs")
    log(f"started an embedded local Ray ({num_cpus} logical CPUs; its logs: {logs}); set RAY_ADDRESS to use a cluster")
    return "local"


def start_autoscaling_coordinator() -> None:
    """Start Ray Data's autoscaling coordinator (a named detached actor) now, without waiting for it.

    Ray Train's controller creates it on first use and waits for it (ray.get) before it starts the worker group:
    on a fresh Ray, one process start (~1.3 s here) on the way to the first step. Started here it comes up while
    the driver reads the datasets' metadata and starts the controller. Ray 2.60 internals: skipped if they move."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()
