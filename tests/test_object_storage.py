"""Datasets, checkpoints, exports and TensorBoard in S3, against a real SeaweedFS server on loopback."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from cluster.storage import StorageError, check_access, copy_tree, resolve
from conftest import ROOT, run_job
from genai.data.text_dataset import load_manifest, verify_shards


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def s3_dataset(object_store, corpus_file):
    """The test corpus prepared straight into the bucket by the real job."""
    uri = f"s3://datasets/{unique('shakespeare')}"
    r = run_job("prepare_data.py", "--source", str(corpus_file), "--out", uri, "--chunk-tokens", "256",
                env=object_store.env())
    assert r.returncode == 0, r.stderr
    return uri


def test_round_trip_and_listing(s3_env):
    loc = resolve(f"s3://runs/{unique('t')}/a/b.txt")
    loc.write_text("hello")
    assert loc.read_text() == "hello" and loc.exists()
    assert resolve(loc.uri.rsplit("/", 1)[0]).list() == ["b.txt"]


def test_wrong_key_is_rejected_by_the_server(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match=r"s3://runs/x: access denied \(check AWS_ACCESS_KEY_ID"):
        check_access("s3://runs/x")


def test_missing_bucket_is_named(s3_env):
    with pytest.raises(StorageError, match="s3://no-such-bucket/x: the bucket 'no-such-bucket' does not exist"):
        check_access("s3://no-such-bucket/x")


def test_unreachable_endpoint_is_named(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="cannot reach http://127.0.0.1:9"):
        check_access("s3://runs/x")


def test_prepared_dataset_in_the_bucket_is_whole(s3_env, s3_dataset, tmp_path):
    m = load_manifest(s3_dataset)
    assert m.uri == s3_dataset and m.splits["train"].tokens > 900_000
    verify_shards(m, checksums=True)
    copy_tree(s3_dataset, str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "manifest.json").exists()


def test_missing_and_corrupt_shards_are_named_before_training(s3_env, s3_dataset, tmp_path):
    # A private copy of the dataset to damage.
    uri = f"s3://datasets/{unique('damaged')}"
    copy_tree(s3_dataset, uri)
    shard = resolve(uri).join("train/part-00000.parquet")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_job("train_nlg.py", "--recipe", "tiny", "--data", uri, "--storage", "s3://runs")
    assert r.returncode == 2, r.stderr
    assert f"{uri}/train/part-00000.parquet: shard is corrupt" in r.stderr
    shard.delete()
    r = run_job("train_nlg.py", "--recipe", "tiny", "--data", uri, "--storage", "s3://runs")
    assert r.returncode == 2 and "part-00000.parquet: shard listed in the manifest is missing" in r.stderr


def test_a_corpus_under_an_s3_prefix_prepares_as_the_same_files_on_disk(s3_env, tmp_path):
    from test_data import write_mixed_folder

    folder = write_mixed_folder(tmp_path / "corpus")
    prefix = f"s3://datasets/{unique('corpus')}"
    copy_tree(str(folder), prefix)
    outs = {}
    for name, source in (("s3", prefix), ("local", str(folder))):
        r = run_job("prepare_data.py", "--source", source, "--out", str(tmp_path / name), "--tokenizer", "bpe",
                    "--bpe-vocab-size", "300", "--chunk-tokens", "8", "--workers", "0")
        assert r.returncode == 0, r.stderr
        outs[name] = load_manifest(str(tmp_path / name))
    assert outs["s3"].raw["corpus"] == outs["local"].raw["corpus"]  # the same files read, the same skipped
    checksums = {name: [s["sha256"] for split in ("train", "val") for s in m.splits[split].shards]
                 for name, m in outs.items()}
    assert checksums["s3"] == checksums["local"]
    r = run_job("prepare_data.py", "--source", f"{prefix}/f.parquet", "--out", str(tmp_path / "x"),
                "--text-column", "body")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {prefix}/f.parquet: no column 'body' (columns: text; " \
                                                     "choose one with --text-column)"


def test_jobs_refuse_bad_credentials_and_buckets_with_exit_2(s3_env, s3_dataset):
    r = run_job("train_nlg.py", "--recipe", "tiny", "--data", s3_dataset, "--storage", "s3://nope-bucket/runs")
    assert r.returncode == 2 and "the bucket 'nope-bucket' does not exist" in r.stderr
    r = run_job("prepare_data.py", "--source", "builtin:pydoc", "--out", "s3://datasets/x",
                env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert r.returncode == 2 and "access denied" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_train_kill_resume_and_generate_all_in_s3(s3_env, s3_dataset, tmp_path):
    name = unique("s3run")
    args = ["--recipe", "tiny", "--data", s3_dataset, "--storage", "s3://runs/team", "--name", name]
    for s in ("cluster.num_workers=2", "deepspeed.zero_stage=2", "train.max_steps=300", "train.eval_interval=50",
              "train.checkpoint_interval=50", "train.log_interval=50", "train.sample_interval=100"):
        args += ["--set", s]
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train_nlg.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    run = resolve(f"s3://runs/team/{name}")
    deadline = time.time() + 300
    while not run.join("checkpoint_00000100", "trainer_state.json").exists() and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.2)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    assert workers, "no worker to kill"
    workers[-1].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"resumed from \S*runs/team/\S+/checkpoint_00000(050|100|150) at step", out), out[-4000:]
    names = run.list()
    assert "export" in names and "tensorboard" in names and "checkpoint_00000300" in names
    assert any(n.startswith("events.out.tfevents") for n in run.join("tensorboard").list())
    shards = run.join("checkpoint_00000300", "model-step00000300").list()
    assert any("rank_0" in s for s in shards) and any("rank_1" in s for s in shards)

    g = run_job("generate.py", "--checkpoint", run.uri, "--prompt", "ROMEO:", "--max-new-tokens", "30")
    assert g.returncode == 0, g.stderr
    assert f"# model from {run.uri}/export" in g.stdout and "ROMEO:" in g.stdout
    g = run_job("generate.py", "--checkpoint", run.join("checkpoint_00000250").uri, "--max-new-tokens", "10")
    assert g.returncode == 0 and "(step 250)" in g.stdout, g.stderr


@pytest.mark.slow
def test_object_store_outage_mid_run_loses_no_completed_checkpoint(object_store, s3_env, s3_dataset, fault_report):
    name = unique("outage")
    args = ["--recipe", "tiny", "--data", s3_dataset, "--storage", "s3://runs", "--name", name,
            "--set", "train.max_steps=400", "--set", "train.checkpoint_interval=50", "--set", "train.eval_interval=50",
            "--set", "train.log_interval=50", "--set", "cluster.max_failures=3"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train_nlg.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    run = resolve(f"s3://runs/{name}")
    while not run.join("checkpoint_00000100", "trainer_state.json").exists() and proc.poll() is None:
        time.sleep(0.2)
    object_store.stop()  # the server goes away mid-run ...
    time.sleep(5)
    object_store.restart()  # ... and comes back with its data
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        # Ray gave up on storage: the run says so and how to resume; rerunning it continues from the
        # last checkpoint that was complete before the outage.
        assert "error: training failed" in out and f"resume with: --name {name}" in out, out[-3000:]
        again = run_job("train_nlg.py", *args)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert re.search(r"resumed from \S+checkpoint_\d+ at step \d+", again.stdout), again.stdout[-3000:]
        print("FIRST RUN:", out[-2500:], "\nRERUN:", again.stdout[-1500:])
    assert run.join("export", "export.json").exists()
    assert run.join("checkpoint_00000400", "trainer_state.json").exists()
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", out + (again.stdout if proc.returncode else ""))]
    fault_report("object store stopped for 5 s while checkpoint 100 was written", resumed[-1] if resumed else None,
                 100 - resumed[-1] if resumed else None,
                 "the run failed and was rerun" if proc.returncode else "Ray's storage retries rode it out")
