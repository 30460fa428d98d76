"""GGUF checkpoints (`llama` architecture).

The file is memory-mapped (`formats.gguf.GGUFFile`); each tensor is dequantized or packed straight
from the map, so no second copy of the raw file is held. GGUF stores q/k in Meta's interleaved layout already
(llama.cpp's converter undoes HF's permutation), so only names change.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..config import KNOWN_ROPE_SCALINGS, ModelArgs
from ..errors import FormatError
from ..model import FUSED_PROJECTIONS, rope_frequencies
from ..quantize.ggml import dequantize
from ..formats.gguf import GGUFFile
from .keymaps import FROM_GGUF, map_key


def _rope_scaling_from_tensor(factors: torch.Tensor, args: ModelArgs):
    """Recognise the Llama 3.1 scaling whose per-frequency divisors `rope_freqs.weight` holds."""
    base = rope_frequencies(args.head_dim, args.rope_theta)
    for scaling in KNOWN_ROPE_SCALINGS:
        expected = base / rope_frequencies(args.head_dim, args.rope_theta, scaling)
        if factors.shape == expected.shape and torch.allclose(factors.float(), expected, rtol=1e-3):
            return scaling
    raise FormatError("rope_freqs.weight matches no known Llama 3.1 RoPE scaling")


FLOAT_TYPES = {"F32", "F16", "BF16"}
# The transformer blocks' projections become Int4Linear / Int8Linear. The embedding and the output
# projection are treated apart: requantizing the output to per-row int8 shows directly in the logits
# (teacher-forced top-1 agreement with the reference fell from 99.3% to 98.3% on SmolLM2), so its
# best candidates are recomputed exactly (`RefinedInt8Linear`), and embedding rows are dequantized
# exactly from the GGUF blocks on lookup (`GGMLEmbedding`).
QUANTIZABLE = {f"layers.{i}.{m}" for i in range(1024) for m in (
    "attention.wq", "attention.wk", "attention.wv", "attention.wo",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, quantized: bool = False, gpu: bool = False):
    """Read a GGUF file: returns (args, state_dict in Meta names, metadata, quantized kinds).

    With `quantized`, weights of quantized types stay quantized (see `quantize/linear.py`): their
    state-dict entries are the buffers of the modules of `quantize/linear.py`, and
    the returned dict names those modules and their kind. Otherwise everything is dequantized to
    `dtype` and the dict is empty.

    `gpu` (with `quantized`): the CUDA path. The 4-bit projections (Q4_0, Q4_1, Q4_K; the output
    projection too, when not tied) become torch's int4 layers (`Int4Linear`: the file's codes, bf16
    scales), not bf16 copies; every other tensor (Q6_K, Q8_0..., the embedding) is dequantized to
    `dtype`.
    """
    reader = GGUFFile(path, writable=True)  # the weights are the file's mapped pages
    meta = reader.metadata
    names = {t.name for t in reader.tensors}
    args = ModelArgs.from_gguf(meta, names)
    state_dict, kinds = {}, {}
    parts: dict[str, dict[str, tuple]] = {}  # fused module -> its parts' (data, qtype, shape) seen so far
    for t in reader.tensors:
        key = map_key(t.name, FROM_GGUF)
        shape = t.shape
        try:
            module = key.rpartition(".")[0] if key else None
            if quantized and t.tensor_type.name not in FLOAT_TYPES and (
                    module in QUANTIZABLE or (gpu and module == "output")):
                add_block_weight(module, t.data, t.tensor_type, shape, state_dict, kinds, parts, gpu, dtype)
                continue
            if quantized and not gpu and t.tensor_type.name not in FLOAT_TYPES \
                    and module in ("tok_embeddings", "output"):
                add_embedding_or_output(module, t.data, t.tensor_type, shape, args.tie_embeddings, state_dict, kinds)
                continue
            tensor = dequantize(t.data, t.tensor_type, shape, dtype=dtype)
        except FormatError as e:
            raise FormatError(f"tensor {t.name!r}: {e}") from None
        if t.name == "rope_freqs.weight":
            args = replace(args, rope_scaling=_rope_scaling_from_tensor(tensor.float(), args))
        elif key is not None:
            state_dict[key] = tensor
    finish_parts(parts, state_dict, kinds, gpu, dtype)
    return args, state_dict, meta, kinds


def add_block_weight(module: str, data, qtype, shape: tuple[int, int], state_dict: dict, kinds: dict,
                     parts: dict[str, dict[str, tuple]], gpu: bool = False, dtype=torch.bfloat16) -> None:
    """Put the quantized buffers of block projection `module` (GGUF blocks `data`) in `state_dict`
    and its kind in `kinds`; a part of a fused projection waits in `parts` for its siblings.
    `gpu`, `dtype`: see `load_gguf`."""
    fused = _fused_name(module)
    if fused is None:
        _pack_one(module, data, qtype, shape, state_dict, kinds, gpu, dtype)
    else:  # packed when all its parts are read (see `_pack_fused`)
        parts.setdefault(fused, {})[module] = (data, qtype, shape)
        if len(parts[fused]) == len(FUSED_PROJECTIONS[fused.rpartition(".")[2]]):
            _pack_fused(fused, parts.pop(fused), state_dict, kinds, gpu, dtype)


def _pack_one(module: str, data, qtype, shape, state_dict: dict, kinds: dict, gpu: bool, dtype) -> None:
    """One projection's buffers into `state_dict`: quantized (its kind into `kinds`), or, on the
    GPU path, a plain float weight."""
    from ..quantize.linear import pack_gguf_tensor

    kind, buffers = pack_gguf_tensor(data, qtype, shape, gpu=gpu, dtype=dtype)
    if kind != "float":
        kinds[module] = kind
    state_dict.update({f"{module}.{name}": b for name, b in buffers.items()})


def add_embedding_or_output(module: str, data, qtype, shape: tuple[int, int], tied: bool, state_dict: dict,
                            kinds: dict) -> None:
    """The embedding ("tok_embeddings", also the output projection when `tied`) or the output
    projection ("output") from GGUF blocks `data`: their buffers into `state_dict`, kinds into `kinds`."""
    from ..quantize import native
    from ..quantize.linear import NATIVE_TYPES, quantize_int8_rows

    from ..quantize.linear import file_bytes

    raw = file_bytes(data)  # the file's mapped bytes where it is one (held once)
    if module == "tok_embeddings":
        kinds[module] = f"ggml:{qtype.name}"
        state_dict["tok_embeddings.raw"] = raw
    if module == "output" or tied:
        if qtype in NATIVE_TYPES and native.available():  # RefinedBlockLinear
            kinds["output"] = f"refined_block:{qtype.name}"
            state_dict["output.raw"] = raw  # shared with the embedding when tied
        else:  # RefinedInt8Linear
            kinds["output"] = f"refined:{qtype.name}"
            state_dict.update({f"output.{n}": b for n, b in quantize_int8_rows(dequantize(data, qtype, shape)).items()})
            state_dict["output.exact.raw"] = raw


def finish_parts(parts: dict[str, dict[str, tuple]], state_dict: dict, kinds: dict, gpu: bool = False,
                 dtype=torch.bfloat16) -> None:
    """Pack what is left in `parts`: a part without its siblings (the checks name what is missing)."""
    for fused, found in parts.items():
        _pack_fused(fused, found, state_dict, kinds, gpu, dtype)


def _fused_name(module: str) -> str | None:
    """The fused module `module` is part of ("layers.3.attention.wqkv" for "layers.3.attention.wq",
    see model.FUSED_PROJECTIONS), or None."""
    parent, _, child = module.rpartition(".")
    for fused, members in FUSED_PROJECTIONS.items():
        if child in members:
            return f"{parent}.{fused}"
    return None


def _pack_fused(fused: str, found: dict[str, tuple], state_dict: dict, kinds: dict, gpu: bool = False,
                dtype=torch.bfloat16) -> None:
    """Pack the parts of one fused projection as one layer when they share a kind of layer and all
    are there (`linear.pack_gguf_tensors`), else each alone."""
    from ..quantize.linear import pack_gguf_tensors

    parent, _, name = fused.rpartition(".")
    order = [f"{parent}.{m}" for m in FUSED_PROJECTIONS[name]]
    packed = pack_gguf_tensors([found[m] for m in order], gpu=gpu) if set(found) == set(order) else None
    if packed is not None:
        kinds[fused], buffers = packed
        state_dict.update({f"{fused}.{n}": b for n, b in buffers.items()})
        return
    for module, (data, qtype, shape) in found.items():
        _pack_one(module, data, qtype, shape, state_dict, kinds, gpu, dtype)

