"""A decode step of static shapes over every row of the KV cache: what `torch.compile` turns into
one graph, replayed on CUDA as a CUDA graph (mode "reduce-overhead"): gpt-fast's decode, batched.

The server's batch lives in B slots, the KV cache's rows. Each step feeds one token to every row:
a row with nothing to decode gets a dummy token whose keys and values are not written (`active`
False: the cache keeps what it held). Attention runs over the whole cache with a mask of the
positions each row has reached. So no shape depends on which rows decode or where they are: the
step is captured once per cache size (it grows by doubling, `Scheduler._ensure_capacity`) and no
Python runs between its kernels.

The price is attention over the whole capacity rather than each row's own keys, and work for
the idle rows: on a GPU, where a step is bound by reading the weights once for all rows, both are
small next to the launches they save. The eager row-exact step (`decode.decode_step`) stays the
default; this one runs when the runner compiles (`TorchRunner(compile=True)`, HERD_COMPILE=1).
Equal to the eager step within float tolerance (tests/test_compiled.py), not to the bit: other
kernels, other summation orders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decode import _projections


class StaticStep(nn.Module):
    """`step(tokens, positions, active)` -> logits (B, V) in the model's dtype, B = the cache's rows.

    Args (each (B,), row i of the cache is batch row i):
        tokens: the token each row feeds (anything for an idle row).
        positions: its position (the number of tokens before it in that row's sequence).
        active: whether the row decodes; an idle row's cache is left as it was.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        model = self.model
        B = tokens.shape[0]
        S = model.layers[0].attention.cache.k.shape[2]
        rows = torch.arange(B, device=tokens.device)
        rope = model.rope[positions][:, None]  # (B, 1, Dh/2, 2)
        sees = torch.arange(S, device=tokens.device)[None, :] <= positions[:, None]  # (B, S)
        mask = sees[:, None, None, :]  # (B, 1, 1, S): each row's keys up to its own position
        keep = active[:, None, None]  # (B, 1, 1)
        x = model.tok_embeddings(tokens)[:, None]  # (B, 1, D)
        for layer in model.layers:
            attn = layer.attention
            q, k, v = _projections(attn, layer.attention_norm(x), rope)  # (B, 1, H|K, Dh)
            cache = attn.cache
            # An idle row writes back what its slot held: a static write that changes nothing.
            cache.k[rows, :, positions] = torch.where(keep, k[:, 0].to(cache.k.dtype), cache.k[rows, :, positions])
            cache.v[rows, :, positions] = torch.where(keep, v[:, 0].to(cache.v.dtype), cache.v[rows, :, positions])
            y = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k.to(q.dtype), cache.v.to(q.dtype),
                                               attn_mask=mask, enable_gqa=True)  # (B, H, 1, Dh)
            x = x + attn.wo(y.transpose(1, 2).reshape(B, 1, -1))
            x = x + layer.feed_forward(layer.ffn_norm(x))
        return model.output(model.norm(x))[:, 0]


def step_inputs(n_rows: int, tokens: list[int], positions: list[int], rows: list[int], device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (tokens, positions, active) tensors of a `StaticStep` in which `rows` (distinct) decode."""
    tok, pos, act = [0] * n_rows, [0] * n_rows, [False] * n_rows
    for t, p, r in zip(tokens, positions, rows):
        tok[r], pos[r], act[r] = t, p, True
    return (torch.tensor(tok, device=device), torch.tensor(pos, device=device),
            torch.tensor(act, device=device))
