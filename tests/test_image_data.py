"""Image preparation: sources (builtin digits, MNIST IDX files), parquet shards, the manifest, batch decoding."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import SHARED_DATA, needs_shared, run_job
from genai.data.image_dataset import (
    ensure_image_dataset, images_from_batch, is_image_source, load_image_arrays, load_image_manifest,
    prepare_image_dataset, verify_image_shards,
)
from genai.data.shards import DatasetError

QUIET = dict(log=lambda *_: None)
MNIST = SHARED_DATA / "mnist"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images") / "digits"
    prepare_image_dataset("builtin:digits", str(out), shard_rows=500, **QUIET)
    return out


def write_idx(path: Path, magic: int, dims: tuple[int, ...], values: np.ndarray, gz: bool = False) -> Path:
    data = struct.pack(f">{1 + len(dims)}I", magic, *dims) + values.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture
def fake_mnist(tmp_path) -> Path:
    """A small MNIST-format folder: 20 train and 10 test 6x5 images, images gzipped, labels not."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", 2051, (n, 6, 5), rng.integers(0, 256, (n, 6, 5)), gz=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", 2049, (n,), np.arange(n) % 10)
    return folder


def test_digits_dataset_is_whole_and_described_by_its_manifest(digits):
    raw = json.loads((digits / "manifest.json").read_text())
    assert raw["kind"] == "images" and raw["format_version"] == 1 and raw["source"] == "builtin:digits"
    assert (raw["height"], raw["width"], raw["channels"], raw["num_classes"]) == (28, 28, 1, 10)
    # The manifest lists every file there is (no stray temporaries), with its true size and checksum.
    listed = {s["path"]: s for split in raw["splits"].values() for s in split["shards"]}
    on_disk = {str(p.relative_to(digits)) for p in digits.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(listed) and len(raw["splits"]["train"]["shards"]) == 4  # 1618 rows, 500 per shard
    for rel, shard in listed.items():
        data = (digits / rel).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert sum(s["rows"] for s in raw["splits"]["train"]["shards"]) == raw["splits"]["train"]["rows"]

    m = load_image_manifest(str(digits))
    verify_image_shards(m, checksums=True)
    assert m.rows_per_worker("train", 2) == m.splits["train"].rows // 2
    assert m.shard_uris("val") == [str(digits / "val" / "part-00000.parquet")]
    with pytest.raises(DatasetError, match="no split 'test'"):
        m.shard_uris("test")


def test_digits_split_is_disjoint_complete_and_stratified(digits):
    from sklearn.datasets import load_digits

    train_x, train_y = load_image_arrays(str(digits), "train")
    val_x, val_y = load_image_arrays(str(digits), "val")
    assert train_x.shape == (1618, 1, 28, 28) and val_x.shape == (179, 1, 28, 28) and train_x.dtype == np.uint8
    assert set(train_y.tolist()) == set(val_y.tolist()) == set(range(10))
    assert np.all(np.abs(np.bincount(val_y) - 18) <= 1)  # 10% of every class
    assert np.array_equal(load_image_arrays(str(digits), "train", limit=7)[0], train_x[:7])

    # Every source digit is in exactly one split: match each row to the 8x8 original upscaled by torch
    # (rounding ties may differ by one level), within its class.
    import torch

    src = load_digits()
    ref = torch.nn.functional.interpolate(torch.from_numpy(src.images * (255 / 16))[:, None], size=(28, 28),
                                          mode="bilinear", align_corners=False).numpy().reshape(len(src.images), -1)
    rows = np.concatenate([train_x, val_x]).reshape(1797, -1).astype(np.float64)
    labels = np.concatenate([train_y, val_y])
    matched = []
    for c in range(10):
        ours, theirs = rows[labels == c], np.flatnonzero(src.target == c)
        sq_dist = (ours ** 2).sum(1)[:, None] + (ref[theirs] ** 2).sum(1)[None, :] - 2 * ours @ ref[theirs].T
        nearest = theirs[sq_dist.argmin(axis=1)]
        assert np.abs(ours - ref[nearest]).max() <= 1.0
        matched += nearest.tolist()
    assert sorted(matched) == list(range(1797))


@needs_shared(MNIST, "MNIST IDX files")
def test_mnist_from_idx_files(tmp_path):
    m = prepare_image_dataset(f"mnist:{MNIST}", str(tmp_path / "mnist"), **QUIET)
    assert (m.splits["train"].rows, m.splits["val"].rows) == (60000, 10000)
    assert (m.height, m.width, m.channels, m.num_classes) == (28, 28, 1, 10)
    verify_image_shards(m)
    x, y = load_image_arrays(m.uri, "train", limit=100)
    assert y[0] == 5 and x.shape == (100, 1, 28, 28)  # MNIST's first training digit is a 5
    with gzip.open(MNIST / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(16 + 100 * 784)[16:], dtype=np.uint8).reshape(100, 1, 28, 28)
    assert np.array_equal(x, raw)
    _, val_y = load_image_arrays(m.uri, "val")
    assert len(val_y) == 10000 and val_y[0] == 7  # the first t10k digit is a 7


def test_mnist_format_folder_prepares(fake_mnist, tmp_path):
    m = prepare_image_dataset(f"mnist:{fake_mnist}", str(tmp_path / "out"), **QUIET)
    assert (m.splits["train"].rows, m.splits["val"].rows, m.height, m.width) == (20, 10, 6, 5)
    x, y = load_image_arrays(m.uri, "val")
    with gzip.open(fake_mnist / "t10k-images-idx3-ubyte.gz") as f:
        assert np.array_equal(x[:, 0], np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(10, 6, 5))
    assert y.tolist() == list(range(10))


def _expect_error(folder: Path, tmp_path: Path, pattern: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=pattern):
        prepare_image_dataset(f"mnist:{folder}", str(out), **QUIET)
    assert not (out / "manifest.json").exists()


def test_truncated_idx_files_are_named(fake_mnist, tmp_path):
    path = write_idx(fake_mnist / "train-labels-idx1-ubyte", 2049, (20,), np.arange(20) % 10)
    path.write_bytes(path.read_bytes()[:-3])
    _expect_error(fake_mnist, tmp_path, r"train-labels-idx1-ubyte: truncated IDX label file \(17 data bytes.* need 20")
    path.write_bytes(path.read_bytes()[:5])
    _expect_error(fake_mnist, tmp_path, r"train-labels-idx1-ubyte: truncated IDX file \(5 bytes")
    gz = fake_mnist / "t10k-images-idx3-ubyte.gz"
    write_idx(fake_mnist / "train-labels-idx1-ubyte", 2049, (20,), np.arange(20) % 10)
    gz.write_bytes(gz.read_bytes()[:-20])
    _expect_error(fake_mnist, tmp_path, r"t10k-images-idx3-ubyte\.gz: corrupt or truncated gzip data")


def test_wrong_magic_missing_file_and_count_mismatch_are_named(fake_mnist, tmp_path):
    labels = fake_mnist / "t10k-labels-idx1-ubyte"
    write_idx(labels, 2051, (10,), np.zeros(10))
    _expect_error(fake_mnist, tmp_path, r"t10k-labels-idx1-ubyte: not an IDX label file: magic number 2051")
    write_idx(labels, 2049, (9,), np.zeros(9))
    _expect_error(fake_mnist, tmp_path, r"t10k-images-idx3-ubyte.gz holds 10 images but .*t10k-labels-idx1-ubyte "
                                        r"holds 9 labels")
    labels.unlink()
    _expect_error(fake_mnist, tmp_path, r"t10k-labels-idx1-ubyte\[\.gz\]: missing")
    with pytest.raises(DatasetError, match="does not exist"):
        prepare_image_dataset(f"mnist:{tmp_path / 'nowhere'}", str(tmp_path / "x"), **QUIET)


def test_images_from_batch_round_trips_and_scales_to_unit_range():
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (6, 4, 3, 3), dtype=np.uint8)
    hwc[0, 0, 0, 0], hwc[0, 0, 0, 1] = 0, 255
    table = pa.table({"image": pa.array([im.tobytes() for im in hwc], type=pa.binary()),
                      "label": pa.array(np.arange(6, dtype=np.int16))})
    x, y = images_from_batch(table, 4, 3, 3)
    assert x.shape == (6, 3, 4, 3) and x.dtype == np.float32 and y.dtype == np.int64
    assert x[0, 0, 0, 0] == -1.0 and x[0, 1, 0, 0] == 1.0
    assert np.array_equal(np.rint((x + 1) * 127.5).astype(np.uint8), hwc.transpose(0, 3, 1, 2))
    assert y.tolist() == list(range(6))
    # A sliced multi-chunk table (as Ray hands out) and Ray's numpy dict decode the same.
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2)]).slice(1, 4)
    assert np.array_equal(images_from_batch(chunked, 4, 3, 3)[0], x[1:5])
    as_dict = {"image": np.array([im.tobytes() for im in hwc], dtype=object), "label": np.arange(6)}
    assert np.array_equal(images_from_batch(as_dict, 4, 3, 3)[0], x)
    with pytest.raises(DatasetError, match="not 9 bytes"):
        images_from_batch(table, 3, 3, 1)


