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

On the CPU the training path also keeps away from fresh memory, whose pages the kernel faults in and
zeroes (~0.15 s a step on one core for each 200 MB tensor: as much as the softmax): the logits blocks
are formed in a `Workspace` the loss module keeps, their softmax in place, and a tied embedding's
lookup adds its gradient rows into the loss's (V, D) gradient (`tied_lookup`) rather than making
a (V, D) gradient of its own.
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


class Workspace:
    """A float32 buffer that the fused loss's logits blocks reuse from call to call (one per
    training loss: see `finetune.CausalLMLoss`). On the CPU a fresh block of Llama 3's logits
    (~500 x 128k floats, 260 MB) is fresh pages that the kernel must fault in and zero (~0.15 s a
    step at one thread, more than its softmax), and the matmul writing into them runs slower too."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def get(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """A (rows, cols) float32 view of the buffer, grown (never shrunk) as needed; its content
        is whatever the last call left."""
        n = rows * cols
        if self.buffer is None or self.buffer.numel() < n or self.buffer.device != device:
            self.buffer = None  # the old one freed before the new one is made
            self.buffer = torch.empty(n, dtype=torch.float32, device=device)
        return self.buffer[:n].view(rows, cols)


def _block_logits(hc: torch.Tensor, w: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
    """hc @ w.T as float32 (R, V): written into the workspace when there is one, on the CPU (CUDA's
    caching allocator already reuses its blocks, and a workspace kept would hold its memory through
    the backward)."""
    if workspace is None or hc.device.type != "cpu":
        return (hc @ w.T).float()
    out = workspace.get(hc.shape[0], w.shape[0], hc.device)
    if hc.dtype == torch.float32:
        return torch.mm(hc, w.T, out=out)
    return out.copy_(hc @ w.T)  # a bf16 (autocast) block, summed in float32 from here


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
    def forward(ctx, h, weight, targets, rows, need_h, need_w, workspace, link):
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
            # The block's logits, then its softmax in place (one kernel: exp computed once), in the
            # workspace's float32 block; the loss is -log of the target's probability; a probability
            # too small for that (< 1e-30) takes its row's log_softmax.
            d = _block_logits(hc, w, workspace)  # (R, V) float32
            torch.softmax(d, dim=-1, out=d)
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
                if grad_w is None:
                    grad_w = (d.T @ hc).float()  # (V, D)
                elif d.dtype == grad_w.dtype:
                    grad_w.addmm_(d.T, hc)  # added in the matmul: no (V, D) temporary a block
                else:
                    grad_w.add_(d.T @ hc)
        if need_w and grad_w is None:  # no tokens at all
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.need = (need_h, need_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.spent, ctx.link = False, link
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
        if ctx.link is not None and grad_w is not None:
            # handed to the tied lookup's backward, which comes later and gives it to autograd with
            # its rows added: the weight then has one gradient, whatever else adds to it
            ctx.link.grad_w, grad_w = grad_w, None
        return grad_h, grad_w, None, None, None, None, None, None


class TiedLink:
    """Carries the fused loss's (V, D) weight gradient to the backward of the tied embedding lookup
    of the same forward (`tied_lookup`): one per forward."""

    def __init__(self):
        self.grad_w: torch.Tensor | None = None


class _TiedLookup(torch.autograd.Function):
    """The embedding rows of `tokens` from a weight that is also the output layer's (tied). The
    loss's backward runs first (the lookup feeds everything before it) and hands its (V, D) weight
    gradient over in `link` instead of returning it; this backward adds its rows into it in place
    and returns it as the weight's gradient of both uses, where a plain lookup's is a fresh (V, D)
    of zeros with the rows in, then added to the output's (for Llama 3's vocabulary at dim 384:
    197 MB, ~0.2 s a step on one core). torch's sparse lookup gradient does not help: autograd adds
    a sparse gradient to a dense one out of place."""

    @staticmethod
    def forward(ctx, weight, tokens, link):
        ctx.save_for_backward(tokens)
        ctx.link, ctx.weight_meta = link, (weight.shape, weight.dtype, weight.device)
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad):
        (tokens,) = ctx.saved_tensors
        grad_w, ctx.link.grad_w = ctx.link.grad_w, None
        rows = grad.reshape(-1, grad.shape[-1])
        if grad_w is None:  # the loss made no weight gradient (not the fused one): a lookup's own
            shape, dtype, device = ctx.weight_meta
            return torch.zeros(shape, dtype=dtype, device=device).index_add_(0, tokens.reshape(-1), rows.to(dtype)), \
                None, None
        return grad_w.index_add_(0, tokens.reshape(-1), rows.to(grad_w.dtype)), None, None


def tied_lookup(weight: torch.Tensor, tokens: torch.Tensor, link: TiedLink) -> torch.Tensor:
    """`F.embedding(tokens, weight)` for a weight tied to the output layer whose loss is
    `chunked_cross_entropy(..., link=link)` in the same forward: the same values and gradients,
    the lookup's added into the loss's (V, D) weight gradient in place (see `_TiedLookup`).
    One process only: FSDP2 reduces each gradient autograd hands it."""
    return _TiedLookup.apply(weight, tokens, link)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 8192, workspace: Workspace | None = None,
                          link: TiedLink | None = None) -> torch.Tensor:
    """The summed cross-entropy of `h @ weight.T` against `targets`, in vocabulary chunks.

    Args:
        h: (..., D) final hidden states.
        weight: (V, D) output projection (may be tied to the embedding; its gradient is returned).
        targets: (...) token ids, IGNORE (-100) where no loss is taken.
        chunk: vocabulary rows per block (with a gradient: blocks of chunk x 8192 logits).
        workspace: with a gradient, where the logits blocks are formed (reused across calls); None:
            a fresh block each time.
        link: with a weight gradient, where to leave it for `tied_lookup`'s backward.
    Returns:
        The sum (not the mean) of the per-token losses, float32: divide by the number of
        targets of the whole (global) batch, so accumulation and processes weigh every token alike.
    """
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    need_h, need_w = torch.is_grad_enabled() and h.requires_grad, torch.is_grad_enabled() and weight.requires_grad
    # Training: gradients in the same pass, over blocks of ~chunk x 8192 logits (few blocks, as each
    # block adds its share to the whole (V, D) gradient of the weight).
    if need_h or need_w:
        return _FusedCE.apply(flat_h, weight, flat_t, max(1, chunk * 8192 // weight.shape[0]), need_h, need_w,
                              workspace, link)
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
                      chunk: int | None = 8192, workspace: Workspace | None = None,
                      link: TiedLink | None = None) -> torch.Tensor:
    """Summed loss through the model's output layer: chunked when it is a plain `nn.Linear`
    (`workspace` and `link` as `chunked_cross_entropy`'s), otherwise (a quantized output) through
    the layer itself, a block of tokens at a time."""
    if chunk and isinstance(output, torch.nn.Linear):
        return chunked_cross_entropy(h, output.weight, targets, chunk, workspace, link)
    return F.cross_entropy(output(h).float().flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
