"""The training job runs unchanged on a running cluster: `ray start --head` + `ray job submit`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SERVICES

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    """The session's real Ray cluster (`ray start --head`, see cluster/localcluster.py), reached as `ray job
    submit` reaches one: through its dashboard, with Ray's token auth."""
    cluster = SERVICES.ray_cluster()
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_ADDRESS=cluster.dashboard_url,
                RAY_AUTH_MODE="token")


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
