"""Labelled image datasets (for GAN training) as sharded parquet plus a manifest.

Layout under the output URI:
    train/part-00000.parquet ...   rows: image (binary: height*width*channels uint8 bytes, HWC order), label (int16)
    val/part-00000.parquet ...
    manifest.json                  written last: its presence means the dataset is whole

Sources:
    mnist:<folder or URI>   the original MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte,
                            t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz); val = t10k
    mnist:download          the same four files fetched from the standard mirror (needs the internet)
    builtin:digits          scikit-learn's bundled 8x8 digits (1,797 images, no download) resized to 28x28;
                            val = a stratified, seeded `val_fraction` of them
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
import urllib.request
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.storage import Location, StorageError, explain, is_remote, resolve
from genai.data.shards import (
    FORMAT_VERSION, MANIFEST_FILE, DatasetError, clear_output, output_location, prepared_once, read_manifest,
    verify_shards, write_manifest, write_shard,
)
from genai.data.sources import SourceError

DATASET_KIND = "images"
SPLITS = ("train", "val")
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049
NUM_CLASSES = 10  # both sources are digits 0..9
DIGITS_SIZE = 28
DIGITS_SPLIT_SEED = 0x5EED
ROW_GROUP_ROWS = 1024
_GZIP_MAGIC = b"\x1f\x8b"
_TO_UNIT = (np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0))  # uint8 -> [-1, 1]


@dataclass
class ImageSplitInfo:
    rows: int
    shards: list[dict] = field(default_factory=list)


@dataclass
class ImageManifest:
    uri: str
    height: int
    width: int
    channels: int
    num_classes: int
    splits: dict[str, ImageSplitInfo]
    raw: dict

    def shard_uris(self, split: str) -> list[str]:
        base = resolve(self.uri)
        return [base.join(s["path"]).uri for s in self._split(split).shards]

    def rows_per_worker(self, split: str, world_size: int) -> int:
        """Images every worker gets under an equal row split."""
        return self._split(split).rows // world_size

    def _split(self, split: str) -> ImageSplitInfo:
        if split not in self.splits:
            raise DatasetError(f"{self.uri}: no split {split!r} (it has {', '.join(sorted(self.splits))})")
        return self.splits[split]


@dataclass
class _Images:
    """One split in memory: images [N, H, W, C] uint8 and labels [N]."""

    images: np.ndarray
    labels: np.ndarray


def is_image_source(source: str) -> bool:
    return source.startswith("mnist:") or source == "builtin:digits"


# --- sources -------------------------------------------------------------------------------------------------------

def parse_idx(data: bytes, name: str, magic: int) -> np.ndarray:
    """An uncompressed IDX file of unsigned bytes (`magic` 2051: images [N, rows, cols]; 2049: labels [N]).
    Raises DatasetError naming the file and what is wrong with it."""
    what = {IDX_IMAGES_MAGIC: "image", IDX_LABELS_MAGIC: "label"}[magic]
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated IDX file ({len(data)} bytes, shorter than its {header}-byte header)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        hint = {IDX_IMAGES_MAGIC: " (an IDX image file)", IDX_LABELS_MAGIC: " (an IDX label file)"}.get(found, "")
        raise DatasetError(f"{name}: not an IDX {what} file: magic number {found}{hint}, expected {magic}")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if 0 in dims:
        raise DatasetError(f"{name}: IDX {what} file with an empty dimension {dims}")
    need = header + int(np.prod(dims))
    if len(data) < need:
        raise DatasetError(f"{name}: truncated IDX {what} file ({len(data) - header:,} data bytes, "
                           f"its header's dimensions {'x'.join(map(str, dims))} need {need - header:,})")
    if len(data) > need:
        raise DatasetError(f"{name}: corrupt IDX {what} file ({len(data) - need:,} bytes after the "
                           f"{'x'.join(map(str, dims))} values its header describes)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _gunzip(data: bytes, name: str) -> bytes:
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{name}: corrupt or truncated gzip data ({exc})") from None


def _read_raw(loc: Location) -> bytes:
    """A file's bytes as stored (Location.read_bytes would let pyarrow decompress `.gz` files itself, and a
    corrupt one would fail inside pyarrow; decompressing here names the file and what is wrong)."""
    try:
        with loc.fs.open_input_stream(loc.path, compression=None) as f:
            return f.read()
    except OSError as exc:
        raise DatasetError(str(explain(loc.uri, exc))) from None


def _read_mnist_file(folder: Location, stem: str) -> tuple[bytes, str]:
    """The bytes of folder/stem or folder/stem.gz (decompressed) and the name of the file read."""
    for name in (stem, stem + ".gz"):
        loc = folder.join(name)
        try:
            found = loc.exists()
        except OSError as exc:
            raise DatasetError(str(explain(loc.uri, exc))) from None
        if found:
            return _gunzip(_read_raw(loc), loc.uri), loc.uri
    raise DatasetError(f"{folder.uri}/{stem}[.gz]: missing (an MNIST folder holds "
                       f"{', '.join(s for pair in MNIST_FILES.values() for s in pair)}, each optionally .gz)")


def _mnist_split(files: dict[str, tuple[bytes, str]], split: str) -> _Images:
    img_stem, lbl_stem = MNIST_FILES[split]
    (img_data, img_name), (lbl_data, lbl_name) = files[img_stem], files[lbl_stem]
    images = parse_idx(img_data, img_name, IDX_IMAGES_MAGIC)
    labels = parse_idx(lbl_data, lbl_name, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(f"{img_name} holds {len(images):,} images but {lbl_name} holds {len(labels):,} labels")
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DatasetError(f"{lbl_name}: label {labels[bad]} at index {bad} is not a digit 0..9")
    return _Images(images[..., None], labels)


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            return resp.read()
    except OSError as exc:
        raise SourceError(f"mnist:download: fetching {url} failed ({exc}); offline, use mnist:<folder with the IDX "
                          "files> or builtin:digits") from None


def _load_mnist(where: str, log) -> dict[str, _Images]:
    stems = [s for pair in MNIST_FILES.values() for s in pair]
    if where == "download":
        files = {}
        for stem in stems:
            url = f"{MNIST_MIRROR}{stem}.gz"
            log(f"downloading {url}")
            files[stem] = (_gunzip(_download(url), url), url)
    else:
        if not where:
            raise SourceError("mnist: needs a folder or URI holding the MNIST IDX files (mnist:<folder>), "
                              "or mnist:download")
        try:
            folder = resolve(where)
            if not folder.is_dir():
                state = "is not a folder" if folder.exists() else "does not exist"
                raise DatasetError(f"mnist:{where}: {folder.uri} {state} (expected a folder holding the MNIST IDX "
                                   f"files {', '.join(stems)}, each optionally .gz)")
        except (StorageError, OSError) as exc:
            raise DatasetError(f"mnist:{where}: {exc}") from None
        files = {stem: _read_mnist_file(folder, stem) for stem in stems}
    splits = {split: _mnist_split(files, split) for split in SPLITS}
    if splits["train"].images.shape[1:] != splits["val"].images.shape[1:]:
        raise DatasetError(f"mnist:{where}: train images are {splits['train'].images.shape[1:3]} but test images "
                           f"are {splits['val'].images.shape[1:3]}")
    return splits


def bilinear_resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize float images [N, h, w] bilinearly (half-pixel centres, edges clamped: torch's
    interpolate(mode="bilinear", align_corners=False) for upsampling)."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        w = np.zeros((n_out, n_in))
        w[np.arange(n_out), lo] += 1 - frac
        w[np.arange(n_out), hi] += frac
        return w

    wy, wx = weights(images.shape[1], height), weights(images.shape[2], width)
    return np.einsum("yh,nhw,xw->nyx", wy, images, wx, optimize=True)


def _load_digits(val_fraction: float) -> dict[str, _Images]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SourceError("builtin:digits needs the package `scikit-learn` (pip install scikit-learn)") from None
    digits = load_digits()
    small = digits.images.astype(np.float64) * (255.0 / 16.0)  # 0..16 -> 0..255
    images = np.clip(np.rint(bilinear_resize(small, DIGITS_SIZE, DIGITS_SIZE)), 0, 255).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    # Stratified: every class gives the same share to val; a fixed seed makes the split the same everywhere.
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    order = rng.permutation(len(labels))
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        is_val[members[:max(1, int(round(len(members) * val_fraction)))]] = True
    train_idx, val_idx = order[~is_val[order]], order[is_val[order]]
    return {"train": _Images(images[train_idx], labels[train_idx]), "val": _Images(images[val_idx], labels[val_idx])}


def load_image_source(source: str, val_fraction: float = 0.1, log=print) -> dict[str, _Images]:
    """The train and val images of a source, in memory. Raises SourceError / DatasetError naming it."""
    if source == "builtin:digits":
        return _load_digits(val_fraction)
    if source.startswith("mnist:"):
        return _load_mnist(source[len("mnist:"):], log)
    raise SourceError(f"{source!r} is not an image source (use builtin:digits, mnist:<folder or URI> "
                      "or mnist:download)")


# --- writing -------------------------------------------------------------------------------------------------------

def _binary_column(flat: np.ndarray, rows: int, size: int) -> pa.Array:
    """`rows` values of `size` bytes each from one contiguous uint8 buffer, without a copy per image."""
    offsets = np.arange(rows + 1, dtype=np.int32) * np.int32(size)
    return pa.Array.from_buffers(pa.binary(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def _write_split(out: Location, split: str, data: _Images, shard_rows: int) -> ImageSplitInfo:
    n, size = len(data.labels), int(np.prod(data.images.shape[1:]))
    per_shard = max(1, min(shard_rows, (2 ** 31 - 1) // size))  # int32 offsets of a binary column
    shards = []
    for idx, first in enumerate(range(0, n, per_shard)):
        last = min(n, first + per_shard)
        flat = np.ascontiguousarray(data.images[first:last]).reshape(-1)
        table = pa.table({
            "image": _binary_column(flat, last - first, size),
            "label": pa.array(data.labels[first:last].astype(np.int16)),
        })
        shards.append(write_shard(out, f"{split}/part-{idx:05d}.parquet", table, row_group_size=ROW_GROUP_ROWS,
                                  use_dictionary=["label"]))
    return ImageSplitInfo(rows=n, shards=shards)


def prepare_image_dataset(
    source: str,
    out_uri: str,
    val_fraction: float = 0.1,
    shard_rows: int = 8192,
    overwrite: bool = False,
    log=print,
) -> ImageManifest:
    """Read an image source, write train/val parquet shards and the manifest (last)."""
    if not is_image_source(source):
        raise SourceError(f"{source!r} is not an image source (use builtin:digits, mnist:<folder or URI> "
                          "or mnist:download)")
    if not 0.0 < val_fraction < 0.5:
        raise DatasetError(f"--val-fraction {val_fraction}: must be between 0 and 0.5")
    if shard_rows < 1:
        raise DatasetError(f"--shard-rows {shard_rows}: must be at least 1")
    out = output_location(out_uri, overwrite)
    t0 = time.time()
    data = load_image_source(source, val_fraction, log)
    _, height, width, channels = data["train"].images.shape
    log(f"read {len(data['train'].labels):,} train and {len(data['val'].labels):,} val images "
        f"({height}x{width}x{channels}) from {source}")

    # Clear a half-written earlier attempt (no manifest) or an overwritten dataset.
    clear_output(out, SPLITS)
    splits = {split: _write_split(out, split, data[split], shard_rows) for split in SPLITS}
    write_manifest(out, DATASET_KIND, source, splits, height=int(height), width=int(width),
                   channels=int(channels), num_classes=NUM_CLASSES)
    log(f"wrote {out.uri}: train {splits['train'].rows:,} images in {len(splits['train'].shards)} shard(s), "
        f"val {splits['val'].rows:,} ({time.time() - t0:.1f}s)")
    return load_image_manifest(out.uri)


# --- reading -------------------------------------------------------------------------------------------------------

def load_image_manifest(uri: str) -> ImageManifest:
    """Read and check an image dataset's manifest. Raises DatasetError naming the URI."""
    raw = read_manifest(uri, DATASET_KIND)
    try:
        splits = {k: ImageSplitInfo(rows=int(v["rows"]), shards=list(v["shards"])) for k, v in raw["splits"].items()}
        manifest = ImageManifest(uri=resolve(uri).uri, height=int(raw["height"]), width=int(raw["width"]),
                                 channels=int(raw["channels"]), num_classes=int(raw["num_classes"]), splits=splits,
                                 raw=raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{uri}/{MANIFEST_FILE}: malformed image manifest ({type(exc).__name__}: {exc})") from None
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DatasetError(f"{uri}/{MANIFEST_FILE}: no {' or '.join(missing)} split")
    return manifest


def verify_image_shards(manifest: ImageManifest, checksums: bool | None = None) -> None:
    """Check every shard against the manifest (size, and sha256 when `checksums`, by default for datasets up to
    256 MiB). Raises DatasetError naming the shard that is missing or corrupt."""
    verify_shards(manifest.uri, [s for info in manifest.splits.values() for s in info.shards], checksums)


def _image_bytes(column, size: int) -> np.ndarray:
    """The concatenated bytes of a binary column (pyarrow Array/ChunkedArray, or a numpy array of bytes
    objects as in Ray's numpy batches) as one uint8 array of len(column) * size values."""
    if isinstance(column, pa.ChunkedArray):
        parts = [_image_bytes(chunk, size) for chunk in column.chunks]
        return np.concatenate(parts) if len(parts) != 1 else parts[0]
    if isinstance(column, pa.Array):
        if column.null_count:
            raise DatasetError(f"image column has {column.null_count} null value(s)")
        n = len(column)
        if n == 0:
            return np.zeros(0, dtype=np.uint8)
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            raise DatasetError(f"image column has type {column.type}, expected binary")
        off_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
        _, off_buf, data_buf = column.buffers()
        offsets = np.frombuffer(off_buf, dtype=off_type)[column.offset:column.offset + n + 1]
        if (offsets[-1] - offsets[0] != n * size) or np.any(np.diff(offsets) != size):
            raise DatasetError(f"image column holds values that are not {size} bytes (height x width x channels)")
        return np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]:offsets[-1]]
    column = np.asarray(column)
    if column.dtype == np.uint8:  # already decoded pixels, one image per row
        flat = column.reshape(-1)
    elif column.dtype.kind == "S":  # fixed-width bytes: view them (tolist() would strip trailing zero bytes)
        if column.dtype.itemsize != size:
            raise DatasetError(f"image column holds values that are not {size} bytes (height x width x channels)")
        flat = np.ascontiguousarray(column).view(np.uint8).reshape(-1)
    else:
        flat = np.frombuffer(b"".join(column.tolist()), dtype=np.uint8)
    if flat.size != len(column) * size:
        raise DatasetError(f"image column holds values that are not {size} bytes (height x width x channels)")
    return flat


