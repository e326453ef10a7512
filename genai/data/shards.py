"""What every prepared dataset shares: parquet shards with sizes and sha256 in a manifest written last.

A dataset folder (local path or s3:// URI) holds `<split>/part-NNNNN.parquet` shards and `manifest.json`;
the manifest is written after every shard, so its presence means the dataset is whole. Readers check the
manifest's kind and format version, and the shards' sizes (and checksums) against it, naming what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cluster.storage import Location, StorageError, check_access, resolve

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CHECKSUM_LIMIT_BYTES = 256 * 1024 * 1024  # above this, verify_shards(checksums=None) checks sizes only


class DatasetError(ValueError):
    """A dataset is missing, incomplete or inconsistent; the message names the URI."""


def write_shard(base: Location, rel_path: str, table: pa.Table, **parquet_options) -> dict:
    """Write `table` as a zstd parquet file at base/rel_path in one atomic write; return its manifest entry
    {"path", "rows", "bytes", "sha256"}. `parquet_options` go to pyarrow.parquet.write_table."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **{"compression": "zstd", **parquet_options})
    data = buf.getvalue()
    base.join(rel_path).write_bytes(data)
    return {"path": rel_path, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def verify_shards(uri: str, shards: list[dict], checksums: bool | None = None) -> None:
    """Check every shard against its manifest entry (size, and sha256 when `checksums`, by default for datasets
    up to 256 MiB). Raises DatasetError naming the shard that is missing or corrupt."""
    base = resolve(uri)
    if checksums is None:
        checksums = sum(s["bytes"] for s in shards) <= CHECKSUM_LIMIT_BYTES
    for shard in shards:
        loc = base.join(shard["path"])
        try:
            info = loc.fs.get_file_info(loc.path)
            if info.type == pafs.FileType.NotFound:
                raise DatasetError(f"{loc.uri}: shard listed in the manifest is missing")
            if info.size != shard["bytes"]:
                raise DatasetError(f"{loc.uri}: shard is corrupt ({info.size} bytes, the manifest says {shard['bytes']})")
            if checksums and hashlib.sha256(loc.read_bytes()).hexdigest() != shard["sha256"]:
                raise DatasetError(f"{loc.uri}: shard is corrupt (checksum does not match the manifest)")
        except (StorageError, OSError) as exc:
            raise DatasetError(f"{loc.uri}: {exc}") from None


def read_manifest(uri: str, kind: str) -> dict:
    """Read a dataset's manifest and check its kind and format version. Raises DatasetError naming the URI."""
    try:
        loc = resolve(uri)
    except StorageError as exc:
        raise DatasetError(f"{uri}: {exc}") from None
    try:
        raw_text = loc.join(MANIFEST_FILE).read_text()
    except StorageError as exc:
        if "does not exist" in str(exc):
            raise DatasetError(
                f"{uri}: no {MANIFEST_FILE} (not a prepared dataset, or its preparation did not finish; "
                "run jobs/prepare_data.py)") from None
        if loc.exists() and not loc.is_dir():
            raise DatasetError(f"{uri} is a file, not a dataset folder (jobs/prepare_data.py writes one)") from None
        raise DatasetError(f"{uri}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{uri}: cannot read the dataset ({exc})") from None
    try:
        raw = json.loads(raw_text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{uri}/{MANIFEST_FILE}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{uri}/{MANIFEST_FILE}: not a dataset manifest (a JSON object is expected)")
    if raw.get("kind") != kind:
        raise DatasetError(f"{uri}: dataset kind {raw.get('kind')!r} is not {kind!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{uri}: format version {raw.get('format_version')} (this code reads {FORMAT_VERSION})")
    return raw


def prepared_once(uri: str, source: str, prepare, log=print) -> str:
    """`uri`, after `prepare(uri)` made the dataset there unless a whole one (its manifest written last) already is."""
    try:
        whole = resolve(uri).join(MANIFEST_FILE).exists()
    except OSError as exc:
        raise DatasetError(f"{uri}: {exc}") from None
    if not whole:
        log(f"preparing {source} into the dataset cache {uri}")
        prepare(uri)
    return uri


def output_location(out_uri: str, overwrite: bool) -> Location:
    """Where a preparation writes; refuses to replace a whole dataset there unless `overwrite`, and a file or
    an unwritable folder before any work."""
    out = resolve(out_uri)
    if out.local:  # S3 was checked by the job, with a request; this pass costs nothing
        check_access(out_uri, expect="folder")
    if out.join(MANIFEST_FILE).exists() and not overwrite:
        raise DatasetError(f"{out.uri} already holds a prepared dataset (pass --overwrite to replace it)")
    return out


def clear_output(out: Location, names: tuple[str, ...]) -> None:
    """Delete the manifest first (the dataset stops being whole), then what an earlier attempt wrote."""
    for name in (MANIFEST_FILE, *names):
        out.join(name).delete()
    out.mkdirs()


def write_manifest(out: Location, kind: str, source: str, splits: dict, **fields) -> None:
    """Write `manifest.json` (format version, kind, time, source, the dataset's own fields, the splits):
    the last file of a dataset, so that its presence means the dataset is whole."""
    import time

    manifest = {"format_version": FORMAT_VERSION, "kind": kind,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source, **fields,
                "splits": {k: vars(v) for k, v in splits.items()}}
    out.join(MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def dataset_fingerprint(manifest: dict) -> str:
    """A digest of what a dataset holds (its kind, tokenizer, and every shard's rows and checksum per split), not
    of where it lives or when it was written: a copy moved to other storage has the same fingerprint."""
    content = {
        "kind": manifest.get("kind"),
        "tokenizer": (manifest.get("tokenizer") or {}).get("sha256"),
        "splits": {name: [[s.get("rows"), s.get("sha256")] for s in split.get("shards", [])]
                   for name, split in sorted((manifest.get("splits") or {}).items())},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
