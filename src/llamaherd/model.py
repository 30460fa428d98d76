"""The Llama 3 transformer, in one file.

Parameter names are Meta's (`tok_embeddings`, `layers.{i}.attention.wq`, `feed_forward.w1`, ...);
every checkpoint format is mapped onto them (see `weights/keymaps.py`). Queries and keys use Meta's
interleaved RoPE layout: pairs (x[2i], x[2i+1]) are rotated together.

Notation used in shape comments:
    B  batch size                 T  new tokens in this call      S  keys attended to (cache length)
    D  model dim (`dim`)          H  query heads                  K  key/value heads (GQA: H % K == 0)
    Dh head dim                   V  vocabulary size

One forward serves training and inference. Training passes `targets` (and `doc_ids` for packed
sequences, so that documents do not attend to each other); inference passes a `KVCache` and the
absolute position of every new token (`input_pos`, per row, so rows of a batch may be at
different positions — that is what continuous batching needs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, as Meta and HF do.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """The Dh/2 rotation frequencies, with Llama 3.1's long-context scaling when given.

    Llama 3.1 (Meta `apply_scaling`): wavelengths shorter than `original / high_freq_factor` are kept,
    longer than `original / low_freq_factor` are divided by `factor`, and those in between are
    interpolated smoothly.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling is None:
        return freqs
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    return torch.where(wavelen < high_wavelen, freqs,
                       torch.where(wavelen > low_wavelen, freqs / scaling.factor, interpolated))


def precompute_rope(args: ModelArgs, max_seq_len: int) -> torch.Tensor:
    """e^(i * position * frequency) for every position: complex64 (max_seq_len, Dh/2)."""
    freqs = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, n, Dh), read as complex numbers, by rope (B, T, Dh/2)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, n, Dh/2)
    return torch.view_as_real(xc * rope.unsqueeze(2)).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of past tokens for `max_batch` independent sequences (rows)."""

    def __init__(self, max_batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device=None):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, rows: torch.Tensor | None, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, Dh) at input_pos (B, T) of cache rows `rows` (B,) — default 0..B-1 —
        and return the first `n_keys` cached keys and values of those rows: (B, K, S, Dh)."""
        B, T = input_pos.shape
        if rows is None and B == 1:  # one sequence, consecutive positions: a slice, no scatter
            start = int(input_pos[0, 0])
            self.k[:1, :, start:start + T] = k
            self.v[:1, :, start:start + T] = v
        else:
            r = (torch.arange(B, device=k.device) if rows is None else rows)[:, None]  # (B, 1)
            self.k[r, :, input_pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed view: (B, T, K, Dh)
            self.v[r, :, input_pos] = v.transpose(1, 2).to(self.v.dtype)
        if rows is None:  # a slice, not a copy
            return self.k[:B, :, :n_keys], self.v[:B, :, :n_keys]
        return self.k[rows, :, :n_keys], self.v[rows, :, :n_keys]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # wq, wk and wv as one matrix: set by `quantize.linear.fuse_projections` for inference.
        self.wqkv: nn.Module | None = None
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                input_pos: torch.Tensor, rows: torch.Tensor | None, n_keys: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:
            qk, v = self.wqkv(x).split([(H + K) * Dh, K * Dh], dim=-1)
            q, k = apply_rope(qk.view(B, T, H + K, Dh), rope).split([H, K], dim=2)
        else:
            q = apply_rope(self.wq(x).view(B, T, H, Dh), rope)
            k = apply_rope(self.wk(x).view(B, T, K, Dh), rope)
            v = self.wv(x)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, K, Dh).transpose(1, 2)  # (B, H|K, T, Dh)
        if self.cache is not None:
            k, v = self.cache.update(rows, input_pos, k, v, n_keys)  # (B, K, S, Dh)
        if mask is None:  # plain causal attention over exactly these T tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w13: nn.Module | None = None  # w1 and w3 as one matrix (see Attention.wqkv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, mask, input_pos, rows, n_keys):
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos, rows, n_keys)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Weights are left uninitialised (checkpoints overwrite them; `init_weights` is for training
        # from scratch). Passing `_weight` also spares the meta-device `normal_`, which imports dynamo.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # RoPE table: not a parameter, not saved; built (and grown) on first use by `_ensure_rope`.
        # Not here: under the meta device its complex ops would import torch's decompositions (~2 s).
        self.register_buffer("rope", torch.empty(0, dtype=torch.complex64), persistent=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation for pre-training: normal(0, std) matrices, unit norms."""
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                # Residual projections are scaled down with depth (GPT-2 / nanoGPT).
                scale = (2 * self.args.n_layers) ** -0.5 if name.endswith(("wo.weight", "w2.weight")) else 1.0
                p.normal_(0.0, std * scale)

    # -- KV cache ---------------------------------------------------------------------------

    def setup_cache(self, max_batch: int, max_seq_len: int, dtype=None, device=None) -> None:
        """Give every attention layer a KV cache of `max_batch` rows × `max_seq_len` positions."""
        dtype = dtype or self.norm.weight.dtype  # embeddings may be quantized; norms are always float
        device = device or self.device
        for layer in self.layers:
            layer.attention.cache = KVCache(max_batch, max_seq_len, self.args.n_kv_heads,
                                            self.args.head_dim, dtype, device)
        self._ensure_rope(max_seq_len)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # norms are always plain float parameters

    @property
    def cache_len(self) -> int:
        cache = self.layers[0].attention.cache
        return 0 if cache is None else cache.k.shape[2]

    def _ensure_rope(self, n: int) -> None:
        if self.rope.shape[0] < n or self.rope.device.type == "meta":
            self.rope = precompute_rope(self.args, max(n, self.args.max_seq_len)).to(self.device)

    # -- forward ----------------------------------------------------------------------------

    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                      rows: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, D).

        Args:
            tokens: (B, T) token ids.
            input_pos: (B, T) absolute positions; default 0..T-1 in every row. Required with a cache.
            rows: (B,) KV-cache rows the batch rows use; default 0..B-1 (then the cache is sliced, not gathered).
            doc_ids: (B, T) document id of every token of packed training sequences; tokens attend
                only to earlier tokens of the same document. Not used with a cache.
        """
        B, T = tokens.shape
        cached = self.layers[0].attention.cache is not None
        if input_pos is None:
            if cached:
                raise ValueError("input_pos is required when a KV cache is set up")
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        self._ensure_rope(int(input_pos.max()) + 1)
        rope = self.rope[input_pos]  # (B, T, Dh/2) complex

        mask, n_keys = None, T
        if cached:
            # Attend over cache positions 0..n_keys-1; each query sees keys at positions <= its own.
            n_keys = int(input_pos.max()) + 1
            if not (B == 1 and T == 1):  # one new token of one sequence sees every cached key
                key_pos = torch.arange(n_keys, device=tokens.device)
                mask = (key_pos[None, None, None, :] <= input_pos[:, None, :, None])  # (B, 1, T, S)
        elif doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (causal & same_doc)[:, None]  # (B, 1, T, T)

        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, rope, mask, input_pos, rows, n_keys)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                rows: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) — or (B, 1, V) with `last_only` — or, given `targets` (B, T), the mean
        cross-entropy loss over targets that are not -100."""
        h = self.hidden_states(tokens, input_pos, rows, doc_ids)
        if last_only:
            h = h[:, -1:]
        logits = self.output(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
