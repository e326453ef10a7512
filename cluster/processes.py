"""Process hygiene for the servers this project starts: they stop with the process that started them.

Two layers, because neither is enough alone:
- `die_with_parent()`, a Popen preexec_fn: Linux sends the child SIGTERM when its parent dies, however it dies
  (SIGKILL and crashes included, when no Python code gets to run);
- `stop_on_signals(cleanup)`, for a CLI's main(): SIGINT, SIGTERM and SIGHUP run the cleanup (an orderly stop)
  and exit with 128 + the signal's number (130 for Ctrl-C).

`prune_ray_sessions` keeps embedded Ray's temp folder from growing one `session_*` folder per run forever.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A Popen `preexec_fn` that makes the child receive `sig` when this process dies, even by SIGKILL.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere None, which Popen takes as "no preexec_fn". Linux sends
    the signal when the *thread* that forked the child exits, not the process, so the death signal is set
    only when forking from the main thread (whose end is the process's end); from any other thread this
    returns None with a warning, and the child then stops only when its owner stops it.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        warnings.warn("a child started outside the main thread does not die with its parent (PR_SET_PDEATHSIG "
                      "would fire when this thread ends); stop it explicitly", RuntimeWarning, stacklevel=2)
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child runs between fork and exec
    parent = os.getpid()

    def set_death_signal() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the death signal was set: nobody would send it
            os._exit(1)

    return set_death_signal


@contextmanager
def stop_on_signals(cleanup: Callable[[], None], signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Run the body; however it ends, run `cleanup` once. One of `signals` ends the body with
    SystemExit(128 + signum), so the process exits with the conventional code (130 for SIGINT).

    The handler only raises, and cleanup runs after the interrupted code has unwound, never inside it (stopping
    a child from inside an interrupted Popen.wait() would deadlock on its lock). Further signals are ignored
    while cleanup runs, so a second Ctrl-C does not cut an orderly stop short. Main thread only (Python
    delivers signals there).
    """
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        yield
    finally:
        stopping = True
        try:
            cleanup()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def command_lines() -> list[str]:
    """Every live process's command line, one string each (those this user may not read are left out)."""
    import psutil  # installed with Ray

    lines = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            lines.append(" ".join(proc.info["cmdline"] or ()))
        except (psutil.Error, TypeError):
            continue
    return lines


def prune_ray_sessions(temp_dir: str, keep: int = 5) -> list[Path]:
    """Delete old `session_*` folders from a Ray temp dir, which Ray keeps forever (one per run).

    Kept: the `keep` newest (by modification time), the one `session_latest` points to, and any that a live
    process names on its command line (Ray's raylet, GCS, dashboard and workers all do; a session outlives the
    driver or `ray start` that created it). Returns the folders deleted; a missing temp dir is no error.
    """
    root = Path(temp_dir)
    if not root.is_dir():
        return []
    latest = root / "session_latest"
    latest_target = latest.resolve() if latest.is_symlink() else None
    sessions = [p for p in root.glob("session_*") if p.is_dir() and not p.is_symlink()]
    sessions.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    old = [p for p in sessions[keep:] if p.resolve() != latest_target]
    in_use = command_lines() if old else []
    removed = []
    for session in old:
        if any(session.name in line for line in in_use):
            continue
        shutil.rmtree(session, ignore_errors=True)
        if not session.exists():
            removed.append(session)
    return removed
