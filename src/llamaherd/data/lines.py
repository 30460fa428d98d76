"""Line-level dedup across documents, the Llama 3 paper's rule: a line seen more than 6 times in a
bucket of 30M documents is removed from all of them (it is boilerplate: navigation, cookie notices,
"Share this").

Lines are compared by a 64-bit hash of the stripped line (blank lines are never removed); a line's
key also carries its bucket, so one count covers every bucket. Counting reads the hashes in
partitions (by key modulo P), so memory stays bounded by the partition, not the corpus.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .normalize import hash64, normalize_text

_BUCKET_MIX = np.uint64(0x9E3779B97F4A7C15)


def line_hashes(text: str) -> list[int]:
    """A hash per non-blank line of the text."""
    return [hash64(ln.strip()) for ln in text.split("\n") if ln.strip()]


def line_keys(hashes: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """Keys of lines (uint64 hashes) in documents of the given buckets (one per line)."""
    with np.errstate(over="ignore"):
        return hashes ^ (buckets.astype(np.uint64) * _BUCKET_MIX)


def frequent_keys(read_keys: Callable[[int, int], list[np.ndarray]], total: int, threshold: int,
                  partition_size: int = 32 << 20) -> np.ndarray:
    """The line keys seen more than `threshold` times.

    Args:
        read_keys: (partition, partitions) -> the arrays of keys whose value % partitions == partition.
        total: number of keys in all, to choose the number of partitions.
        threshold: counts above this are frequent (the paper: 6).
        partition_size: keys sorted at once.
    Returns:
        The frequent keys, sorted (uint64).
    """
    partitions = max(1, -(-total // partition_size))
    found = []
    for p in range(partitions):
        parts = read_keys(p, partitions)
        keys = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        values, counts = np.unique(keys, return_counts=True)
        found.append(values[counts > threshold])
    return np.sort(np.concatenate(found)) if found else np.zeros(0, np.uint64)


def remove_lines(text: str, bucket: int, frequent: set[int]) -> str:
    """The text without its frequent lines (as keyed in `bucket`)."""
    mix = (bucket * int(_BUCKET_MIX)) & 0xFFFFFFFFFFFFFFFF
    kept = [ln for ln in text.split("\n") if not ln.strip() or (hash64(ln.strip()) ^ mix) not in frequent]
    return normalize_text("\n".join(kept))
