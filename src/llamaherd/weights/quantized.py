"""Quantize at load: a float checkpoint's weights into GGUF blocks for the native CPU kernels.

    load_checkpoint(dir, quantize="q4_k")  ->  the state dict and kinds `load_gguf(quantized=True)` gives

What `load_in_4bit` does for a Hugging Face model, the llama.cpp way: each projection of the
transformer blocks, the embedding and the output projection become the blocks a GGUF file of that
scheme would hold (`quantize.blocks`: q8_0, q4_0, q4_k = the Q4_K_M mix), packed exactly as a
loaded GGUF's are, so the same kernels run them. Each float weight is dropped as soon as its
blocks are made: the float model and its quantized copy never both stay whole.
"""

from __future__ import annotations

import torch

from ..config import ModelArgs
from ..errors import FormatError


def quantize_state_dict(args: ModelArgs, state_dict: dict[str, torch.Tensor], scheme: str
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, kinds) of `state_dict` (float, Meta names) quantized with `scheme`.

    `state_dict` is emptied as its weights are quantized. Norms (and anything else 1-D) stay float.
    """
    from ..quantize.blocks import check_scheme, quantize, scheme_type
    from .gguf import QUANTIZABLE, add_block_weight, add_embedding_or_output, finish_parts

    scheme = check_scheme(scheme)
    out, kinds, parts = {}, {}, {}
    for name in list(state_dict):
        tensor = state_dict.pop(name)
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or tensor.ndim != 2 or tensor.shape[1] % 32:
            out[name] = tensor
            continue
        if module in QUANTIZABLE:
            qtype = scheme_type(scheme, module, tensor.shape[1], args.n_layers)
            add_block_weight(module, quantize(tensor, qtype).numpy(), qtype, tuple(tensor.shape), out, kinds, parts)
        elif module == "tok_embeddings" or (module == "output" and not args.tie_embeddings):
            role = "output" if module == "output" or args.tie_embeddings else module  # tied: the output's type
            qtype = scheme_type(scheme, role, tensor.shape[1], args.n_layers)
            add_embedding_or_output(module, quantize(tensor, qtype).numpy(), qtype, tuple(tensor.shape),
                                    args.tie_embeddings, out, kinds)
        elif module == "output":  # tied: the embedding's blocks serve it
            continue
        else:
            raise FormatError(f"unexpected tensor {name!r} in checkpoint")
    finish_parts(parts, out, kinds)
    return out, kinds


FLOAT_BLOCK_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16"}  # weights the native kernels read as stored


def float_blocks_state_dict(args: ModelArgs, state_dict: dict[str, torch.Tensor]
                            ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, kinds) of a 16-bit float checkpoint (Meta names, as stored) for the native CPU
    kernels, as llama.cpp runs an F16 GGUF: every projection of the blocks, the embedding and the
    output projection keep their f16 / bf16 weights — wq, wk, wv stacked as wqkv and w1, w3 as w13
    (the one copy made), the bytes viewed as "blocks" of type F16 / BF16 (`linear.BlockLinear`, which
    widens each weight to float32 as it multiplies); norms become float32. Nothing is rounded: the
    model computes in float32 with the file's exact weights, reading half the bytes a token a float32
    copy would. `state_dict` is emptied as it goes."""
    from ..model import FUSED_PROJECTIONS
    from .gguf import QUANTIZABLE, _fused_name

    def raw(tensor):
        return tensor.contiguous().view(torch.uint8)

    out, kinds, parts = {}, {}, {}
    for name in list(state_dict):
        tensor = state_dict.pop(name)
        module, _, leaf = name.rpartition(".")
        qtype = FLOAT_BLOCK_DTYPES.get(tensor.dtype)
        if tensor.ndim != 2 or leaf != "weight" or qtype is None or tensor.shape[1] % 32:
            out[name] = tensor.float() if tensor.is_floating_point() else tensor
        elif module in QUANTIZABLE and _fused_name(module):  # packed when its siblings are read
            fused = _fused_name(module)
            parts.setdefault(fused, {})[module.rpartition(".")[2]] = tensor
            members = FUSED_PROJECTIONS[fused.rpartition(".")[2]]
            if len(parts[fused]) == len(members) and len({t.dtype for t in parts[fused].values()}) == 1:
                stacked = torch.cat([parts[fused].pop(m) for m in members])
                kinds[fused], out[f"{fused}.raw"] = f"block:{qtype}", raw(stacked)
        elif module in QUANTIZABLE or module in ("tok_embeddings", "output"):
            kinds[module] = f"{'ggml' if module == 'tok_embeddings' else 'block'}:{qtype}"
            out[f"{module}.raw"] = raw(tensor)
        else:
            out[name] = tensor.float()
    for fused, found in parts.items():  # parts of differing dtypes, or missing siblings: float32, unfused
        out.update({f"{fused.rpartition('.')[0]}.{m}.weight": t.float() for m, t in found.items()})
    if args.tie_embeddings and "tok_embeddings" in kinds and "output" not in kinds:  # one set of bytes for both
        kinds["output"], out["output.raw"] = "block:" + kinds["tok_embeddings"].partition(":")[2], out["tok_embeddings.raw"]
    return out, kinds


def quantized_gguf(source, out, scheme: str, name: str | None = None):
    """Write the checkpoint at `source` (any format) as a GGUF file of quantization `scheme` (q8_0,
    q4_0, q4_k) at `out`: its weights read as float32 and quantized (`quantize.blocks`), its
    tokenizer and chat template carried over. What `herd create -q` stores. Returns the path."""
    from ..export.gguf import save_gguf
    from ..quantize.blocks import check_scheme
    from . import load_checkpoint

    scheme = check_scheme(scheme)
    ckpt = load_checkpoint(source)
    return save_gguf(ckpt.state_dict, ckpt.args, ckpt.tokenizer, out, quant=scheme,
                     name=name or str(ckpt.metadata.get("general.name") or "llamaherd model"),
                     base_metadata=ckpt.metadata if ckpt.format == "gguf" else None)
