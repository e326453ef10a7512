"""Photographs of any size (for super-resolution) as sharded parquet plus a manifest.

Layout under the output URI:
    train/part-00000.parquet ...   rows: name (string), image (binary: a PNG file), height, width (int32)
    val/part-00000.parquet ...
    manifest.json                  written last; records the channels and each split's smallest image

Sources:
    images:<folder or s3:// prefix>   every .png / .jpg / .jpeg file under it (recursively), in path order; val is a
                                      seeded `val_fraction` of them (at least one)
    builtin:photos                    scikit-image's bundled colour photographs (genai/data/photos.py; no download)
A dataset is small enough for every worker to hold its training images in memory (load_photos); the training pairs
are random crops of them made on the fly (genai/data/sr_pairs.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cluster.storage import StorageError, explain, resolve
from genai.data.shards import (FORMAT_VERSION, MANIFEST_FILE, DatasetError, clear_output, output_location,
                               prepared_once, read_manifest, verify_shards, write_manifest, write_shard)
from genai.data.sources import SourceError

DATASET_KIND = "photos"
SPLITS = ("train", "val")
SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_SEED = 0x5EED
SHARD_BYTES = 64 * 1024 * 1024


@dataclass
class PhotoManifest:
    uri: str
    channels: int
    min_train_image: dict  # name, height, width of the training image with the smallest side
    min_val_image: dict  # and of the held-out one
    raw: dict

    def shards(self, split: str) -> list[dict]:
        return self.raw["splits"][split]["shards"]


def is_photo_source(source: str) -> bool:
    return source.startswith("images:") or source == "builtin:photos"


def _decode(data: bytes, name: str, channels: int) -> np.ndarray:
    """An image file's bytes as uint8 [H, W, channels] (colour to luma for 1 channel, grey to RGB for 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise DatasetError(f"{name}: not a readable PNG or JPEG image") from None
    except OSError as exc:
        raise DatasetError(f"{name}: not a readable PNG or JPEG image ({exc})") from None
    return np.array(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8).reshape(img.height, img.width,
                                                                                            channels)


def _image_files(where: str) -> list:
    """The image files under a folder or prefix, sorted by path. Raises SourceError naming it."""
    if not where:
        raise SourceError("images: needs a folder or s3:// prefix of PNG/JPEG files (images:<folder>)")
    try:
        base = resolve(where)
        if not base.is_dir():
            state = "is not a folder" if base.exists() else "does not exist"
            raise SourceError(f"images:{where}: {base.uri} {state} (expected a folder of PNG/JPEG files)")
        infos = base.fs.get_file_info(pafs.FileSelector(base.path, recursive=True))
    except (StorageError, OSError) as exc:
        raise SourceError(f"images:{where}: {explain(where, exc) if isinstance(exc, OSError) else exc}") from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(SUFFIXES))
    if len(files) < 2:
        raise SourceError(f"images:{where}: {len(files)} PNG/JPEG file(s) there; a train and a val split need at "
                          "least 2")
    return [base.join(posixpath.relpath(f, base.path)) for f in files]


def load_photo_source(source: str, channels: int = 3, val_fraction: float = 0.1) -> dict[str, dict[str, np.ndarray]]:
    """The train and val images of a source by name, each uint8 [H, W, channels]."""
    if source == "builtin:photos":
        from genai.data.photos import builtin_photos

        try:
            return {split: builtin_photos(split, channels) for split in SPLITS}
        except ImportError as exc:
            raise SourceError(f"builtin:photos: {exc}") from None
    if not source.startswith("images:"):
        raise SourceError(f"{source!r} is not a photo source (use images:<folder or s3:// prefix> or builtin:photos)")
    files = _image_files(source[len("images:"):])
    is_val = np.zeros(len(files), dtype=bool)
    is_val[np.random.default_rng(SPLIT_SEED).permutation(len(files))[:max(1, round(len(files) * val_fraction))]] = True
    out: dict[str, dict[str, np.ndarray]] = {split: {} for split in SPLITS}
    root = resolve(source[len("images:"):])
    for loc, val in zip(files, is_val):
        name = posixpath.relpath(loc.path, root.path)
        out["val" if val else "train"][name] = _decode(loc.read_bytes(), loc.uri, channels)
    return out


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _write_split(out, split: str, images: dict[str, np.ndarray]) -> dict:
    shards, rows, size = [], [], 0

    def flush():
        table = pa.table({"name": [r[0] for r in rows], "image": pa.array([r[1] for r in rows], pa.binary()),
                          "height": pa.array([r[2] for r in rows], pa.int32()),
                          "width": pa.array([r[3] for r in rows], pa.int32())})
        shards.append(write_shard(out, f"{split}/part-{len(shards):05d}.parquet", table, compression="none"))

    for name, image in images.items():
        data = _png(image)
        rows.append((name, data, image.shape[0], image.shape[1]))
        size += len(data)
        if size >= SHARD_BYTES:
            flush()
            rows, size = [], 0
    if rows:
        flush()
    return {"rows": len(images), "shards": shards}


