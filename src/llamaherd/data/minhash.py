"""Near-duplicate documents with MinHash LSH, as FineWeb does it: word 5-grams, 112 hash functions
in 14 bands of 8 rows (a pair with Jaccard similarity 0.8 shares a band with probability 0.92; at
0.5, 0.05). One document of each cluster is kept: the first in corpus order.

Signatures are computed per document by datasketch (in the worker processes) and stored on disk;
the LSH step then reads one band at a time, so its memory is a few integers per document, whatever
the size of the texts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np

from .normalize import hash64

_NON_WORD = re.compile(r"[^\w\s]")
# Odd 64-bit constants that mix a shingle's word hashes, or a band's rows, into one key
# (multiply-add, wrapping).
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x85EBCA77C2B2AE63, 0x94D049BB133111EB],
                dtype=np.uint64)


class MinHasher:
    """The MinHash signature of a text's word n-grams.

    Args:
        ngram: words per shingle (FineWeb: 5).
        num_perm: hash functions (bands × rows).
        seed: the permutations' seed; signatures compare only under the same seed.
    """

    def __init__(self, ngram: int = 5, num_perm: int = 112, seed: int = 1):
        from datasketch import MinHash

        if not 1 <= ngram <= len(_MIX):
            raise ValueError(f"MinHash shingles are 1 to {len(_MIX)} words, not {ngram}")
        self._MinHash = MinHash
        self.ngram = ngram
        self.num_perm = num_perm
        self._permutations = MinHash(num_perm=num_perm, seed=seed).permutations

    def shingles(self, text: str) -> np.ndarray:
        """32-bit hashes of the text's distinct word n-grams, lower-cased and without punctuation (a
        shorter text is one shingle). Each distinct word is hashed once (BLAKE2b) and an n-gram's
        hash mixes its words' hashes, which is faster than hashing every n-gram's text."""
        words = _NON_WORD.sub(" ", text.lower()).split() or [""]
        cache: dict[str, int] = {}
        word_hash = np.fromiter((cache[w] if w in cache else cache.setdefault(w, hash64(w)) for w in words),
                                np.uint64, len(words))
        n = min(self.ngram, len(words))
        count = len(words) - n + 1
        acc = np.zeros(count, np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                acc += word_hash[k:k + count] * _MIX[k]
        return np.unique((acc >> np.uint64(32)).astype(np.uint32))

    def __call__(self, text: str) -> np.ndarray:
        """The signature, (num_perm,) uint32."""
        m = self._MinHash(num_perm=self.num_perm, permutations=self._permutations, scheme="affine32",
                          hashfunc=int)  # the shingles come hashed already
        m.update_batch(self.shingles(text).tolist())
        return m.hashvalues.astype(np.uint32)


def band_keys(signatures: np.ndarray, band: int, rows: int) -> np.ndarray:
    """One 64-bit key per document for a band: equal rows give equal keys. (n,) uint64."""
    block = signatures[:, band * rows:(band + 1) * rows].astype(np.uint64)
    mix = np.resize(_MIX, rows)
    with np.errstate(over="ignore"):
        return (block * mix).sum(axis=1, dtype=np.uint64) ^ np.uint64(band)


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def near_duplicates(read_band: Callable[[int], np.ndarray], n: int, bands: int = 14,
                    rows: int = 8) -> np.ndarray:
    """Which documents repeat an earlier one.

    Args:
        read_band: band index -> (n,) uint64 keys of the candidate documents (see band_keys); called
            once per band, so the caller can read them from disk one band at a time.
        n: number of candidate documents.
        bands, rows: the LSH shape.
    Returns:
        (n,) bool, True for a document in the cluster of an earlier one (the earliest is kept).
    """
    parent = np.arange(n, dtype=np.int64)
    for band in range(bands):
        keys = read_band(band)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])  # order[i+1] joins order[i]
        for i in same:
            a, b = _find(parent, int(order[i])), _find(parent, int(order[i + 1]))
            if a != b:
                parent[max(a, b)] = min(a, b)  # the root is the earliest member
    roots = np.array([_find(parent, i) for i in range(n)], dtype=np.int64) if n else parent
    return roots != np.arange(n)


def signatures_to_keys(chunks: Iterable[np.ndarray], band: int, rows: int) -> np.ndarray:
    """Concatenated band keys of signature arrays read piece by piece."""
    parts = [band_keys(sig, band, rows) for sig in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)
