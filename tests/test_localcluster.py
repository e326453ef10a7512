"""`python -m cluster.localcluster`: a real multi-node Ray cluster on this machine that leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from test_process_hygiene import gone, kill_leftovers, port_is_free, wait_for_text, wait_until

pytestmark = pytest.mark.slow

NODES_SEEN = """
import json, ray
ray.init()
nodes = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps(sorted(n["Resources"].get("CPU", 0) for n in nodes)))
"""


def start_cli(root: Path, out: Path, *args: str) -> subprocess.Popen:
    with open(out, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "cluster.localcluster", "--dir", str(root), *args],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def exports(text: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S+)$", text, re.M))


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.fixture
def two_nodes(tmp_path):
    """(cli, root, out): `python -m cluster.localcluster --nodes 2` up; whatever it leaves is killed afterwards."""
    root, out = Path(f"/tmp/genai-lc-{os.getpid()}"), tmp_path / "out.txt"
    cli = start_cli(root, out, "--nodes", "2", "--cpus-per-node", "1")
    procs = []
    try:
        wait_for_text(out, "Ctrl-C (or --down) stops it", cli, timeout=180)
        procs = descendants(cli.pid)
        yield cli, root, out
    finally:
        cli.kill()
        kill_leftovers(procs)
        subprocess.run(["rm", "-rf", str(root)])


def test_two_nodes_join_take_work_and_down_stops_every_process(two_nodes):
    cli, root, out = two_nodes
    env = exports(out.read_text())
    port = int(env["RAY_ADDRESS"].rsplit(":", 1)[1])
    procs = descendants(cli.pid)
    assert sum(p.name() == "raylet" for p in procs) == 2  # two raylets: two nodes
    seen = subprocess.run([sys.executable, "-c", NODES_SEEN], env=dict(os.environ, **env), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert seen.returncode == 0, seen.stderr[-3000:]
    assert json.loads(seen.stdout.strip().splitlines()[-1]) == [1.0, 1.0]

    down = subprocess.run([sys.executable, "-m", "cluster.localcluster", "--dir", str(root), "--down"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert cli.wait(timeout=60) == 128 + signal.SIGTERM
    wait_until(lambda: all(gone(p) for p in procs), 30, "every Ray process of the cluster gone")
    assert port_is_free(port)
    again = subprocess.run([sys.executable, "-m", "cluster.localcluster", "--dir", str(root), "--down"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "no cluster is running" in again.stdout


def test_a_cluster_whose_cli_is_killed_goes_down_with_it(two_nodes):
    cli, _, _ = two_nodes
    procs = descendants(cli.pid)
    assert procs
    cli.send_signal(signal.SIGKILL)  # no Python code of the CLI runs: the nodes' death signal does it
    cli.wait()
    wait_until(lambda: all(gone(p) for p in procs), 60, "every Ray process gone after SIGKILL to the CLI")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_cluster_cli_stopped_by_a_signal_stops_its_nodes_first(sig, tmp_path):
    """Ctrl-C, a supervisor's SIGTERM or a closed terminal's SIGHUP: an orderly stop, exit 128 + the signal."""
    root, out = Path(f"/tmp/genai-lc-{os.getpid()}-{sig.name}"), tmp_path / "out.txt"
    cli = start_cli(root, out, "--nodes", "1", "--cpus-per-node", "1")
    procs = []
    try:
        wait_for_text(out, "Ctrl-C (or --down) stops it", cli, timeout=180)
        port = int(exports(out.read_text())["RAY_ADDRESS"].rsplit(":", 1)[1])
        procs = descendants(cli.pid)
        assert any(p.name() == "raylet" for p in procs)
        cli.send_signal(sig)
        assert cli.wait(timeout=60) == 128 + sig
        wait_until(lambda: all(gone(p) for p in procs), 30, f"every Ray process gone after {sig.name} to the CLI")
        assert port_is_free(port)
        assert not (root / "cluster.json").exists()
    finally:
        cli.kill()
        kill_leftovers(procs)
        subprocess.run(["rm", "-rf", str(root)])
