"""Reading a corpus as a stream of documents, in units of work that processes can share.

Inputs are text files (one document each), JSONL files (one JSON object per line with a `text`
field, and optional `url`, `date`, `source`), gzip-compressed ones of either (`.gz`), or folders of
them, walked in sorted order. A large JSONL file is cut into byte ranges so several processes read
it at once. Nothing here holds more than one document in memory.

A record that cannot be a document is counted under a reason, never raised: `binary` (NUL bytes),
`invalid_utf8`, `bad_json` (not an object with a string `text`) and `too_long` (over max_doc_bytes).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..errors import HerdError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
READ_ERRORS = ("binary", "invalid_utf8", "bad_json", "too_long")


@dataclass(frozen=True)
class Unit:
    """A piece of the corpus read by one process: a whole file, or the lines of a JSONL file that
    start in [start, end)."""
    path: str
    jsonl: bool
    source: str  # the input argument it came from (file stem or folder name), for --mix
    start: int = 0
    end: int = -1  # -1: to the end


@dataclass
class Document:
    text: str
    source: str
    url: str | None = None
    date: float | None = None  # seconds since the epoch, or any number the input uses


def _files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def plan_units(inputs: list[str | os.PathLike], chunk_bytes: int = 32 << 20) -> list[Unit]:
    """The units of work for `inputs`, in corpus order.

    Args:
        inputs: files or folders.
        chunk_bytes: size of the byte ranges a plain JSONL file is cut into.
    Returns:
        The units; a missing input raises HerdError.
    """
    units = []
    for item in inputs:
        root = Path(item)
        if not root.exists():
            raise HerdError(f"no such file or folder: {item}")
        source = root.name.split(".")[0] if root.is_file() else root.resolve().name
        for path in _files(root):
            jsonl = path.name.lower().endswith(JSONL_SUFFIXES)
            size = path.stat().st_size
            if not jsonl or path.suffix == ".gz" or size <= chunk_bytes:
                units.append(Unit(str(path), jsonl, source))
                continue
            for start in range(0, size, chunk_bytes):
                units.append(Unit(str(path), jsonl, source, start, min(size, start + chunk_bytes)))
    return units


def parse_date(value) -> float | None:
    """A `date` field as a number: a number stays one; an ISO 8601 string becomes a timestamp."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _decode(raw: bytes) -> str:
    if b"\0" in raw:
        raise _Skip("binary")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Skip("invalid_utf8") from None


class _Skip(Exception):
    pass


def read_unit(unit: Unit, max_doc_bytes: int = 10 << 20) -> Iterator[Document | str]:
    """The documents of a unit, in order; a record that is not a document yields its reason
    (one of READ_ERRORS) instead."""
    opener = gzip.open if unit.path.endswith(".gz") else open
    try:
        with opener(unit.path, "rb") as f:
            if not unit.jsonl:
                raw = f.read(max_doc_bytes + 1)
                if len(raw) > max_doc_bytes:
                    yield "too_long"
                    return
                try:
                    yield Document(_decode(raw), unit.source)
                except _Skip as skip:
                    yield str(skip)
                return
            yield from _read_jsonl(f, unit, max_doc_bytes)
    except (OSError, EOFError) as e:  # a truncated .gz, a file removed while reading
        raise HerdError(f"cannot read {unit.path}: {e}") from None


def _read_jsonl(f, unit: Unit, max_doc_bytes: int) -> Iterator[Document | str]:
    if unit.start > 0:
        f.seek(unit.start - 1)
        f.readline()  # the line that holds byte `start` belongs to the unit before, unless it starts here
    while unit.end < 0 or f.tell() < unit.end:
        raw = f.readline(max_doc_bytes + 1)
        if not raw:
            return
        if len(raw) > max_doc_bytes and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line, a little at a time
                raw = f.readline(1 << 20)
            yield "too_long"
            continue
        if not raw.strip():
            continue
        try:
            obj = json.loads(_decode(raw))
        except _Skip as skip:
            yield str(skip)
            continue
        except ValueError:
            yield "bad_json"
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            yield "bad_json"
            continue
        try:
            obj["text"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate written as "\ud800" in the JSON
            yield "invalid_utf8"
            continue
        url = obj.get("url")
        source = obj.get("source")
        yield Document(obj["text"], source if isinstance(source, str) and source else unit.source,
                       url if isinstance(url, str) and url else None, parse_date(obj.get("date")))
