"""An ordered parallel map with Ray Data, for data preparation.

`ordered_map` calls a worker class on every item, spread over a pool of Ray actors (on the embedded local Ray or
the cluster in RAY_ADDRESS), and yields the workers' output tables in item order: what calling the worker on each
item in turn in one process yields, so the prepared data does not depend on how many workers there were or which
finished first. Ray Data streams: outputs wait in the object store (spilled to disk when it fills) only until
the driver takes them, and its back-pressure stops the actors when the driver falls behind.
"""

from __future__ import annotations

from typing import Iterator


def ordered_map(items: list[dict], worker_class: type, kwargs: dict, workers: int) -> Iterator:
    """`worker_class(**kwargs)` in `workers` actors of one CPU each, called with one-row pyarrow tables of the
    items; yields the pyarrow tables it yields, in item order. Needs a connected Ray (cluster.ray_env.connect):
    Ray Data would otherwise start a Ray of its own."""
    import ray
    import ray.data

    if not ray.is_initialized():
        raise RuntimeError("ordered_map needs a connected Ray (cluster.ray_env.connect)")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # item order, whatever the order the actors finish in
    ctx.enable_progress_bars = False  # the caller reports progress
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block per item: one call per item
    ds = ds.map_batches(worker_class, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="pyarrow",
                        concurrency=workers, num_cpus=1)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def cluster_cpus() -> int:
    """Logical CPUs of the connected Ray cluster."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
