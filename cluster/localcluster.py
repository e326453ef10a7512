"""A Ray cluster on this machine: a head and N-1 worker nodes, each its own `ray start` (raylet, object store,
resources), for development and the integration tests.

    python -m cluster.localcluster --nodes 3
prints the environment to export (RAY_ADDRESS and, with --object-store, the S3 endpoint every node shares) and
serves until Ctrl-C (or SIGTERM, SIGHUP); `python -m cluster.localcluster --down` stops one started earlier with
the same --dir. Every node runs under `ray start --block`, which stops its Ray processes when it gets SIGTERM;
each gets SIGTERM when the process that started it dies, however it dies (see cluster/processes.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.objectstore import ObjectStore, free_port
from cluster.processes import die_with_parent, stop_on_signals
from cluster.ray_env import DRIVER_ENV_DEFAULTS, worker_env

STATE_FILE = "cluster.json"
READY_LINE = "Ray runtime started"


def ray_binary() -> str:
    return str(Path(sys.executable).parent / "ray")


@dataclass
class Node:
    """One `ray start --block` process and what it was started with."""

    index: int
    cpus: float
    log: str
    manager_port: int  # its raylet's port: ray.nodes() gives it as NodeManagerPort, beside the node's id
    proc: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalCluster:
    """Ray nodes on loopback under one folder (`root`: Ray's temp dir and the nodes' logs).

    `env` is added to every node's environment (e.g. an object store's AWS variables, which the Ray workers
    then inherit). Keep `root` short: Ray's socket paths under it must fit in 107 characters."""

    root: str
    nodes: int = 1
    cpus_per_node: float = 2
    head_cpus: float | None = None  # None: cpus_per_node; 0 keeps work off the head, as on most real clusters
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    dashboard_port: int = 0
    agent_port: int = 0  # the head's dashboard agent, which runs submitted jobs
    members: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a driver (RAY_ADDRESS) or `ray job submit` (the dashboard; token auth is on) needs."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}

    def start(self, timeout: float = 120) -> "LocalCluster":
        os.makedirs(self.root, exist_ok=True)
        self.port = self.port or free_port()
        self.dashboard_port = self.dashboard_port or free_port()
        self.agent_port = self.agent_port or free_port()
        # The nodes run with Ray's token auth, which needs a token to exist (~/.ray/auth_token by default); on a
        # fresh machine make one, as ray.init() does for an embedded Ray. It is never printed.
        subprocess.run([ray_binary(), "get-auth-token", "--generate"], capture_output=True, check=True)
        try:
            for i in range(self.nodes):
                self.add_node(timeout)
        except BaseException:
            self.stop()
            raise
        Path(self.root, STATE_FILE).write_text(json.dumps(
            {"pid": os.getpid(), "address": self.address, "dashboard": self.dashboard_url}))
        return self

    def add_node(self, timeout: float = 120) -> Node:
        """Start the head (first call) or one more worker node, and wait until it has joined."""
        i = len(self.members)
        cpus = self.head_cpus if i == 0 and self.head_cpus is not None else self.cpus_per_node
        node = Node(i, cpus, os.path.join(self.root, f"node-{i}.log"), free_port())
        common = [f"--num-cpus={cpus:g}", "--node-ip-address=127.0.0.1", f"--node-manager-port={node.manager_port}",
                  "--disable-usage-stats", "--block"]
        if i == 0:
            args = ["--head", f"--port={self.port}", f"--temp-dir={os.path.abspath(self.root)}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                    f"--dashboard-agent-listen-port={self.agent_port}"]
        else:  # its own ports: several nodes on one machine would otherwise take the same defaults
            args = [f"--address={self.address}", f"--object-manager-port={free_port()}",
                    f"--min-worker-port={20000 + 2000 * i}", f"--max-worker-port={20000 + 2000 * i + 1999}", f"--metrics-export-port={free_port()}",
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}"]
        env = dict(os.environ, **DRIVER_ENV_DEFAULTS, **worker_env(), **self.env,
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # a stop here means stop now
                   RAY_AUTH_MODE="token")  # the head's default; a joining node must say so to present the token
        env.pop("RAY_ADDRESS", None)
        # `python` in a submitted job's entrypoint is this environment's (with the project's dependencies).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        with open(node.log, "ab") as log:  # the child keeps its own copy
            node.proc = subprocess.Popen([ray_binary(), "start", *args, *common], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                         preexec_fn=die_with_parent())
        self.members.append(node)
        self._wait_joined(node, timeout)
        return node

    def _wait_joined(self, node: Node, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not node.alive:
                tail = Path(node.log).read_text(errors="replace").strip().splitlines()[-8:]
                raise RuntimeError(f"ray start (node {node.index}) exited with {node.proc.returncode}; the end of "
                                   f"{node.log}:\n" + "\n".join(tail))
            # The head is ready once its job agent listens too: `ray job submit` right after `ray start` would
            # otherwise fail with "No available agent to submit job".
            if READY_LINE in Path(node.log).read_text(errors="replace") and (node.index or listening(self.agent_port)):
                return
            time.sleep(0.3)
        raise RuntimeError(f"node {node.index} did not start within {timeout:.0f}s; see {node.log}")

    def stop_node(self, node: Node, timeout: float = 60) -> None:
        """An orderly stop of one node: `ray start --block` stops its raylet and workers on SIGTERM."""
        if not node.alive:
            return
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()

    def stop(self) -> None:
        """Stop every node, worker nodes first."""
        for node in reversed(self.members):
            self.stop_node(node)
        Path(self.root, STATE_FILE).unlink(missing_ok=True)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_started(root: str, timeout: float = 90) -> bool:
    """Stop the cluster a `python -m cluster.localcluster` under `root` runs (SIGTERM to it, which stops its
    nodes in order). False when there is none."""
    state = Path(root, STATE_FILE)
    if not state.exists():
        return False
    pid = json.loads(state.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state.unlink(missing_ok=True)
        return False
    deadline = time.time() + timeout
    while state.exists() and time.time() < deadline:
        time.sleep(0.3)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2, help="head + this many minus one worker nodes")
    p.add_argument("--cpus-per-node", type=float, default=2, help="logical CPUs each node offers Ray")
    p.add_argument("--head-cpus", type=float, help="logical CPUs of the head (default: --cpus-per-node; 0 keeps "
                   "training workers and data tasks on the worker nodes)")
    p.add_argument("--dir", default="/tmp/genai-localcluster", help="Ray's temp dir and the nodes' logs")
    p.add_argument("--object-store", action="store_true",
                   help="also start a local S3 server (SeaweedFS, buckets datasets and runs) that every node uses")
    p.add_argument("--down", action="store_true", help="stop the cluster started earlier with this --dir")
    args = p.parse_args()
    root = os.path.expanduser(args.dir)
    if args.down:
        print("stopped" if stop_started(root) else f"no cluster is running under {root}")
        return
    if args.nodes < 1:
        p.error(f"--nodes {args.nodes}: at least 1 (the head)")
    store = ObjectStore(os.path.join(root, "s3"), ["datasets", "runs"]) if args.object_store else None
    cluster = LocalCluster(root, args.nodes, args.cpus_per_node, head_cpus=args.head_cpus)

    def stop() -> None:
        cluster.stop()
        if store:
            store.stop()

    with stop_on_signals(stop):
        if store:
            cluster.env = store.start().env()
        cluster.start()
        cpus = " + ".join(f"{n.cpus:g}" for n in cluster.members)
        print(f"# a Ray cluster of {args.nodes} node(s) ({cpus} CPUs, head first) is up. In another shell:")
        for k, v in {**cluster.client_env(), **cluster.env}.items():
            print(f"export {k}={v}")
        print(f"# dashboard {cluster.dashboard_url}; logs in {root}; Ctrl-C (or --down) stops it", flush=True)
        while all(node.alive for node in cluster.members):
            time.sleep(1)
        dead = [n.index for n in cluster.members if not n.alive]
        sys.exit(f"node(s) {dead} stopped; see their logs in {root}")


if __name__ == "__main__":
    main()
