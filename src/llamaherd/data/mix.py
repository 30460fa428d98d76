"""The data mix: the share of the output tokens each source or language gets (`code=0.17,ko=0.08`).

A group is every document whose source (a JSONL `source` field, else the input file or folder name)
or language is the key; documents in no group share what is left. Groups are only sampled down, never
repeated: the largest output that gives each group its share is kept, each document by a
deterministic draw from its text hash, so a run and its resume keep the same documents.
"""

from __future__ import annotations

import numpy as np

from ..errors import HerdError

REST = ""  # the group of documents no key names


def parse_mix(spec: str | dict | None) -> dict[str, float]:
    """'code=0.17,ko=0.08' -> {'code': 0.17, 'ko': 0.08}; shares must be in (0, 1] and sum to ≤ 1."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        mix = {str(k): float(v) for k, v in spec.items()}
    else:
        mix = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            try:
                mix[key.strip()] = float(value)
            except ValueError:
                raise HerdError(f"--mix wants NAME=SHARE pairs like code=0.17,ko=0.08, not '{item}'") from None
            if not sep or not key.strip():
                raise HerdError(f"--mix wants NAME=SHARE pairs like code=0.17,ko=0.08, not '{item}'")
    if any(not 0 < v <= 1 for v in mix.values()) or sum(mix.values()) > 1 + 1e-9:
        raise HerdError(f"--mix shares must each be in (0, 1] and add up to at most 1: {mix}")
    return mix


def group_of(source: str, lang: str, mix: dict[str, float]) -> str:
    """The mix group of a document: its source if named, else its language if named, else REST."""
    if source in mix:
        return source
    return lang if lang in mix else REST


def keep_rates(tokens_per_group: dict[str, int], mix: dict[str, float]) -> dict[str, float]:
    """The probability each group's documents are kept so that the groups get their shares.

    Args:
        tokens_per_group: tokens of each group before the mix (REST for the others).
        mix: the shares; REST gets 1 - their sum.
    Returns:
        group -> keep probability in [0, 1].
    """
    for key in mix:
        if not tokens_per_group.get(key):
            raise HerdError(f"--mix: no documents of '{key}' are left (keys name a source or a language)")
    shares = dict(mix)
    rest = 1.0 - sum(mix.values())
    if tokens_per_group.get(REST) and rest > 1e-9:
        shares[REST] = rest
    total = min(tokens_per_group[g] / s for g, s in shares.items())
    return {g: (min(1.0, shares[g] * total / t) if g in shares else 0.0)
            for g, t in tokens_per_group.items()}


def draws(keys: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per document, fixed by its 64-bit text key and the seed."""
    with np.errstate(over="ignore"):
        x = keys.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)  # splitmix64 finaliser
        x = (x ^ (x >> np.uint64(33))) * np.uint64(0xC4CEB9FE1A85EC53)
        x = x ^ (x >> np.uint64(33))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
