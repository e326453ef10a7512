"""Shared fixtures: the test corpus, a small prepared dataset, and a helper that runs the real job scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the clone: CI has it, a newcomer does not. GENAI_SHARED_DIR points the tests elsewhere
# (.ci/run hides it this way to run the suite as a newcomer does).
SHARED = Path(os.environ.get("GENAI_SHARED_DIR", ROOT.parent / "shared"))
SHARED_DATA = SHARED / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"


def needs_shared(path: Path, what: str):
    """Mark a test that needs `what` from ../shared at `path`: skipped with a reason without it, and selected by
    CI's second pass (`-m shared_data`). Every such test has an equivalent on builtin data."""

    def mark(test):
        test = pytest.mark.shared_data(test)
        return pytest.mark.skipif(not path.exists(), reason=f"{what} not at {path} (it comes with ../shared)")(test)

    return mark


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """Tiny Shakespeare from ../shared when present, else the builtin offline corpus written to a file."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    from genai.data.sources import read_corpus

    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text(read_corpus("builtin:shakespeare")[:1_115_394])
    return path


@pytest.fixture(scope="session")
def char_dataset(corpus_file, tmp_path_factory) -> str:
    """A char-level dataset with short rows, so that two workers get many rows each."""
    from genai.data.text_dataset import prepare_text_dataset

    out = tmp_path_factory.mktemp("datasets") / "shakespeare-char"
    prepare_text_dataset(str(corpus_file), str(out), chunk_tokens=256, log=lambda *_: None)
    return str(out)


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory) -> str:
    """scikit-learn's digits prepared as an image dataset (28x28, train/val)."""
    from genai.data.image_dataset import prepare_image_dataset

    out = tmp_path_factory.mktemp("datasets") / "digits"
    prepare_image_dataset("builtin:digits", str(out), log=lambda *_: None)
    return str(out)


@pytest.fixture(scope="session")
def classifier(digits_dataset, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("classifier") / "digits-clf"
    r = run_job("train_classifier.py", "--data", digits_dataset, "--out", str(out), "--epochs", "3")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return str(out)


# Jobs that start Ray run on one Ray cluster shared by the whole test session (started on first use): each
# run then connects in about a second instead of starting and stopping an embedded Ray of its own. A test
# that needs the embedded Ray passes env={"RAY_ADDRESS": ""}.
RAY_JOBS = {"train.py", "train_nlg.py", "train_gan.py", "tune.py", "prepare_data.py"}


class SharedServices:
    """The servers the integration tests share: a local S3 server and a one-node Ray cluster whose workers
    reach it. Each starts on first use, dies with this process, and stops at the end of the session."""

    def __init__(self):
        self.base: Path | None = None  # pytest's basetemp, once the session has one
        self.ray_root: str | None = None
        self.store = None
        self.cluster = None

    def object_store(self):
        if self.store is None:
            from cluster.objectstore import ObjectStore

            folder = tempfile.mkdtemp(prefix="seaweedfs", dir=self.base)
            self.store = ObjectStore(folder, ["datasets", "runs"]).start()
        return self.store

    def ray_cluster(self):
        if self.cluster is None:
            from cluster.localcluster import LocalCluster

            self.ray_root = tempfile.mkdtemp(prefix="genai-test-ray-")  # short: Ray's socket paths live under it
            # As many logical CPUs as the embedded Ray of the largest test run would have (cluster/ray_env.py).
            self.cluster = LocalCluster(self.ray_root, nodes=1, cpus_per_node=4,
                                        env=self.object_store().env()).start()
        return self.cluster

    def stop(self):
        if self.cluster:
            self.cluster.stop()
            shutil.rmtree(self.ray_root, ignore_errors=True)
        if self.store:
            self.store.stop()


SERVICES = SharedServices()


@pytest.fixture(scope="session", autouse=True)
def _shared_services(tmp_path_factory):
    SERVICES.base = tmp_path_factory.getbasetemp()


def pytest_sessionfinish(session):
    SERVICES.stop()


def ray_job_env() -> dict[str, str]:
    """The environment for a Ray job a test starts itself (Popen): on the session's Ray cluster."""
    return dict(os.environ, PYTHONUNBUFFERED="1", **SERVICES.ray_cluster().client_env())


def run_job(script: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run jobs/<script> as a user would and capture its output (Ray jobs on the session's Ray cluster)."""
    shared = script in RAY_JOBS and "RAY_ADDRESS" not in (env or {}) and not os.environ.get("RAY_ADDRESS")
    full_env = ray_job_env() if shared else dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


def exported_weights(run: Path, kind: str, step: int | None = None) -> dict:
    """The weights a run of `kind` exported (export/export.json names the file), checking the export's step."""
    import json

    import torch

    index = json.loads((run / "export" / "export.json").read_text())
    assert index["kind"] == kind and (step is None or index["step"] == step), index
    return torch.load(run / "export" / index["weights"])


@pytest.fixture
def one_thread():
    """One torch intra-op thread for a pure-torch test: on a busy 2-core machine more threads spin against each
    other and run ~30x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def job():
    return run_job


@pytest.fixture(scope="session")
def object_store():
    """A real SeaweedFS S3 server on loopback (free ports, fresh data folder), with buckets datasets/runs; the
    shared Ray cluster's workers reach it."""
    return SERVICES.object_store()


@pytest.fixture
def s3_env(object_store, monkeypatch):
    """The AWS environment pointing at the local object store, in this process and for jobs it runs."""
    for key, value in object_store.env().items():
        monkeypatch.setenv(key, value)
    return object_store.env()


# Fault-injection tests record what each fault cost, and the bad-input sweep each case and its error; both
# tables are printed at the end of the test run.
FAULTS: list[str] = []
BAD_INPUT: list[str] = []


@pytest.fixture
def fault_report(request):
    """record(fault, kept_step, lost_steps): what a fault left and what it cost, for the end-of-run summary."""

    def record(fault: str, kept_step: int | None, lost_steps: int | None, note: str = "") -> None:
        outcome = (f"resumed from the checkpoint of step {kept_step}; steps lost (trained again): {lost_steps}"
                   if kept_step is not None else "the run went on without a restart; nothing lost")
        FAULTS.append(f"{request.node.name}: {fault} -> {outcome}{'; ' + note if note else ''}")

    return record


def pytest_terminal_summary(terminalreporter):
    for title, lines in (("bad input: every job, each case and its one-line error", BAD_INPUT),
                         ("fault injection: what each fault lost", FAULTS)):
        if lines:
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)
