"""GGUF checkpoints (`llama` architecture), read with the `gguf` package.

The file is memory-mapped by `gguf.GGUFReader`; each tensor is dequantized straight from the map,
so no second copy of the raw file is held. GGUF stores q/k in Meta's interleaved layout already
(llama.cpp's converter undoes HF's permutation), so only names change.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import KNOWN_ROPE_SCALINGS, ModelArgs
from ..errors import FormatError
from ..model import rope_frequencies
from ..quantize.ggml import dequantize
from .keymaps import FROM_GGUF, map_key


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` for `path`, with a clear error for a truncated or corrupt file."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path), "r")
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    except Exception as e:  # the reader raises ValueError, KeyError, struct errors... on bad files
        raise FormatError(f"{path} is not a valid GGUF file (truncated or corrupt?): {e}") from None


def read_metadata(reader) -> dict[str, Any]:
    """GGUF key/value metadata as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise FormatError(f"GGUF metadata {key!r} is unreadable: {e}") from None
    return meta


def _rope_scaling_from_tensor(factors: torch.Tensor, args: ModelArgs):
    """Recognise the Llama 3.1 scaling whose per-frequency divisors `rope_freqs.weight` holds."""
    base = rope_frequencies(args.head_dim, args.rope_theta)
    for scaling in KNOWN_ROPE_SCALINGS:
        expected = base / rope_frequencies(args.head_dim, args.rope_theta, scaling)
        if factors.shape == expected.shape and torch.allclose(factors.float(), expected, rtol=1e-3):
            return scaling
    raise FormatError("rope_freqs.weight matches no known Llama 3.1 RoPE scaling")


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """Read a GGUF file: returns (args, state_dict in Meta names, metadata)."""
    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    args = ModelArgs.from_gguf(meta, names)
    state_dict = {}
    for t in reader.tensors:
        key = map_key(t.name, FROM_GGUF)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists ne0 (fastest) first
        try:
            tensor = dequantize(t.data, t.tensor_type, shape, dtype=dtype)
        except FormatError as e:
            raise FormatError(f"tensor {t.name!r}: {e}") from None
        if t.name == "rope_freqs.weight":
            args = replace(args, rope_scaling=_rope_scaling_from_tensor(tensor, args))
        elif key is not None:
            state_dict[key] = tensor
    return args, state_dict, meta

