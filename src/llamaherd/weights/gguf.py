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
    """GGUF key/value metadata as plain Python values, with a clear error for an unreadable field."""
    from ..tokenizer.bpe import gguf_metadata

    try:
        return {k: v for k, v in gguf_metadata(reader).items() if not k.startswith("GGUF.")}
    except Exception as e:  # a malformed field: the reader raises whatever numpy does
        raise FormatError(f"GGUF metadata is unreadable (corrupt file?): {e}") from None


def _rope_scaling_from_tensor(factors: torch.Tensor, args: ModelArgs):
    """Recognise the Llama 3.1 scaling whose per-frequency divisors `rope_freqs.weight` holds."""
    base = rope_frequencies(args.head_dim, args.rope_theta)
    for scaling in KNOWN_ROPE_SCALINGS:
        expected = base / rope_frequencies(args.head_dim, args.rope_theta, scaling)
        if factors.shape == expected.shape and torch.allclose(factors.float(), expected, rtol=1e-3):
            return scaling
    raise FormatError("rope_freqs.weight matches no known Llama 3.1 RoPE scaling")


FLOAT_TYPES = {"F32", "F16", "BF16"}
# The transformer blocks' projections. The embedding and output projection stay in float: requantizing
# them to per-row int8 (and feeding the int8 kernel bf16 activations) shows directly in the logits —
# teacher-forced top-1 agreement with the reference fell from 99.3% to 98.3% on SmolLM2 when we did.
QUANTIZABLE = {f"layers.{i}.{m}" for i in range(1024) for m in (
    "attention.wq", "attention.wk", "attention.wv", "attention.wo",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, quantized: bool = False):
    """Read a GGUF file: returns (args, state_dict in Meta names, metadata, quantized kinds).

    With `quantized`, weights of quantized types stay quantized (see `quantize/linear.py`): their
    state-dict entries are the buffers of `Int4Linear`/`Int8Linear`/`Int8Embedding` modules, and
    the returned dict names those modules and their kind. Otherwise everything is dequantized to
    `dtype` and the dict is empty.
    """
    from ..quantize.linear import pack_gguf_tensor

    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    args = ModelArgs.from_gguf(meta, names)
    state_dict, kinds = {}, {}
    for t in reader.tensors:
        key = map_key(t.name, FROM_GGUF)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists ne0 (fastest) first
        try:
            module = key.rpartition(".")[0] if key else None
            if quantized and module in QUANTIZABLE and t.tensor_type.name not in FLOAT_TYPES:
                kinds[module], buffers = pack_gguf_tensor(t.data, t.tensor_type, shape)
                state_dict.update({f"{module}.{name}": b for name, b in buffers.items()})
                continue
            tensor = dequantize(t.data, t.tensor_type, shape, dtype=dtype)
        except FormatError as e:
            raise FormatError(f"tensor {t.name!r}: {e}") from None
        if t.name == "rope_freqs.weight":
            args = replace(args, rope_scaling=_rope_scaling_from_tensor(tensor.float(), args))
        elif key is not None:
            state_dict[key] = tensor
    return args, state_dict, meta, kinds

