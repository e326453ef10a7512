"""The servers the project starts never outlive the process that started them, however it ends; Ray's
session folders do not pile up."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from cluster.objectstore import free_port
from cluster.processes import die_with_parent, prune_ray_sessions, stop_on_signals
from conftest import ROOT

STOPS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.1)


def weeds_under(folder: Path) -> list[psutil.Process]:
    """The `weed` servers whose data folder is in `folder`: only those this test started."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        args = proc.info["cmdline"] or []
        if proc.info["name"] == "weed" and any(a.startswith(f"-dir={folder}{os.sep}") for a in args):
            found.append(proc)
    return found


def kill_leftovers(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a server's closed connections may linger
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{path.read_text()[-3000:]}"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", STOPS, ids=[s.name for s in STOPS])
def test_objectstore_cli_takes_its_server_down_however_it_is_stopped(sig, tmp_path):
    port = free_port()
    out = tmp_path / "out.txt"
    with open(out, "w") as log:
        cli = subprocess.Popen([sys.executable, "-m", "cluster.objectstore", "--dir", str(tmp_path / "s3"),
                                "--bucket", "runs,data", "--port", str(port)], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
    weeds = []
    try:
        wait_for_text(out, "SeaweedFS S3 is up", cli)
        weeds = weeds_under(tmp_path)
        assert [w.ppid() for w in weeds] == [cli.pid]
        cli.send_signal(sig)
        assert cli.wait(timeout=30) == (-sig if sig == signal.SIGKILL else 128 + sig)
        wait_until(lambda: not weeds_under(tmp_path), 15, f"weed gone after {sig.name} to its parent")
        assert port_is_free(port)
    finally:
        cli.kill()
        kill_leftovers(weeds)


def as_from_a_terminal() -> None:
    """Popen preexec_fn: the stop signals' default dispositions, as a command started from a terminal has them.
    A suite started in the background (`make test &`, nohup) passes its children SIGINT or SIGHUP ignored, and
    Python then installs no KeyboardInterrupt handler: the jobs these tests stop would not see the signal."""
    for sig in STOPS[:-1]:
        signal.signal(sig, signal.SIG_DFL)


PYTEST_SESSION = '''
import time

from cluster.storage import resolve


def test_in_the_middle_of_s3(s3_env):
    resolve("s3://runs/hygiene.txt").write_text("written")
    assert resolve("s3://runs/hygiene.txt").read_text() == "written"
    print("IN THE MIDDLE OF AN S3 TEST", flush=True)
    time.sleep(300)
'''


@pytest.mark.slow  # ~7-12 s each: pytest's start and imports on top of the server's
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_pytest_session_stopped_mid_s3_test_leaves_no_server(sig, tmp_path):
    """The real `object_store` fixture of tests/conftest.py (loaded as a plugin) in a pytest run that is stopped."""
    (tmp_path / "test_s3_session.py").write_text(PYTEST_SESSION)
    base, out = tmp_path / "basetemp", tmp_path / "out.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    with open(out, "w") as log:
        session = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-s",
                                    "-q", f"--basetemp={base}", "test_s3_session.py"], cwd=tmp_path, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, preexec_fn=as_from_a_terminal)
    weeds = []
    try:
        wait_for_text(out, "IN THE MIDDLE OF AN S3 TEST", session)
        weeds = weeds_under(base)
        assert [w.ppid() for w in weeds] == [session.pid]
        session.send_signal(sig)
        session.wait(timeout=30)
        wait_until(lambda: not weeds_under(base), 15, f"weed gone after {sig.name} to pytest")
    finally:
        session.kill()
        kill_leftovers(weeds)


def ray_processes_of(temp_dir: str) -> list[psutil.Process]:
    """Live processes of the embedded Ray whose temp dir is `temp_dir` (Ray's GCS, raylet, dashboard and workers
    all name their session folder on the command line)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow  # ~20 s each: an embedded Ray's start and a few training steps
@pytest.mark.parametrize("sig", STOPS, ids=[s.name for s in STOPS])
def test_a_training_job_takes_its_embedded_ray_down_however_it_is_stopped(sig, char_dataset, tmp_path):
    """SIGINT, SIGTERM and SIGHUP (a closed terminal) checkpoint and stop the run; after any of them, and after a
    SIGKILL that lets no Python run, no process of the job's embedded Ray is left."""
    temp_dir = tempfile.mkdtemp(prefix="gh", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_ADDRESS="", GENAI_RAY_TMPDIR=temp_dir)
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train_nlg.py"), "--recipe", "tiny", "--data",
                            char_dataset, "--storage", str(tmp_path), "--name", "r", "--set", "train.max_steps=100000",
                            "--set", "train.log_interval=1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    procs = []
    try:
        lines = []
        for line in job.stdout:
            lines.append(line)
            if re.search(r"step\s+2/", line):
                break
        procs = ray_processes_of(temp_dir)
        assert procs, "".join(lines)[-3000:]
        job.send_signal(sig)
        out = "".join(lines) + job.communicate(timeout=120)[0]
        if sig != signal.SIGKILL:
            assert job.returncode == 130, out[-3000:]
            assert "stopped at step" in out and "with a checkpoint" in out, out[-3000:]
        wait_until(lambda: not ray_processes_of(temp_dir), 30, f"the embedded Ray gone after {sig.name} to the job")
    finally:
        job.kill()
        kill_leftovers(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def tune_job(data: str, tmp_path: Path) -> list[str]:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nbase_recipe: tiny\noverrides: [train.max_steps=100000, train.sample_interval=0]\n"
                     "parameters: {train.lr: {choice: [0.001, 0.002]}}\nscheduler: {type: fifo}\n"
                     "num_samples: 2\nmax_concurrent_trials: 1\n")
    return ["tune.py", "--sweep", str(sweep), "--storage", str(tmp_path / "runs"), "--set", f"data.uri={data}"]


