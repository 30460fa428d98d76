"""Cross-entropy over a large vocabulary without the (tokens x vocab) float32 logits.

Llama 3's vocabulary is 128k: for 8k tokens the logits alone would be 4 GiB in float32, and
autograd would keep them for the backward. `chunked_cross_entropy` walks the vocabulary in chunks
instead: the forward keeps a running log-sum-exp and the target's logit (never more than one
(tokens x chunk) block), and the backward recomputes each block's softmax to form the gradients.
Peak memory is O(tokens x chunk); the result equals `F.cross_entropy` on the full logits.

When a gradient is wanted (training), `_FusedCE` instead walks blocks of tokens, each over the
whole vocabulary, and forms the gradients in the forward (the loss is a sum: they are final up to
the upstream scalar): the output's three matmuls, as with full logits, without the recomputation
and without the (tokens x V) tensors (Liger-Kernel's fused linear cross-entropy does the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
TINY = 1e-30  # below this a target probability's log is taken from log_softmax instead


def matmul_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype an output-layer matmul of `h` runs in: autocast's (bf16 on CUDA) when it is on, else
    h's. The loss kernels cast the (V, D) weight to it once, not autocast at each of their block
    matmuls (for Llama 3's (128k, D) weight, a GB each)."""
    kind = h.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        # h (N, D) hidden states, weight (V, D) output projection, targets (N,) with IGNORE.
        N, V = h.shape[0], weight.shape[0]
        valid = targets != IGNORE
        safe = targets.clamp(min=0)
        lse = torch.full((N,), float("-inf"), device=h.device)
        target_logit = torch.zeros(N, device=h.device)
        for start in range(0, V, chunk):
            logits = (h @ weight[start:start + chunk].to(h.dtype).T).float()  # (N, C)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            inside = (safe >= start) & (safe < start + logits.shape[1])
            picked = logits.gather(1, (safe - start).clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
            target_logit = torch.where(inside, picked, target_logit)
        ctx.save_for_backward(h, weight, safe, valid, lse)
        ctx.chunk = chunk
        return (lse - target_logit) * valid  # (N,) per-token losses, 0 where ignored

    @staticmethod
    def backward(ctx, grad):
        h, weight, safe, valid, lse = ctx.saved_tensors
        scale = (grad * valid).float()[:, None]  # (N, 1): d(loss) per row, 0 where ignored
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        for start in range(0, weight.shape[0], ctx.chunk):
            w = weight[start:start + ctx.chunk]
            logits = (h @ w.to(h.dtype).T).float()
            d = torch.exp(logits - lse[:, None])  # softmax block (N, C)
            inside = (safe >= start) & (safe < start + w.shape[0])
            rows = inside.nonzero()[:, 0]
            d[rows, safe[rows] - start] -= 1.0
            d *= scale
            if grad_h is not None:
                grad_h += d @ w.float()
            if grad_w is not None:
                grad_w[start:start + w.shape[0]] = d.T @ h.float()
        return (grad_h.to(h.dtype) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None, None, None)


class _FusedCE(torch.autograd.Function):
    """The summed loss and its gradients in one pass over blocks of `rows` tokens (each block's
    logits over the whole vocabulary, (rows, V), then dropped). The loss is a scalar sum, so its
    gradients are known in the forward up to the upstream factor: the backward only scales them.
    Three matmuls per block (logits, grad_h, grad_w), as for the full logits, and no (N, V) tensor."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows, need_h, need_w):
        # h (N, D), weight (V, D), targets (N,) with IGNORE.
        # Only the positions with a target: an ignored one (a prompt token of a chat example) has no
        # loss and no gradient, so the output's three matmuls skip it.
        keep = (targets != IGNORE).nonzero()[:, 0]
        safe = targets[keep]
        dtype = matmul_dtype(h)
        w, hm = weight.to(dtype), h[keep].to(dtype)
        loss = torch.zeros((), device=h.device)
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = None  # (V, D) float32, from the first block on
        for start in range(0, len(keep), rows):
            hc, tc = hm[start:start + rows], safe[start:start + rows]
            # The softmax itself (one kernel: exp computed once), the loss as -log of the target's
            # probability; a probability too small for that (< 1e-30) takes its row's log_softmax.
            d = torch.softmax((hc @ w.T).float(), dim=-1)  # (R, V)
            picked = d.gather(1, tc[:, None])[:, 0]
            nll = -picked.clamp_min(TINY).log()
            tiny = (picked < TINY).nonzero()[:, 0]
            if len(tiny):
                nll[tiny] = -torch.log_softmax((hc[tiny] @ w.T).float(), dim=-1).gather(1, tc[tiny, None])[:, 0]
            loss += nll.sum()
            d[torch.arange(len(tc), device=h.device), tc] -= 1.0
            # Matmuls in that dtype, sums in float32.
            d = d.to(dtype)
            if need_h:
                grad_h.index_copy_(0, keep[start:start + rows], (d @ w).float())
            if need_w:
                part = d.T @ hc  # (V, D)
                grad_w = part.float() if grad_w is None else grad_w.add_(part)
        if need_w and grad_w is None:  # no tokens at all
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.need = (need_h, need_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.spent = False
        return loss

    @staticmethod
    def backward(ctx, grad):
        # Scaled in place: the saved gradients are this call's own (a (V, D) float32 one is 197 MB
        # for Llama 3's vocabulary at dim 384; a fresh one each step costs its page faults too).
        if ctx.spent:
            raise RuntimeError("the fused cross-entropy's backward runs once (no retain_graph)")
        ctx.spent = True
        saved = iter(ctx.saved_tensors)
        grad_h = next(saved).mul_(grad).to(ctx.dtypes[0]) if ctx.need[0] else None
        grad_w = next(saved).mul_(grad).to(ctx.dtypes[1]) if ctx.need[1] else None
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 8192) -> torch.Tensor:
    """The summed cross-entropy of `h @ weight.T` against `targets`, in vocabulary chunks.

    Args:
        h: (..., D) final hidden states.
        weight: (V, D) output projection (may be tied to the embedding; its gradient is returned).
        targets: (...) token ids, IGNORE (-100) where no loss is taken.
        chunk: vocabulary rows per block (with a gradient: blocks of chunk x 8192 logits).
    Returns:
        The sum (not the mean) of the per-token losses, float32: divide by the number of
        targets of the whole (global) batch, so accumulation and processes weigh every token alike.
    """
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    need_h, need_w = torch.is_grad_enabled() and h.requires_grad, torch.is_grad_enabled() and weight.requires_grad
    # Training: gradients in the same pass, over blocks of ~chunk x 8192 logits (few blocks, as each
    # block adds its share to the whole (V, D) gradient of the weight).
    if need_h or need_w:
        return _FusedCE.apply(flat_h, weight, flat_t, max(1, chunk * 8192 // weight.shape[0]), need_h, need_w)
    return chunked_token_losses(h, weight, targets, chunk).sum()


def chunked_token_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 8192) -> torch.Tensor:
    """Per-token cross-entropy (the negative log-probability of each target), (N,) flattened,
    0 where the target is IGNORE; computed in vocabulary chunks (memory O(N x chunk), the softmax
    recomputed in the backward). Preference losses (DPO) sum these per sequence."""
    return _ChunkedCE.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk)


def token_losses(h: torch.Tensor, output: torch.nn.Module, targets: torch.Tensor,
                 chunk: int | None = 8192) -> torch.Tensor:
    """Per-token losses (N,) through the model's output layer: chunked for a plain `nn.Linear`,
    otherwise (a quantized output) through the layer itself."""
    if chunk and isinstance(output, torch.nn.Linear):
        return chunked_token_losses(h, output.weight, targets, chunk)
    return F.cross_entropy(output(h).float().flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="none")


def cross_entropy_sum(h: torch.Tensor, output: torch.nn.Module, targets: torch.Tensor,
                      chunk: int | None = 8192) -> torch.Tensor:
    """Summed loss through the model's output layer: chunked when it is a plain `nn.Linear`,
    otherwise (a quantized output) through the layer itself, a block of tokens at a time."""
    if chunk and isinstance(output, torch.nn.Linear):
        return chunked_cross_entropy(h, output.weight, targets, chunk)
    return F.cross_entropy(output(h).float().flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
