"""Cross-entropy over a large vocabulary without the (tokens x vocab) float32 logits.

Llama 3's vocabulary is 128k: for 8k tokens the logits alone would be 4 GiB in float32, and
autograd would keep them for the backward. `chunked_cross_entropy` walks the vocabulary in chunks
instead: the forward keeps a running log-sum-exp and the target's logit (never more than one
(tokens x chunk) block), and the backward recomputes each block's softmax to form the gradients.
Peak memory is O(tokens x chunk); the result equals `F.cross_entropy` on the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


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


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 8192) -> torch.Tensor:
    """The summed cross-entropy of `h @ weight.T` against `targets`, in vocabulary chunks.

    Args:
        h: (..., D) final hidden states.
        weight: (V, D) output projection (may be tied to the embedding; its gradient is returned).
        targets: (...) token ids, IGNORE (-100) where no loss is taken.
        chunk: vocabulary rows per block.
    Returns:
        The sum (not the mean) of the per-token losses, float32: divide by the number of
        targets of the whole (global) batch, so accumulation and processes weigh every token alike.
    """
    return chunked_token_losses(h, weight, targets, chunk).sum()


def chunked_token_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 8192) -> torch.Tensor:
    """Per-token cross-entropy (the negative log-probability of each target), (N,) flattened,
    0 where the target is IGNORE; computed in vocabulary chunks as `chunked_cross_entropy`.
    Preference losses (DPO) sum these per sequence."""
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
