"""Normalising a document's text, and the 64-bit keys exact dedup compares.

The text written to the shards is the normalised text (Unicode NFC, "\\n" line ends, no trailing
spaces, no blank lines at either end). Exact dedup hashes a simpler form still (lower case, runs of
whitespace as one space), so copies that differ only in case or spacing count as duplicates.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from urllib.parse import urlsplit

_TRAILING = re.compile(r"[ \t\f\v]+$", re.M)


def normalize_text(text: str) -> str:
    """The text as it is kept: NFC, Unix line ends, trailing spaces and outer blank lines removed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return _TRAILING.sub("", text).strip("\n")


def hash64(data: str | bytes) -> int:
    """A stable 64-bit hash (the first 8 bytes of BLAKE2b), the same in every process and run."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def text_key(text: str) -> int:
    """Exact-dedup key of a document: lower case, whitespace collapsed."""
    return hash64(" ".join(text.lower().split()))


def url_key(url: str) -> int:
    """URL-dedup key: scheme, "www.", fragment and a trailing slash don't make a URL different."""
    parts = urlsplit(url.strip())
    host = parts.netloc.lower().removeprefix("www.")
    path = parts.path.rstrip("/") or "/"
    return hash64(f"{host}{path}?{parts.query}")