def test_corrupt_and_missing_shards_are_named(tmp_path):
    out = tmp_path / "digits"
    m = prepare_image_dataset("builtin:digits", str(out), **QUIET)
    shard = out / "val" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"val/part-00000.parquet: shard is corrupt \(checksum"):
        verify_image_shards(m)
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(DatasetError, match=r"val/part-00000.parquet: shard is corrupt \(\d+ bytes"):
        verify_image_shards(m, checksums=False)
    shard.unlink()
    with pytest.raises(DatasetError, match="val/part-00000.parquet: shard listed in the manifest is missing"):
        verify_image_shards(m)


def test_overwrite_refusal_half_written_attempts_and_wrong_kind(tmp_path):
    out = tmp_path / "digits"
    prepare_image_dataset("builtin:digits", str(out), **QUIET)
    with pytest.raises(DatasetError, match="already holds a prepared dataset"):
        prepare_image_dataset("builtin:digits", str(out), **QUIET)
    prepare_image_dataset("builtin:digits", str(out), val_fraction=0.2, overwrite=True, **QUIET)
    assert load_image_manifest(str(out)).splits["val"].rows == 359

    (out / "manifest.json").unlink()  # as if preparation died before its last write
    stray = out / "train" / "part-00099.parquet"
    stray.write_bytes(b"half")
    with pytest.raises(DatasetError, match="no manifest.json"):
        load_image_manifest(str(out))
    prepare_image_dataset("builtin:digits", str(out), **QUIET)  # no --overwrite needed for a half-written one
    assert not stray.exists() and load_image_manifest(str(out)).splits["val"].rows == 179

    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "kind": "text-tokens"}))
    with pytest.raises(DatasetError, match="kind 'text-tokens' is not 'images'"):
        load_image_manifest(str(out))
    with pytest.raises(DatasetError, match="val_fraction|--val-fraction"):
        prepare_image_dataset("builtin:digits", str(tmp_path / "x"), val_fraction=0.7, **QUIET)


def test_ensure_image_dataset_prepares_once(tmp_path):
    logs: list[str] = []
    uri = ensure_image_dataset("builtin:digits", str(tmp_path / "cache"), log=logs.append)
    assert any("preparing builtin:digits" in line for line in logs)
    logs.clear()
    assert ensure_image_dataset("builtin:digits", str(tmp_path / "cache"), log=logs.append) == uri and not logs
    assert ensure_image_dataset("builtin:digits", str(tmp_path / "cache"), 0.2, log=logs.append) != uri
    assert is_image_source("builtin:digits") and is_image_source("mnist:download")
    assert not is_image_source("builtin:shakespeare") and not is_image_source("./mnist")


def test_prepare_data_job_dispatches_images(tmp_path):
    r = run_job("prepare_data.py", "--source", "builtin:digits", "--out", str(tmp_path / "d"), "--tokenizer", "bpe")
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_image_manifest(str(tmp_path / "d")).splits["train"].rows == 1618
    r = run_job("prepare_data.py", "--source", "mnist:/nonexistent", "--out", str(tmp_path / "m"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: mnist:/nonexistent: /nonexistent does not exist")
