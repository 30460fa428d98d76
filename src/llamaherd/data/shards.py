"""Token shards: what `herd data prepare` writes and pre-training reads.

A shard is two raw little-endian files, memory-mapped by readers:
- `shard_NNNNN.bin`: uint32 token ids, the documents one after another (no BOS/EOS added: the
  trainer adds them at the boundaries);
- `shard_NNNNN.idx`: uint64 end offsets, one per document (document i is bin[idx[i-1]:idx[i]]).
`report.json` lists the shards with the tokenizer's name, vocabulary size and BOS/EOS ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import HerdError


class ShardWriter:
    """Appends documents' tokens to shards of about `shard_tokens` tokens (a document is never split)."""

    def __init__(self, out: str | os.PathLike, shard_tokens: int = 1 << 28):
        self.out = Path(out)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._bin = None

    def _open(self) -> None:
        name = f"shard_{len(self.shards):05d}"
        self._bin = open(self.out / f"{name}.bin", "wb")
        self._ends: list[int] = []
        self._count = 0
        self.shards.append({"tokens": f"{name}.bin", "index": f"{name}.idx", "documents": 0, "n_tokens": 0})

    def write(self, tokens: np.ndarray) -> None:
        """Add one document."""
        if self._bin is None or (self._count and self._count + len(tokens) > self.shard_tokens):
            self._close()
            self._open()
        self._bin.write(np.ascontiguousarray(tokens, dtype="<u4").tobytes())
        self._count += len(tokens)
        self._ends.append(self._count)

    def _close(self) -> None:
        if self._bin is None:
            return
        self._bin.close()
        np.asarray(self._ends, dtype="<u8").tofile(self.out / self.shards[-1]["index"])
        self.shards[-1].update(documents=len(self._ends), n_tokens=self._count)
        self._bin = None

    def close(self) -> list[dict]:
        """Finish the last shard; returns the shard list for report.json."""
        self._close()
        return self.shards


def open_shards(directory: str | os.PathLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (tokens, ends) memory maps of every shard in a prepared directory."""
    directory = Path(directory)
    try:
        report = json.loads((directory / "report.json").read_text())
    except (OSError, ValueError):
        raise HerdError(f"{directory} holds no prepared data (report.json): run `herd data prepare`") from None
    maps = []
    for shard in report["shards"]:
        tokens = np.memmap(directory / shard["tokens"], dtype="<u4", mode="r") if shard["n_tokens"] \
            else np.zeros(0, "<u4")
        ends = np.fromfile(directory / shard["index"], dtype="<u8")
        if len(tokens) != (ends[-1] if len(ends) else 0):
            raise HerdError(f"{directory / shard['tokens']} is truncated: prepare the data again")
        maps.append((tokens, ends))
    return maps


def iter_documents(directory: str | os.PathLike) -> Iterator[np.ndarray]:
    """Each document's token ids, in order, as views into the memory maps."""
    for tokens, ends in open_shards(directory):
        start = 0
        for end in ends:
            yield tokens[start:int(end)]
            start = int(end)
