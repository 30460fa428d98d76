"""Key maps from each checkpoint format to Meta's parameter names, and the HF q/k permutation.

`{}` stands for a layer index. A `None` target means the tensor is known and deliberately dropped
(e.g. HF's cached `rotary_emb.inv_freq`). A key matching no entry is an error, not a silent skip.
"""

from __future__ import annotations

import re

import torch

from ..errors import FormatError

FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

FROM_GGUF = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "rope_freqs.weight": None,  # Llama 3.1 RoPE scaling, read into the config instead
}

# Meta's own names map to themselves; listed so an unknown key in a .pth file is still an error.
FROM_META = {v: v for v in FROM_HF.values() if v is not None} | {"rope.freqs": None}


def _compile(table: dict[str, str | None]) -> list[tuple[re.Pattern, str | None]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst)
            for src, dst in table.items()]


_COMPILED: dict[int, list] = {}


def map_key(key: str, table: dict[str, str | None]) -> str | None:
    """Meta name for `key` under `table`; None if the tensor is to be dropped; FormatError if unknown."""
    patterns = _COMPILED.setdefault(id(table), _compile(table))
    for pattern, dst in patterns:
        m = pattern.match(key)
        if not m:
            continue
        if dst is None:
            return None
        return dst.replace("{}", m.group(1)) if m.groups() else dst
    raise FormatError(f"unexpected tensor {key!r} in checkpoint")


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k permutation: HF rotates halves (x[:Dh/2], x[Dh/2:]), Meta interleaved pairs.

    HF's converter maps Meta -> HF with view(n, Dh/2, 2, dim).transpose(1, 2); this is its inverse.
    """
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows to HF's rotate-half layout (used to export and in tests)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
