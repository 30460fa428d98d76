"""The Llama 3 transformer, in one file.

Parameter names are Meta's (`tok_embeddings`, `layers.{i}.attention.wq`, `feed_forward.w1`, ...);
every checkpoint format is mapped onto them (see `weights/keymaps.py`). Queries and keys use Meta's
interleaved RoPE layout: pairs (x[2i], x[2i+1]) are rotated together.

Notation used in shape comments:
    B  batch size                 T  new tokens in this call      S  keys attended to (cache length)
    D  model dim (`dim`)          H  query heads                  K  key/value heads (GQA: H % K == 0)
    Dh head dim                   V  vocabulary size

Two forwards share the modules:

- training (no KV cache): `model(tokens, targets=..., doc_ids=...)` gives the mean loss. Packed
  sequences pass `doc_ids` so that documents do not attend to each other (and `input_pos` so that
  each document's positions start at 0);
- inference (after `setup_cache`): `model(tokens, input_pos, rows=..., n_keys=...)` writes the new
  tokens' keys and values at their absolute positions (`input_pos`, per row, so rows of a batch may
  be at different positions — continuous batching) and gives logits.

Both are `torch.compile(fullgraph=True)`-able: the RoPE table is built once, outside `forward`, and
no Python number is read out of a tensor inside it (the caller, who knows its positions as Python
ints, passes `n_keys`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs, RopeScaling

# Query tokens per attention call when documents are packed: the block-causal mask is built for
# DOC_CHUNK queries at a time, (B, 1, DOC_CHUNK, T) booleans, never (B, 1, T, T).
DOC_CHUNK = 1024

# Projections that inference computes as one matmul (`Attention.fuse`, `FeedForward.fuse`): the
# fused module's name and the modules it stacks, in order.
FUSED_PROJECTIONS = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, as Meta and HF do.
        if x.dtype == self.weight.dtype == torch.float32:  # one call, the weight applied inside
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
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
    """(cos, sin) of position * frequency for every position: float32 (max_seq_len, Dh/2, 2).

    Real, not complex: the same numbers as `torch.polar`, in the layout kernels/decode.c reads. Computed
    on the CPU and moved to the default device: on the meta device (weights/expected_shapes builds a
    model there for its shapes) cos, sin and division would import torch._dynamo, seconds per load.
    """
    with torch.device("cpu"):
        freqs = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
        table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return table.to(torch.get_default_device())


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, n, Dh) by rope (B, T, Dh/2, 2): the
    complex product (a + ib)(cos + i sin), in float32."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, n, Dh/2) each
    cos, sin = rope.unsqueeze(2).unbind(-1)  # (B, T, 1, Dh/2) each
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


def apply_rope_complex(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """`apply_rope` as one complex multiply (Meta's own form; the same numbers): one pass over x
    forward and one backward instead of a dozen elementwise ops. Used by the forwards without a
    cache (training); compiled code keeps the real form, which inductor fuses (it has no complex
    kernels)."""
    if torch.compiler.is_compiling():
        return apply_rope(x, rope)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, n, Dh/2)
    return torch.view_as_real(xc * torch.view_as_complex(rope).unsqueeze(2)).flatten(-2).type_as(x)


class CacheAt(NamedTuple):
    """Where a cached forward writes its new keys and values, and what it attends to."""
    input_pos: torch.Tensor  # (B, T) absolute positions of the new tokens
    rows: torch.Tensor | None  # (B,) KV-cache rows; None: rows 0..B-1 (sliced, not gathered)
    n_keys: int  # S: attend to cache positions 0..S-1
    mask: torch.Tensor | None  # (B, 1, T, S) which of those each query sees; None: all of them


class KVCache(nn.Module):
    """Keys and values of past tokens for `max_batch` independent sequences (rows)."""

    def __init__(self, max_batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device=None):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, at: CacheAt, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, Dh) at `at.input_pos` of rows `at.rows`; return the first `at.n_keys`
        cached keys and values of those rows: (B, K, S, Dh)."""
        B = k.shape[0]
        r = (torch.arange(B, device=k.device) if at.rows is None else at.rows)[:, None]  # (B, 1)
        self.k[r, :, at.input_pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed view: (B, T, K, Dh)
        self.v[r, :, at.input_pos] = v.transpose(1, 2).to(self.v.dtype)
        if at.rows is None:  # a slice, not a copy (unless the cache holds another dtype: f16)
            return self.k[:B, :, :at.n_keys].to(k.dtype), self.v[:B, :, :at.n_keys].to(v.dtype)
        return self.k[at.rows, :, :at.n_keys].to(k.dtype), self.v[at.rows, :, :at.n_keys].to(v.dtype)


def heads_for_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeat: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v for a masked SDPA over grouped-query heads. On CUDA (`repeat`) one key/value head
    per query head: the kernel that takes a mask (memory-efficient attention) has no grouped-query
    mode and flash attention takes no mask, so with `enable_gqa` SDPA would fall back to the unfused
    math, materialising every score. Elsewhere unchanged (`enable_gqa` reads each KV head in place)."""
    repeat = q.device.type == "cuda" if repeat is None else repeat
    if repeat and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return k, v


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention within documents: q (B, H, T, Dh), k and v (B, K, T, Dh), doc_ids (B, T).

    doc_ids may also be (B, T, 2): each token's document and branch. A document is then a shared
    prefix (branch 0) followed by branches 1, 2, ... that each see the prefix and themselves, not
    each other: a preference pair as one prompt, its chosen reply, then its rejected reply.

    The block-causal mask is made for DOC_CHUNK queries at a time, each over the keys up to its last
    query, so memory grows as T * DOC_CHUNK, not T * T. (flex_attention would skip the empty blocks,
    but on CPU it has no backward.)
    """
    T = q.shape[2]
    doc, branch = doc_ids.unbind(-1) if doc_ids.dim() == 3 else (doc_ids, None)
    k, v = heads_for_mask(q, k, v)
    out = []
    for start in range(0, T, DOC_CHUNK):
        stop = min(T, start + DOC_CHUNK)
        q_pos = torch.arange(start, stop, device=q.device)
        causal = q_pos[:, None] >= torch.arange(stop, device=q.device)  # (c, stop)
        seen = doc[:, start:stop, None] == doc[:, None, :stop]  # (B, c, stop)
        if branch is not None:  # the key is in the shared prefix or in the query's own branch
            seen &= (branch[:, None, :stop] == 0) | (branch[:, start:stop, None] == branch[:, None, :stop])
        out.append(F.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop],
                                                  attn_mask=(causal & seen)[:, None], enable_gqa=True))
    return torch.cat(out, dim=2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.wqkv: nn.Module | None = None  # wq, wk, wv as one matrix: see `fuse`
        self.cache: KVCache | None = None

    def fuse(self, wqkv: nn.Module) -> None:
        """Compute q, k and v with one matmul: `wqkv` is wq, wk and wv stacked (outputs side by side).
        wq, wk and wv stay, as slices of it, so that each can still be called, read or wrapped."""
        self.wqkv = wqkv
        self.wq, self.wk, self.wv = FusedSlice.split(wqkv, [self.wq, self.wk, self.wv])

    def forward(self, x: torch.Tensor, rope: torch.Tensor, doc_ids: torch.Tensor | None = None,
                at: CacheAt | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        rotate = apply_rope if at is not None else apply_rope_complex
        if FusedSlice.intact(self.wqkv, self.wq, self.wk, self.wv):
            qk, v = self.wqkv(x).split([(H + K) * Dh, K * Dh], dim=-1)
            q, k = rotate(qk.view(B, T, H + K, Dh), rope).split([H, K], dim=2)
        else:
            q = rotate(self.wq(x).view(B, T, H, Dh), rope)
            k = rotate(self.wk(x).view(B, T, K, Dh), rope)
            v = self.wv(x)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, K, Dh).transpose(1, 2)  # (B, H|K, T, Dh)
        if at is not None:
            k, v = heads_for_mask(q, *self.cache.update(at, k, v))  # (B, K|H, S, Dh)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=at.mask, enable_gqa=True)
        elif doc_ids is not None:
            y = document_attention(q, k, v, doc_ids)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w13: nn.Module | None = None  # w1 and w3 as one matrix: see `fuse`

    def fuse(self, w13: nn.Module) -> None:
        """Compute gate and up with one matmul (as `Attention.fuse`)."""
        self.w13 = w13
        self.w1, self.w3 = FusedSlice.split(w13, [self.w1, self.w3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FusedSlice.intact(self.w13, self.w1, self.w3):
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)  # SwiGLU


class FusedSlice(nn.Module):
    """Output features start..stop of a fused projection: what wq / wk / wv (and w1 / w3) become
    when the model is fused for inference. It owns no weights (the fused module does), so the state
    dict holds each weight once; called alone (e.g. wrapped by LoRA) it runs the fused matmul and
    keeps its part."""

    def __init__(self, fused: nn.Module, start: int, stop: int, in_features: int):
        super().__init__()
        self.__dict__["fused"] = fused  # a plain reference, not a submodule: no second copy in state_dict
        self.start, self.stop = start, stop
        self.in_features, self.out_features = in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.stop]

    @staticmethod
    def split(fused: nn.Module, parts: list[nn.Module]) -> list[FusedSlice]:
        slices, start = [], 0
        for part in parts:
            slices.append(FusedSlice(fused, start, start + part.out_features, part.in_features))
            start += part.out_features
        return slices

    @staticmethod
    def intact(fused: nn.Module | None, *parts: nn.Module) -> bool:
        """Whether `fused` may stand for `parts`: none of them has been replaced (e.g. wrapped)."""
        return fused is not None and all(type(p) is FusedSlice and p.fused is fused for p in parts)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, doc_ids: torch.Tensor | None = None,
                at: CacheAt | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, doc_ids, at)
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
        # The RoPE table: a buffer, not saved. Built here once; a model built on the meta device
        # (loading, FSDP) gets its real values from `init_rope`.
        self.register_buffer("rope", precompute_rope(args, args.max_seq_len), persistent=False)

    @torch.no_grad()
    def init_rope(self, max_seq_len: int | None = None) -> None:
        """(Re)build the RoPE table on the model's device for max_seq_len positions (default: the
        model's context length)."""
        n = max(max_seq_len or 0, self.args.max_seq_len)
        with torch.device(self.device):
            self.rope = precompute_rope(self.args, n)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation for pre-training: normal(0, std) matrices, unit norms (and the RoPE
        table, for a model built on the meta device and then materialised with `to_empty`)."""
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                # Residual projections are scaled down with depth (GPT-2 / nanoGPT).
                scale = (2 * self.args.n_layers) ** -0.5 if name.endswith(("wo.weight", "w2.weight")) else 1.0
                p.normal_(0.0, std * scale)
        self.init_rope()

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Stack each block's float wq, wk, wv (and w1, w3) into one matmul (`Attention.fuse`,
        `FeedForward.fuse`): fewer, wider matmuls a step, which a GPU's decode wants. Projections
        already fused, quantized or wrapped stay as they are; each weight is still held once."""
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            for owner, parts in ((attn, [attn.wq, attn.wk, attn.wv]), (ffn, [ffn.w1, ffn.w3])):
                if all(type(p) is nn.Linear and p.bias is None for p in parts):
                    w = torch.cat([p.weight for p in parts])
                    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                    fused.weight = nn.Parameter(w, requires_grad=parts[0].weight.requires_grad)
                    owner.fuse(fused)

    # -- KV cache ---------------------------------------------------------------------------

    def setup_cache(self, max_batch: int, max_seq_len: int, dtype=None, device=None) -> None:
        """Give every attention layer a KV cache of `max_batch` rows × `max_seq_len` positions."""
        dtype = dtype or self.norm.weight.dtype  # embeddings may be quantized; norms are always float
        device = device or self.device
        for layer in self.layers:
            layer.attention.cache = KVCache(max_batch, max_seq_len, self.args.n_kv_heads,
                                            self.args.head_dim, dtype, device)
        if self.rope.shape[0] < max_seq_len:
            self.init_rope(max_seq_len)

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

    # -- forward ----------------------------------------------------------------------------

    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                      rows: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                      n_keys: int | None = None, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, D).

        Args:
            tokens: (B, T) token ids.
            input_pos: (B, T) absolute positions; default 0..T-1 in every row. Required with a cache.
            rows: (B,) KV-cache rows the batch rows use; default 0..B-1 (then the cache is sliced, not gathered).
            doc_ids: (B, T) document id of every token of packed training sequences; tokens attend
                only to earlier tokens of the same document. Or (B, T, 2): document and branch
                (see `document_attention`). Not used with a cache.
            n_keys: with a cache, attend to cache positions 0..n_keys-1 (more than the largest
                position; for a single token, exactly its position + 1); default: the whole cache.
            embeddings: (B, T, D) the tokens' embeddings, when the caller looked them up (training's
                tied lookup, `train.loss.tied_lookup`); default: `tok_embeddings(tokens)`.
        """
        B, T = tokens.shape
        at = None
        if self.layers[0].attention.cache is not None:
            if input_pos is None:
                raise ValueError("input_pos is required when a KV cache is set up")
            S = self.cache_len if n_keys is None else n_keys
            mask = None  # one new token of one sequence sees every key up to its own: no mask
            if not (B == 1 and T == 1 and n_keys is not None):
                key_pos = torch.arange(S, device=tokens.device)
                mask = key_pos[None, None, None, :] <= input_pos[:, None, :, None]  # (B, 1, T, S)
            at = CacheAt(input_pos, rows, S, mask)
        elif input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        rope = self.rope[input_pos]  # (B, T, Dh/2, 2)
        h = self.tok_embeddings(tokens) if embeddings is None else embeddings
        for layer in self.layers:
            h = layer(h, rope, doc_ids if at is None else None, at)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                rows: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, n_keys: int | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) — or (B, 1, V) with `last_only` — or, given `targets` (B, T), the mean
        cross-entropy loss over the targets that are not -100. Arguments as `hidden_states`."""
        h = self.hidden_states(tokens, input_pos, rows, doc_ids, n_keys)
        if last_only:
            h = h[:, -1:]
        logits = self.output(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
