"""Log-likelihoods on the engine's model: the one primitive that multiple choice, perplexity and
the lm-evaluation-harness backend share.

A request is (context tokens, continuation tokens); its result is the sum of the continuation's
log-probabilities given everything before it, and whether each continuation token was the
model's greedy choice — what lm-evaluation-harness's `loglikelihood` returns. Requests are
batched longest first, right-padded (causal attention never looks at the padding, which comes
after every scored position), a request whose input is a prefix of another's shares its forward
pass, and only the scored positions go through the output projection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import HerdError

Request = tuple[Sequence[int], Sequence[int]]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-evaluation-harness splits them: trailing spaces of
    the context move to the continuation, the pair is encoded whole and the continuation is what
    follows the context's own tokens (so a merge across the boundary is scored as the model would
    see it). An empty context becomes the prefix token (BOS, else EOS)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [prefix_token(tokenizer)], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def prefix_token(tokenizer) -> int:
    """The token that stands for "nothing before": BOS, else EOS (lm-evaluation-harness's rule)."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise HerdError("the model has neither a BOS nor an EOS token to score text from its start")
    return token


def check_scorer(llm, name: str = "model") -> None:
    """A clear error for a model object that cannot give log-likelihoods."""
    model = getattr(llm, "model", None)
    if not (hasattr(model, "hidden_states") and hasattr(model, "output") and hasattr(llm, "tokenizer")):
        raise HerdError(f"{name} cannot score text: it is not a loaded causal language model "
                        "(llamaherd.load gives one)")


@torch.inference_mode()
def loglikelihoods(llm, requests: Sequence[Request], *, max_len: int | None = None,
                   batch_tokens: int = 4096, progress: Callable[[int], None] | None = None
                   ) -> list[tuple[float, bool]]:
    """Sum of log P(continuation | context) for each request, and whether it was all greedy.

    Args:
        llm: a `llamaherd.llm.Llama`.
        requests: (context, continuation) token lists; the continuation must not be empty and the
            context must have at least one token.
        max_len: the longest sequence fed at once (default the model's context length); longer
            requests keep their last tokens (the continuation and the nearest context).
        batch_tokens: padded tokens per forward pass (bounds memory).
        progress: called with the number of requests finished after each batch.
    Returns:
        (loglikelihood, is_greedy) per request, in order.
    """
    check_scorer(llm)
    model = llm.model
    max_len = max_len or llm.args.max_seq_len
    seqs = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise HerdError(f"request {i}: the continuation has no tokens")
        if not ctx:
            raise HerdError(f"request {i}: the context has no tokens (use the prefix token)")
        if len(cont) > max_len:
            raise HerdError(f"request {i}: the continuation is {len(cont)} tokens, more than the "
                            f"context length {max_len}")
        full = (list(ctx) + list(cont))[-(max_len + 1):]
        seqs.append((full[:-1], full[-len(cont):]))  # (input, targets at its last len(cont) positions)

    # A request whose input is a prefix of another's is read off that one's forward pass (causal
    # attention: the logits at its positions are the same): multiple choice with one-token
    # choices (MMLU's " A".." D") costs one pass per question, as lm-eval's one-token cache.
    host = list(range(len(seqs)))
    by_input = sorted(range(len(seqs)), key=lambda i: seqs[i][0])
    for i, j in zip(reversed(by_input[:-1]), reversed(by_input[1:])):  # j follows i in sorted order
        a, b = seqs[i][0], seqs[j][0]
        if len(b) >= len(a) and b[:len(a)] == a:
            host[i] = host[j]
    riders: dict[int, list[int]] = {}
    for i, h in enumerate(host):
        riders.setdefault(h, []).append(i)
    order = sorted(riders, key=lambda h: -len(seqs[h][0]))  # longest first: little padding per batch

    results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    caches = [layer.attention.cache for layer in model.layers]
    model.clear_cache()
    try:
        start = 0
        while start < len(order):
            T = len(seqs[order[start]][0])
            B = max(1, min(len(order) - start, batch_tokens // T))
            batch = order[start:start + B]
            x = torch.zeros(len(batch), T, dtype=torch.long)
            for row, h in enumerate(batch):
                inp = seqs[h][0]
                x[row, :len(inp)] = torch.tensor(inp)
            hidden = model.hidden_states(x.to(model.device))  # (B, T, D)
            rows, cols, targets, spans = [], [], [], []
            for row, h in enumerate(batch):
                for i in riders[h]:
                    inp, cont = seqs[i]
                    spans.append((i, len(targets), len(cont)))
                    rows += [row] * len(cont)
                    cols += range(len(inp) - len(cont), len(inp))
                    targets += cont
            logp = F.log_softmax(model.output(hidden[rows, cols]).float(), dim=-1)  # (N, V)
            targets_t = torch.tensor(targets, device=logp.device)
            token_lp = logp.gather(1, targets_t[:, None])[:, 0]
            greedy = logp.argmax(dim=-1) == targets_t
            for i, at, n in spans:
                results[i] = (float(token_lp[at:at + n].double().sum()), bool(greedy[at:at + n].all()))
            start += B
            if progress:
                progress(sum(len(riders[h]) for h in batch))
    finally:
        for layer, cache in zip(model.layers, caches):
            layer.attention.cache = cache
    return results


def rolling_requests(tokens: Sequence[int], window: int, stride: int) -> list[Request]:
    """Requests that score every token of a document after its first (the prefix token) once,
    in a sliding window.

    Context rule: targets go in chunks of `stride` tokens; a chunk is scored in one forward pass
    of at most `window` tokens ending just before its last target, so each token is predicted
    from all the tokens before it when there are fewer than window - stride + 1, and otherwise
    from at least window - stride + 1 of them. stride == window is lm-evaluation-harness's
    `loglikelihood_rolling` (disjoint windows); a smaller stride gives more context per token at
    more compute (Hugging Face's "perplexity of fixed-length models" recipe).
    """
    if not 1 <= stride <= window:
        raise HerdError(f"stride must be between 1 and the window ({window}), got {stride}")
    tokens = list(tokens)
    return [(tokens[:a], tokens[a:a + stride]) for a in range(1, len(tokens), stride)]