def prepare_job(corpus: Path, tmp_path: Path) -> list[str]:
    folder = tmp_path / "corpus"  # several files: Ray Data actors tokenize them in parallel
    folder.mkdir()
    text = corpus.read_text()
    for i in range(16):
        (folder / f"part{i:02d}.txt").write_text(text)
    return ["prepare_data.py", "--source", str(folder), "--out", str(tmp_path / "ds"), "--workers", "2"]


@pytest.mark.slow  # ~10-40 s each: an embedded Ray's start and a sweep's first trial or the first tokenizing actors
@pytest.mark.parametrize("sig", STOPS, ids=[s.name for s in STOPS])
@pytest.mark.parametrize("which", ["tune", "prepare"])
def test_a_sweep_or_a_preparation_takes_its_embedded_ray_down_however_it_is_stopped(which, sig, char_dataset,
                                                                                   corpus_file, tmp_path):
    """A sweep (jobs/tune.py) and a preparation tokenizing with Ray Data actors: after SIGINT, SIGTERM, SIGHUP or a
    SIGKILL that lets no Python run, no process of the job's embedded Ray is left (Ray's fate sharing with the
    driver process takes it down whatever ended the driver)."""
    temp_dir = tempfile.mkdtemp(prefix="gh", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_ADDRESS="", GENAI_RAY_TMPDIR=temp_dir)
    script, *args = tune_job(char_dataset, tmp_path) if which == "tune" else prepare_job(corpus_file, tmp_path)
    # What shows the job is at work on Ray: a trial's training worker, or a Ray Data actor tokenizing.
    busy = "RayTrainWorker" if which == "tune" else "MapWorker"
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=as_from_a_terminal)
    procs: list[psutil.Process] = []
    try:
        def at_work() -> bool:
            nonlocal procs
            try:  # Ray's workers retitle themselves (ray::RayTrainWorker...): found as the job's descendants
                procs = [*ray_processes_of(temp_dir), *psutil.Process(job.pid).children(recursive=True)]
                return job.poll() is not None or any(busy in " ".join(p.cmdline()) for p in procs if not gone(p))
            except psutil.Error:
                return False

        wait_until(at_work, 240, f"{which}: a {busy} process of the job's embedded Ray")
        assert job.poll() is None, f"{which} ended before the signal ({job.returncode})"
        job.send_signal(sig)
        job.wait(timeout=120)
        wait_until(lambda: not ray_processes_of(temp_dir), 30, f"the embedded Ray gone after {sig.name} to {which}")
    finally:
        job.kill()
        kill_leftovers(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)


PARENT = '''
import subprocess, sys, time
from cluster.processes import die_with_parent
child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent())
print(child.pid, flush=True)
time.sleep(60)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_a_parent_killed_by_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        parent.kill()
        parent.wait()
        wait_until(lambda: gone(child), 5, "the child gone after its parent's SIGKILL")
    finally:
        kill_leftovers([child])


def test_a_child_started_from_a_worker_thread_outlives_that_thread():
    # The death signal follows the forking thread, so it is not set there: the thread's end must not kill the child.
    started = []

    def start():
        with pytest.warns(RuntimeWarning, match="main thread"):
            started.append(subprocess.Popen(["sleep", "30"], preexec_fn=die_with_parent()))

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    child = started[0]
    try:
        time.sleep(0.5)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_stop_on_signals_cleans_up_once_and_exits_with_128_plus_the_signal():
    calls = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        with stop_on_signals(lambda: calls.append(os.kill(os.getpid(), signal.SIGTERM))):  # a 2nd signal mid-cleanup
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert stopped.value.code == 128 + signal.SIGTERM and len(calls) == 1
    assert signal.getsignal(signal.SIGTERM) is before
    with stop_on_signals(lambda: calls.append("normal end")):
        pass
    assert calls[-1] == "normal end"


def make_sessions(root: Path, n: int) -> list[Path]:
    """n fake Ray session folders, oldest first, one second apart."""
    sessions = []
    for i in range(n):
        s = root / f"session_2025-01-01_00-00-{i:02d}_000000_{1000 + i}"
        (s / "logs").mkdir(parents=True)
        (s / "logs" / "raylet.out").write_text("log")
        os.utime(s, (1_700_000_000 + i, 1_700_000_000 + i))
        sessions.append(s)
    return sessions


def test_prune_ray_sessions_keeps_the_newest_the_latest_and_those_in_use(tmp_path):
    sessions = make_sessions(tmp_path, 10)
    (tmp_path / "session_latest").symlink_to(sessions[2])  # not among the newest: still kept
    (tmp_path / "ray_current_cluster").write_text("not a session")
    # A live process naming a session on its command line, as Ray's raylet and workers do.
    user = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--session_dir={sessions[0]}"])
    try:
        removed = prune_ray_sessions(str(tmp_path), keep=3)
    finally:
        user.kill()
        user.wait()
    assert sorted(removed) == [sessions[1], *sessions[3:7]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [s.name for s in (sessions[0], sessions[2], *sessions[7:])] + ["session_latest", "ray_current_cluster"])
    assert prune_ray_sessions(str(tmp_path), keep=3) == [sessions[0]]  # its user has gone
    assert prune_ray_sessions(str(tmp_path / "missing")) == []
