"""The training job runs unchanged on a running cluster: `ray start --head` + `ray job submit`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real single-node Ray cluster on loopback, stopped afterwards."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    dash = free_port()
    temp = Path("/tmp") / f"genai-rayhead-{os.getpid()}"
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    env.update(RAY_ADDRESS=f"http://127.0.0.1:{dash}", RAY_AUTH_MODE="token")
    try:
        yield env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, env=env, timeout=120)


def submit(env, *entrypoint: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", "submit", "--working-dir", str(ROOT), "--", *entrypoint],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_submitted_training_job_succeeds_and_a_bad_one_reports_failure(ray_head, char_dataset, tmp_path):
    ok = submit(ray_head, "python", "jobs/train_nlg.py", "--recipe", "tiny", "--data", char_dataset,
                "--storage", str(tmp_path), "--name", "submitted", "--set", "train.max_steps=20")
    assert ok.returncode == 0, ok.stdout[-4000:] + ok.stderr[-4000:]
    assert "connected to the Ray cluster" in ok.stdout and "done: run submitted at step 20" in ok.stdout
    assert "succeeded" in ok.stdout
    assert (tmp_path / "submitted" / "export" / "export.json").exists()

    bad = submit(ray_head, "python", "jobs/train_nlg.py", "--recipe", "tiny", "--set", "train.lr=fast")
    assert bad.returncode != 0
    output = bad.stdout + bad.stderr
    assert "train.lr: Input should be a valid number" in output, output[-3000:]
    assert "failed" in output.lower()
