"""Llama 3 shapes to pre-train from random initialisation, from a test-sized `tiny` to Meta's 8B.

Every preset is Llama 3's architecture (RMSNorm, RoPE with theta 500,000, grouped-query attention,
SwiGLU); the small ones tie the output to the embedding, as Llama 3.2 1B/3B do. The vocabulary is
not part of a preset: it is the tokenizer's (`preset_args(name, vocab_size)`). Sizes in the names
count the transformer blocks ("non-embedding" parameters, as scaling laws count N); the embedding
adds vocab_size x dim.

    name         dim  layers heads kv  ffn    non-embedding parameters
    tiny          64     2     4    2   192   0.10 M   (tests: a few million with a 32-128k vocabulary)
    mini          96     3     6    2   256   0.30 M
    small        128     4     8    2   384   0.75 M
    20m          384    12     6    2  1024   18.9 M
    100m         768    16    12    4  2048   100.7 M
    llama3.2-1b / llama3.2-3b / llama3.1-8b   Meta's shapes (config.PRESETS), rope scaling included

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import PRESETS as MODEL_PRESETS
from ..config import ModelArgs
from ..errors import HerdError


def _small(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden_dim: int) -> ModelArgs:
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim,
                     rope_theta=500000.0, max_seq_len=2048, tie_embeddings=True)


PRESETS: dict[str, ModelArgs] = {
    "tiny": _small(64, 2, 4, 2, 192),
    "mini": _small(96, 3, 6, 2, 256),
    "small": _small(128, 4, 8, 2, 384),
    "20m": _small(384, 12, 6, 2, 1024),
    "100m": _small(768, 16, 12, 4, 2048),
    **{name: MODEL_PRESETS[name] for name in ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b")},
}

# The presets a CPU can pre-train in minutes: `herd train scaling`'s default grid.
SCALING_PRESETS = ("tiny", "mini", "small")


def preset_args(name: str, vocab_size: int) -> ModelArgs:
    """The shape of preset `name` with the tokenizer's vocabulary size.

    Raises:
        HerdError: an unknown preset (the message lists the known ones).
    """
    if name not in PRESETS:
        raise HerdError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], vocab_size=vocab_size)


def non_embedding_params(args: ModelArgs) -> int:
    """Parameters of the transformer blocks and the final norm (what scaling laws call N)."""
    return args.n_params - args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4), the output
    projection included, plus causal attention's scores and values (PaLM's MFU appendix, halved for
    the causal mask)."""
    matmul_weights = non_embedding_params(args) + args.vocab_size * args.dim
    attention = 6 * args.n_layers * args.n_heads * args.head_dim * seq_len  # 12 * L * H * Dh * T / 2
    return 6 * matmul_weights + attention
