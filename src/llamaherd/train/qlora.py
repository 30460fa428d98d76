"""QLoRA on the CPU: LoRA adapters trained over a GGUF's quantized blocks, which stay quantized.

The frozen base layer is one of `quantize/linear.py`'s modules (`BlockLinear` keeps the file's own
Q4_0 / Q4_1 / Q8_0 blocks). Its forward runs our native kernel in float32 (`block_mm_dense`: the
weights expanded exactly, the activations not rounded), and its backward multiplies the incoming
gradient by the same weights, dequantized block by block for that one product and dropped again,
so no float copy of the base model is ever held. Only the input gradient is formed: the base is
frozen.
"""

from __future__ import annotations

import torch
from torch import nn


def quantized_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T through the quantized module, in float32 where our kernel allows it. A slice of a
    fused projection (`model.FusedSlice`: wq of wqkv) runs the fused matmul and keeps its part."""
    from ..model import FusedSlice
    from ..quantize import native
    from ..quantize.linear import BlockLinear

    if isinstance(module, FusedSlice):
        return quantized_forward(module.fused, x)[..., module.start:module.stop]
    # (blocks repacked for inference, as `llamaherd.load` leaves them, have no float32 path: their
    # many rows take the int16 panel through module(x))
    if type(module) is BlockLinear and module.out_features % 16 == 0 and native.available() \
            and not native.has_panel(module.kernel_type):
        y = native.block_mm_dense(x.reshape(-1, module.in_features), module.raw, module.kernel_type, module.out_features)
        return y.view(*x.shape[:-1], module.out_features).to(x.dtype)
    return module(x)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight (out, in) of a quantized module."""
    from ..model import FusedSlice
    from ..quantize.linear import GGMLEmbedding, dequantized_weight

    if isinstance(module, FusedSlice):  # its rows of the fused projection's weight
        return dequantize_weight(module.fused)[module.start:module.stop]
    if isinstance(module, GGMLEmbedding):  # BlockLinear: its rows of blocks, dequantized exactly
        return module.rows(torch.arange(module.n_rows))
    return dequantized_weight(module)


class _FrozenQuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return quantized_forward(module, x)

    @staticmethod
    def backward(ctx, grad):
        w = dequantize_weight(ctx.module)  # (out, in), only for this product
        return (grad.float() @ w).to(grad.dtype), None


def frozen_quantized_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T with W frozen in its quantized blocks; differentiable in x."""
    return _FrozenQuantizedLinear.apply(x, module)