def _smallest(images: dict[str, np.ndarray]) -> dict:
    """The name and size of the image with the smallest side."""
    name = min(images, key=lambda n: min(images[n].shape[:2]))
    return {"name": name, "height": int(images[name].shape[0]), "width": int(images[name].shape[1])}


def prepare_photo_dataset(source: str, out_uri: str, channels: int = 3, val_fraction: float = 0.1,
                          overwrite: bool = False, log=print) -> PhotoManifest:
    """Read a photo source, write train/val parquet shards of PNG files and the manifest (last); returns it."""
    if not 0.0 < val_fraction < 0.5:
        raise DatasetError(f"--val-fraction {val_fraction}: must be between 0 and 0.5")
    out = output_location(out_uri, overwrite)
    data = load_photo_source(source, channels, val_fraction)
    sides = [min(im.shape[:2]) for im in data["train"].values()]
    log(f"read {len(data['train'])} train and {len(data['val'])} val images from {source} (smallest training side "
        f"{min(sides)} px)")
    clear_output(out, SPLITS)
    splits = {split: SimpleNamespace(**_write_split(out, split, data[split])) for split in SPLITS}
    write_manifest(out, DATASET_KIND, source, splits, channels=channels, min_train_image=_smallest(data["train"]),
                   min_val_image=_smallest(data["val"]))
    log(f"wrote {out.uri}: train {splits['train'].rows} images, val {splits['val'].rows}")
    return load_photo_manifest(out.uri)


def load_photo_manifest(uri: str) -> PhotoManifest:
    """Read and check a photo dataset's manifest. Raises DatasetError naming the URI."""
    raw = read_manifest(uri, DATASET_KIND)
    try:
        smallest = [{"name": str(raw[k]["name"]), "height": int(raw[k]["height"]), "width": int(raw[k]["width"])}
                    for k in ("min_train_image", "min_val_image")]
        manifest = PhotoManifest(resolve(uri).uri, int(raw["channels"]), *smallest, raw)
        if not all(raw["splits"][s]["rows"] > 0 for s in SPLITS):
            raise ValueError("an empty split")
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{uri}/{MANIFEST_FILE}: malformed photo manifest ({type(exc).__name__}: {exc})") from None
    return manifest


def verify_photo_shards(manifest: PhotoManifest) -> None:
    verify_shards(manifest.uri, [s for split in SPLITS for s in manifest.shards(split)])


def load_photos(manifest: PhotoManifest, split: str, limit: int | None = None) -> list[np.ndarray]:
    """The split's images in order, each uint8 [H, W, channels]."""
    base, out = resolve(manifest.uri), []
    for shard in manifest.shards(split):
        loc = base.join(shard["path"])
        try:
            table = pq.read_table(loc.path, filesystem=loc.fs)
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{loc.uri}: cannot read the shard ({exc})") from None
        for name, data in zip(table.column("name").to_pylist(), table.column("image").to_pylist()):
            out.append(_decode(data, f"{loc.uri} ({name})", manifest.channels))
            if limit is not None and len(out) >= limit:
                return out
    return out


def ensure_photo_dataset(source: str, cache_dir: str, channels: int = 3, val_fraction: float = 0.1,
                         log=print) -> str:
    """The URI of a prepared dataset of this source, preparing it into the cache if needed."""
    key_source = source
    if source.startswith("images:") and "://" not in source:
        key_source = "images:" + os.path.abspath(os.path.expanduser(source[len("images:"):]))
    key = json.dumps([FORMAT_VERSION, DATASET_KIND, key_source, channels, val_fraction])
    uri = os.path.join(os.path.expanduser(cache_dir), f"photos-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    return prepared_once(uri, source, lambda out: prepare_photo_dataset(source, out, channels, val_fraction,
                                                                        overwrite=True, log=log), log)