def _column(batch, name: str):
    try:
        return batch.column(name) if isinstance(batch, pa.Table) else batch[name]
    except KeyError:
        raise DatasetError(f"image batch has no {name!r} column") from None


def images_from_batch(batch: pa.Table | dict[str, np.ndarray], height: int, width: int,
                      channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a batch of rows (a pyarrow Table, or Ray's dict of numpy arrays) into float32 images
    [B, C, H, W] in [-1, 1] (0 -> -1, 255 -> 1) and int64 labels [B]."""
    raw = _image_bytes(_column(batch, "image"), height * width * channels)
    hwc = raw.reshape(-1, height, width, channels)
    images = _TO_UNIT[hwc.transpose(0, 3, 1, 2) if channels > 1 else hwc.reshape(-1, 1, height, width)]
    labels = _column(batch, "label")
    labels = labels.to_numpy() if isinstance(labels, (pa.Array, pa.ChunkedArray)) else np.asarray(labels)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def load_image_arrays(uri: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` (default all) images of a split as uint8 [N, C, H, W] and int64 labels [N]."""
    m = load_image_manifest(uri)
    base = resolve(m.uri)
    size = m.height * m.width * m.channels
    images, labels, count = [], [], 0
    for shard in m._split(split).shards:
        if limit is not None and count >= limit:
            break
        loc = base.join(shard["path"])
        try:
            table = pq.read_table(loc.path, filesystem=loc.fs)
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{loc.uri}: cannot read the shard ({exc})") from None
        if limit is not None:
            table = table.slice(0, limit - count)
        images.append(_image_bytes(table.column("image"), size))
        labels.append(table.column("label").to_numpy().astype(np.int64))
        count += table.num_rows
    flat = np.concatenate(images) if images else np.zeros(0, dtype=np.uint8)
    hwc = flat.reshape(-1, m.height, m.width, m.channels)
    lab = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)), lab


# --- the dataset cache ---------------------------------------------------------------------------------------------

def cached_image_dataset_uri(source: str, cache_dir: str, val_fraction: float = 0.1) -> str:
    """Where an image source is prepared on first use; the key covers every preparation input."""
    key_source = source
    if source.startswith("mnist:") and source != "mnist:download" and not is_remote(source[6:]):
        key_source = "mnist:" + os.path.abspath(os.path.expanduser(source[6:]))  # a relative path means one folder
    key = json.dumps([FORMAT_VERSION, DATASET_KIND, key_source, val_fraction if source == "builtin:digits" else 0])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = "digits" if source == "builtin:digits" else "mnist"
    return os.path.join(os.path.expanduser(cache_dir), f"{stem}-{digest}")


def ensure_image_dataset(source: str, cache_dir: str, val_fraction: float = 0.1, log=print) -> str:
    """Return the URI of a prepared dataset of this source, preparing it into the cache if needed."""
    uri = cached_image_dataset_uri(source, cache_dir, val_fraction)
    return prepared_once(uri, source, lambda out: prepare_image_dataset(source, out, val_fraction=val_fraction,
                                                                        overwrite=True, log=log), log)
