"""Fault injection on real Ray, DeepSpeed, parquet and a real (tmpfs) filesystem: a full disk under the run,
a dataset shard deleted mid-run (then put back corrupted). Each fault must fail clearly, keep the last
complete checkpoint, and lose nothing beyond the last checkpoint interval once the run is resumed. (Killed workers, interrupted
drivers and an object-store outage are in test_train_nlg.py and test_object_storage.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, ray_job_env, run_job

pytestmark = pytest.mark.slow


def nlg_args(data, storage, name, *sets):
    args = ["--recipe", "tiny", "--data", str(data), "--storage", str(storage), "--name", name]
    for s in sets:
        args += ["--set", s]
    return args


def error_lines(stderr: str) -> list[str]:
    """Our error message: the `error:` line and the one after it (Ray's log lines come and go around it)."""
    lines = stderr.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    return lines[i:i + 2]


def registered(run) -> list[int]:
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    return [int(r["checkpoint_dir_name"].split("_")[1]) for r in snapshot["checkpoint_results"]]


@pytest.fixture
def small_disk(tmp_path):
    """(folder, grow): a 2 MiB tmpfs (about four checkpoints of the tiny model); grow() remounts it at 32 MiB."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)

    try:
        yield disk, grow
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_fails_clearly_keeps_the_last_checkpoint_and_resumes(char_dataset, small_disk, fault_report):
    disk, grow = small_disk
    # The disk holds about five checkpoints: the first attempt fails about halfway.
    sets = ("train.max_steps=100", "train.checkpoint_interval=10", "train.keep_checkpoints=100",
            "train.sample_interval=0", "cluster.max_failures=0")
    args = nlg_args(char_dataset, disk, "full", *sets)
    r = run_job("train_nlg.py", *args)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    run = disk / "full"
    kept = registered(run)[-1]
    cut = sorted(int(p.name.split("_")[1]) for p in run.glob("checkpoint_0*"))[-1]  # the one cut short
    assert cut == kept + 10
    first, second = error_lines(r.stderr)
    assert "No space left on device" in first and "is full: free space, then resume" in first, first
    assert second == f"the last complete checkpoint is {run / f'checkpoint_{kept:08d}'}; resume with: --name full"
    # The last complete checkpoint is whole: it samples.
    g = run_job("generate.py", "--checkpoint", str(run), "--max-new-tokens", "20")
    assert g.returncode == 0 and f"(step {kept})" in g.stdout, g.stderr[-2000:]

    grow()
    again = run_job("train_nlg.py", *args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"removed checkpoint_{cut:08d}: an earlier attempt did not finish writing it" in again.stdout
    assert re.search(rf"resumed from \S+checkpoint_{kept:08d} at step {kept}\b", again.stdout), again.stdout[-3000:]
    assert "done: run full at step 100" in again.stdout
    fault_report("disk full while writing a checkpoint", kept, cut - kept,
                 f"the cut-short checkpoint_{cut:08d} was never registered and was removed on resume")


def test_shard_deleted_mid_run_is_named_a_corrupt_one_is_refused_and_the_run_resumes(corpus_file, tmp_path,
                                                                                     fault_report):
    """A training shard deleted mid-run: the run fails naming it and its last complete checkpoint. Put back
    corrupted (same size, garbage: only the checksum can tell), the rerun is refused before Ray starts. Put
    back whole, the run resumes from that checkpoint and finishes."""
    from genai.data.text_dataset import prepare_text_dataset

    # A small multi-shard dataset: an epoch is about 200 steps, and each epoch reads the shards anew, so the
    # deleted shard is hit within the epoch or when the next one reads it.
    small = tmp_path / "corpus.txt"
    small.write_text(corpus_file.read_text()[:60_000])
    data = tmp_path / "data"
    prepare_text_dataset(str(small), str(data), chunk_tokens=256, shard_tokens=10_000, log=lambda *_: None)
    shard = data / "train" / "part-00003.parquet"
    original = shard.read_bytes()
    sets = ("train.max_steps=300", "train.checkpoint_interval=100", "train.eval_interval=1000",
            "train.log_interval=100", "train.sample_interval=0", "cluster.max_failures=0")
    args = nlg_args(data, tmp_path / "runs", "shard", *sets)
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train_nlg.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ray_job_env())
    run = tmp_path / "runs" / "shard"
    deadline = time.time() + 300
    while not (run / "checkpoint_00000100" / "trainer_state.json").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint"
        time.sleep(0.1)
    shard.unlink()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    kept = registered(run)[-1]
    first, second = error_lines(err)
    assert first.startswith(f"error: training failed: {shard}: shard listed in the manifest is missing"), first
    assert second == f"the last complete checkpoint is {run / f'checkpoint_{kept:08d}'}; resume with: --name shard"
    failed_at = max(int(s) for s in re.findall(r"step\s+(\d+)/300", out))  # last progress line before the fault

    shard.write_bytes(b"\0" * len(original))
    refused = run_job("train_nlg.py", *args)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert f"{shard}: shard is corrupt (checksum does not match the manifest)" in refused.stderr
    assert registered(run)[-1] == kept  # nothing was started, nothing changed

    shard.write_bytes(original)
    again = run_job("train_nlg.py", *args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(rf"resumed from \S+ at step {kept}\b", again.stdout)
    assert "done: run shard at step 300" in again.stdout
    assert failed_at - kept < 100  # nothing lost beyond one checkpoint interval
    fault_report("training shard deleted mid-run (hit when Ray Data next read it), then put back corrupted "
                 "(refused before Ray started)", kept, failed_at - kept,
                 "counted to the last progress line (every 100 steps) before the failure")
