"""One home for storage: a URI (local path, file://, s3://) becomes a pyarrow filesystem and path.

S3-compatible stores are configured from the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL);
nothing here stores or logs credentials.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage URI cannot be used; the message names the URI and the reason."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _s3_filesystem(patient: bool = True) -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Patient: exponential back-off over ~25 s rides out a store restart (training, Ray's checkpoint
    # uploads). Fast: pre-flight checks answer a wrong endpoint or key at once.
    retry = pafs.AwsDefaultS3RetryStrategy(max_attempts=10 if patient else 1)
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": retry,
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs["force_virtual_addressing"] = False
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Location:
    """A resolved storage location: the original URI, its filesystem and the path inside it."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        """The location of a relative path inside this one; a part that would leave it is refused."""
        for part in parts:
            if part.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", part):
                raise StorageError(f"{self.uri}: {part!r} is not a path inside it")
        path = posixpath.join(self.path, *parts)
        uri = posixpath.join(self.uri, *parts) if is_remote(self.uri) else path
        return Location(uri, self.fs, path)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"{self.uri} does not exist") from None
        except OSError as exc:
            raise explain(self.uri, exc) from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write a file so that readers see either nothing or all of it."""
        if self.local:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        else:  # a single PUT is atomic on S3
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def mkdirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def list(self) -> list[str]:
        """Names directly inside this folder (empty if it does not exist)."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(posixpath.basename(i.path) for i in infos)

    def download_to(self, local_dir: str) -> str:
        """Copy this folder to a local folder and return it (a no-op copy for local storage)."""
        if self.local:
            return self.path
        os.makedirs(local_dir, exist_ok=True)
        pafs.copy_files(self.path, local_dir, source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    def upload_from(self, local_dir: str) -> None:
        """Copy a local folder's contents into this location."""
        if self.local and os.path.abspath(local_dir) == os.path.abspath(self.path):
            return
        self.mkdirs()
        pafs.copy_files(local_dir, self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)


def explain(uri: str, exc: OSError) -> StorageError:
    """Turn a filesystem/S3 error into one line naming the URI and the likely cause."""
    text = str(exc)
    if "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "403" in text:
        return StorageError(f"{uri}: access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    if "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        return StorageError(f"{uri}: the bucket does not exist")
    if "Couldn't connect" in text or "curlCode: 7" in text or "Connection refused" in text or "NETWORK_CONNECTION" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the S3 endpoint")
        return StorageError(f"{uri}: cannot reach {endpoint} (is the object store running?)")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return StorageError(f"{uri}: {first}")


def check_access(uri: str, must_exist: bool = False, expect: str | None = None) -> Location:
    """Fail fast, before any cluster time: the bucket exists and the credentials work.

    For S3 this lists the bucket (a real request to the server); locally, for a location to be written
    (`must_exist=False`), it checks that its nearest existing folder can be written. `expect` ('folder' or
    'file') refuses a location that exists as the other kind.
    """
    loc = resolve(uri, patient=False)
    try:
        if not loc.local:
            bucket = loc.path.split("/", 1)[0]
            if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{uri}: the bucket {bucket!r} does not exist")
            loc.fs.get_file_info(pafs.FileSelector(bucket, recursive=False, allow_not_found=True))
        kind = loc.fs.get_file_info(loc.path).type
    except OSError as exc:
        raise explain(uri, exc) from None
    if must_exist and kind == pafs.FileType.NotFound:
        raise StorageError(f"{uri} does not exist")
    if expect == "folder" and kind == pafs.FileType.File:
        raise StorageError(f"{uri} is a file, not a folder")
    if expect == "file" and kind == pafs.FileType.Directory:
        raise StorageError(f"{uri} is a folder, not a file")
    if loc.local and not must_exist:
        _check_writable(uri, loc.path)
    return loc


def _check_writable(uri: str, path: str) -> None:
    """The nearest existing folder at or above a local path to be written is a folder we may write in."""
    parent = path if os.path.isdir(path) else os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise StorageError(f"{uri}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StorageError(f"{uri}: cannot write in {parent} (permission denied)")


def resolve(uri: str, patient: bool = True) -> Location:
    """Resolve a local path, file:// or s3:// URI. Raises StorageError for unsupported schemes.

    `patient=False` gives an S3 filesystem that does not retry (for pre-flight checks)."""
    if not uri or not uri.strip():
        raise StorageError("empty storage URI")
    if uri.startswith("file://"):
        path = os.path.abspath(os.path.expanduser(uri[len("file://"):]))
        return Location(path, pafs.LocalFileSystem(), path)
    if "://" not in uri:
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(path, pafs.LocalFileSystem(), path)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise StorageError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
        key = parsed.path.strip("/")
        if key and {"", ".", ".."} & set(key.split("/")):  # servers and proxies may collapse them, S3 keeps them
            raise StorageError(f"{uri}: an S3 key cannot have empty, '.' or '..' parts")
        path = f"{parsed.netloc}/{key}".rstrip("/")
        return Location(f"s3://{path}", _s3_filesystem(patient), path)
    raise StorageError(f"{uri}: unsupported scheme {parsed.scheme!r} (use a local path, file:// or s3://)")


def copy_tree(src: str, dst: str) -> None:
    """Copy a folder between any two locations (e.g. a run's TensorBoard events to a local folder)."""
    a, b = resolve(src), resolve(dst)
    if not a.is_dir():
        raise StorageError(f"{src} is not a folder")
    b.mkdirs()
    try:
        pafs.copy_files(a.path, b.path, source_filesystem=a.fs, destination_filesystem=b.fs)
    except OSError as exc:
        raise explain(src, exc) from None


def local_scratch(prefix: str) -> str:
    """A fresh local temporary folder."""
    return tempfile.mkdtemp(prefix=prefix)


def remove_local(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    """`python -m cluster.storage copy SRC DST`: copy a folder, e.g. TensorBoard events out of S3."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    cp = sub.add_parser("copy", help="copy a folder between local paths and s3:// URIs")
    cp.add_argument("src")
    cp.add_argument("dst")
    ls = sub.add_parser("ls", help="list a folder")
    ls.add_argument("uri")
    args = p.parse_args()
    try:
        if args.cmd == "copy":
            copy_tree(args.src, args.dst)
        else:
            print("\n".join(check_access(args.uri, must_exist=True).list()))
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
