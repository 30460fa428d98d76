"""One batched decode step whose every row is computed exactly as if it ran alone.

The torch runner's step (`runner.TorchRunner`: float weights, torch's int4/int8 kernels, CUDA); the
native runner's (kernels/decode.c) is row-exact by construction. The torch modules are arranged as
follows.

`Transformer.forward` can decode rows at different positions together, but not bit-for-bit as
each alone: its attention runs over the batch's longest row with a mask, and on CPU the result of
`scaled_dot_product_attention` for a row changes (in the last bits) with the number of masked keys
and with the batch size. In a bf16 model those bits grow through 30 layers into logit changes of
0.1 or more — enough to flip a greedy choice. So the decode step here runs the model's own modules
in the model's order, with the linear layers batched (the expensive part, and row-exact given the
padding below) and the attention done row by row over exactly that row's keys, unmasked. A row's
numbers then depend only on its own tokens.

Padding: float32 GEMMs on CPU (MKL) compute the last `M % 4` rows of a small batch, and a batch of
one, with other kernels (other summation orders) than the rest; the quantized CPU kernels (torch's
int4/int8 and the native block kernel) are row-exact. Batches of a float model are padded with
dummy rows to a multiple of `CPU_BATCH_MULTIPLE` on CPU so that every real row takes the main
kernels; a quantized model's are not (the dummy rows would cost as much as real ones).

Equal to `Transformer.forward` within float tolerance (tests/test_engine.py checks both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import FusedSlice, apply_rope

CPU_BATCH_MULTIPLE = 4


def padded_size(n: int, model) -> int:
    float_cpu = model.norm.weight.device.type == "cpu" and isinstance(model.layers[0].attention.wo, torch.nn.Linear)
    multiple = CPU_BATCH_MULTIPLE if float_cpu else 1
    return -(-n // multiple) * multiple


def _projections(attn, h: torch.Tensor, rope: torch.Tensor):
    """q, k (rotated) and v of `Attention.forward`, for h (P, 1, D): each (P, 1, H|K, Dh)."""
    P = h.shape[0]
    H, K, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    if FusedSlice.intact(attn.wqkv, attn.wq, attn.wk, attn.wv):  # fused at load (`Attention.fuse`)
        qk, v = attn.wqkv(h).split([(H + K) * Dh, K * Dh], dim=-1)
        q, k = apply_rope(qk.view(P, 1, H + K, Dh), rope).split([H, K], dim=2)
    else:
        q = apply_rope(attn.wq(h).view(P, 1, H, Dh), rope)
        k = apply_rope(attn.wk(h).view(P, 1, K, Dh), rope)
        v = attn.wv(h)
    return q, k, v.view(P, 1, K, Dh)


@torch.inference_mode()
def decode_step(model, tokens: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
    """Feed one token per sequence; return the next-token logits (B, V).

    Args:
        model: a `Transformer` with a KV cache (`setup_cache`) holding each row's earlier keys.
        tokens: (B) the token each sequence feeds now.
        positions: (B) its position (the number of tokens before it in that sequence).
        rows: (B) each sequence's KV-cache row; the new keys and values are written there.
    """
    device = model.norm.weight.device
    n = len(tokens)
    size = padded_size(n, model)
    pad = size - n
    token_t = torch.tensor(tokens + [0] * pad, device=device)
    pos_t = torch.tensor(positions + [0] * pad, device=device)
    rows_t = torch.tensor(rows, device=device)
    rope = model.rope[pos_t][:, None]  # (P, 1, Dh/2, 2)
    x = model.tok_embeddings(token_t)[:, None]  # (P, 1, D)
    for layer in model.layers:
        attn = layer.attention
        q, k, v = _projections(attn, layer.attention_norm(x), rope)  # (P, 1, H|K, Dh)
        cache = attn.cache
        cache.k[rows_t, :, pos_t[:n]] = k[:n, 0].to(cache.k.dtype)  # (B, K, Dh) into each row
        cache.v[rows_t, :, pos_t[:n]] = v[:n, 0].to(cache.v.dtype)
        q = q.transpose(1, 2)  # (P, H, 1, Dh)
        y = torch.zeros(size, attn.n_heads, 1, attn.head_dim, dtype=q.dtype, device=device)
        for i, (row, p) in enumerate(zip(rows, positions)):
            keys = cache.k[row:row + 1, :, :p + 1]  # (1, K, S, Dh): this row's keys only
            values = cache.v[row:row + 1, :, :p + 1]
            y[i:i + 1] = F.scaled_dot_product_attention(q[i:i + 1], keys.to(q.dtype), values.to(q.dtype),
                                                        enable_gqa=True)
        x = x + attn.wo(y.transpose(1, 2).reshape(size, 1, -1))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return model.output(model.norm(x))[:n, 0]
