"""Several Ray nodes on this machine (cluster/localcluster.py): a head that takes no work and two worker nodes,
runs stored in the local S3 server that every node shares. Workers are placed where the recipe asks, and a run
that loses a whole worker node (its raylet and every process under it, SIGKILLed) goes on from its last
checkpoint on the node that is left and ends at the step it was asked for."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, SERVICES

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def three_nodes():
    """A head with 0 CPUs (as on most real clusters, it runs drivers, not training) and two 2-CPU worker nodes."""
    from cluster.localcluster import LocalCluster

    root = tempfile.mkdtemp(prefix="genai-3n-")  # short: Ray's socket paths live under it
    cluster = LocalCluster(root, nodes=3, cpus_per_node=2, head_cpus=0, env=SERVICES.object_store().env()).start()
    yield cluster
    cluster.stop()


def node_ids(cluster) -> list[str | None]:
    """The Ray node id of each of the cluster's nodes, head first; None for a node Ray has seen die."""
    out = subprocess.run([sys.executable, "-c", "import json, ray; ray.init(); print(json.dumps("
                          "{n['NodeManagerPort']: n['NodeID'] for n in ray.nodes() if n['Alive']}))"],
                         capture_output=True, text=True, env=job_env(cluster), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    alive = {int(port): node_id for port, node_id in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    return [alive.get(node.manager_port) for node in cluster.members]


def job_env(cluster, **extra) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **cluster.client_env(), **SERVICES.object_store().env(), **extra}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def workers_of(run_uri: str) -> list[dict]:
    from cluster.storage import resolve

    return json.loads(resolve(run_uri).join("workers.json").read_text())["workers"]


def test_spread_places_one_worker_per_worker_node_through_ray_job_submit(three_nodes, char_dataset, s3_env):
    run = f"s3://runs/spread-{uuid.uuid4().hex[:8]}"
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--working-dir", str(ROOT), "--", "python",
                        "jobs/train_nlg.py", "--recipe", "tiny", "--data", char_dataset, "--storage", run.rsplit("/", 1)[0],
                        "--name", run.rsplit("/", 1)[1], "--set", "cluster.num_workers=2", "--set",
                        "cluster.placement=spread", "--set", "train.max_steps=10", "--set", "train.eval_interval=10"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=job_env(three_nodes, RAY_ADDRESS=three_nodes.dashboard_url))
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "2 workers on 2 node(s)" in out and f"done: run {run.rsplit('/', 1)[1]} at step 10" in out, out[-4000:]
    placed = {w["node_id"] for w in workers_of(run)}  # from the workers' own Ray runtime context
    head, *workers = node_ids(three_nodes)
    assert placed == set(workers) and head not in placed


def test_a_lost_worker_node_costs_at_most_the_last_checkpoint_interval(three_nodes, char_dataset, s3_env,
                                                                        fault_report):
    name = f"lost-{uuid.uuid4().hex[:8]}"
    run = f"s3://runs/{name}"
    # Packed: both workers on one node, the one that is lost. Half a CPU each leaves the node that is left room
    # for both workers and the Ray Data tasks that feed them.
    sets = ("cluster.num_workers=2", "cluster.cpus_per_worker=0.5", "cluster.placement=pack",
            "train.max_steps=400", "train.checkpoint_interval=20", "train.eval_interval=400",
            "train.log_interval=10", "train.sample_interval=0")
    ids = node_ids(three_nodes)
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train_nlg.py"), "--recipe", "tiny", "--data",
                             char_dataset, "--storage", "s3://runs", "--name", name,
                             *[a for s in sets for a in ("--set", s)]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=job_env(three_nodes))
    lines: list[str] = []
    saved: list[int] = []  # the checkpoints the console has said are saved, in order
    second = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if m := re.match(r"checkpoint_(\d+) saved", line):
                saved.append(int(m.group(1)))
                if len(saved) == 2:
                    second.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert second.wait(400), "".join(lines)[-4000:]
        before = workers_of(run)
        lost_id = before[0]["node_id"]
        assert {w["node_id"] for w in before} == {lost_id} and lost_id in ids[1:], before  # packed on a worker node
        lost = three_nodes.members[ids.index(lost_id)]
        tree = [psutil.Process(lost.proc.pid), *psutil.Process(lost.proc.pid).children(recursive=True)]
        assert any(p.name() == "raylet" for p in tree)
        for p in tree:  # the whole node at once: `ray start`, its raylet, object store, workers
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        last_saved = saved[-1]
        assert proc.wait(timeout=600) == 0, "".join(lines)[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    out = "".join(lines)
    m = re.search(r"resumed from \S+checkpoint_(\d+) at step (\d+)\b", out)
    assert m, out[-4000:]
    kept = int(m.group(2))
    # The last checkpoint saved when the node went (or the one before, had it gone while that one was reported).
    assert kept in (last_saved, last_saved - 20), (kept, last_saved, out[-4000:])
    logged = [int(s) for s in re.findall(r"^step +(\d+)/400", out[:m.start()], re.M)]
    if logged[-1] > kept:  # the console names what is trained again
        assert f"steps {kept + 1}-{logged[-1]} (at least; the last reported) are trained again" in out, out[-4000:]
    assert f"done: run {name} at step 400" in out, out[-4000:]
    after = {w["node_id"] for w in workers_of(run)}
    alive = node_ids(three_nodes)
    assert lost_id not in alive and after <= set(alive) - {None}, (after, alive)
    fault_report("a whole worker node (raylet and all its processes) SIGKILLed mid-run", kept, logged[-1] - kept,
                 "the run ended at step 400 on the node that was left")
