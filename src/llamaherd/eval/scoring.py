"""Log-likelihoods on the engine's model: the one primitive that multiple choice, perplexity and
the lm-evaluation-harness backend share.

A request is (context tokens, continuation tokens); its result is the sum of the continuation's
log-probabilities given everything before it, and whether each continuation token was the
model's greedy choice — what lm-evaluation-harness's `loglikelihood` returns.

Two paths, chosen by the model's runner (`engine.runner`):
- the engine's (a GGUF block model on a CPU, the native kernels): requests that share their
  context (a question's choices) are one group; the context is prefilled once into a KV-cache
  row, copied into a row per choice (`Runner.fork`), and each choice's tokens are fed after it
  (`Runner.decode`). A prefix that several contexts share (a subject line, few-shot examples) is
  prefilled once and copied too (`prefix_tree`), every context token through the prompt
  matmuls, so a request's numbers depend on itself only, not on what it is batched with.
- the torch modules' (float weights, the reference path): requests are batched longest first,
  right-padded (causal attention never looks at the padding, which comes after every scored
  position), a request whose input is a prefix of another's shares its forward pass, and only
  the scored positions go through the output projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..chat.text import common_prefix
from ..errors import HerdError

Request = tuple[Sequence[int], Sequence[int]]
ENGINE_MAX_CONTINUATION = 64  # the engine's path: the longest continuation fed as steps after its context
STEP_TOKENS = 256  # the engine's path: tokens per step call
MIN_SHARED = 4  # the engine's path: the fewest tokens worth prefilling once for several contexts


def encode_pairs(tokenizer, context: str, continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """Context and continuation tokens as lm-evaluation-harness splits them, for each continuation
    of one context: trailing spaces of the context move to the continuation, the pair is encoded
    whole and the continuation is what follows the context's own tokens (so a merge across the
    boundary is scored as the model would see it). An empty context becomes the prefix token (BOS,
    else EOS). The context is encoded once for all its continuations."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuations = [context[-n_spaces:] + c for c in continuations]
        context = context[:-n_spaces]
    if not context:
        return [([prefix_token(tokenizer)], tokenizer.encode(c)) for c in continuations]
    ctx = tokenizer.encode(context)
    return [(ctx, tokenizer.encode(context + c)[len(ctx):]) for c in continuations]


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
    if _engine_scores(llm, seqs):
        return _engine_loglikelihoods(llm, seqs, batch_tokens, progress)
    return _forward_loglikelihoods(llm, seqs, batch_tokens, progress)


def _engine_scores(llm, seqs) -> bool:
    """Whether the engine's own prompt and step kernels score these requests: the native runner,
    and continuations short enough to feed as steps (long ones, a perplexity window's, go through
    the batched forward)."""
    from ..engine.runner import NativeRunner

    runner = getattr(llm, "runner", None)
    return isinstance(runner, NativeRunner) and all(len(t) <= ENGINE_MAX_CONTINUATION for _, t in seqs)


@torch.inference_mode()
def _engine_loglikelihoods(llm, seqs, batch_tokens: int, progress) -> list[tuple[float, bool]]:
    """The engine's path (see the module docstring): a group's context is prefilled once, and so
    is a prefix that several contexts of a batch share."""
    runner, model = llm.runner, llm.model
    groups: dict[tuple[int, ...], list[int]] = {}  # context (the input before the first target) -> requests
    for i, (inp, targets) in enumerate(seqs):
        groups.setdefault(tuple(inp[:len(inp) - len(targets) + 1]), []).append(i)
    batches, batch, tokens = [], [], 0
    for ctx, members in groups.items():  # in order; a batch holds about batch_tokens tokens
        size = len(ctx) + sum(len(seqs[i][1]) - 1 for i in members)
        if batch and tokens + size > batch_tokens:
            batches.append(batch)
            batch, tokens = [], 0
        batch.append((ctx, members))
        tokens += size
    if batch:
        batches.append(batch)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    caches = [layer.attention.cache for layer in model.layers]  # the generation loop's, given back after
    model.clear_cache()
    try:
        plans = [_plan(seqs, batch) for batch in batches]
        runner.allocate(max(n_rows for *_, n_rows in plans), max(len(inp) for inp, _ in seqs) + 1)
        for batch, (nodes, leaves, rows, _) in zip(batches, plans):
            first = _prefill_tree(runner, [ctx for ctx, _ in batch], nodes, leaves)  # (groups, V)
            steps = []  # (token, position, row, request): each choice's tokens after its context
            for ctx, members in batch:
                forks = [rows[i] for i in members[1:] if rows[i] != rows[members[0]]]
                if forks:  # a copy of the context's keys and values for each choice that needs one
                    runner.fork(rows[members[0]], forks, len(ctx))
                for i in members:
                    steps += [(t, len(ctx) + k, rows[i], i) for k, t in enumerate(seqs[i][1][:-1])]
            later = [runner.decode(*map(list, zip(*[s[:3] for s in steps[a:a + STEP_TOKENS]])))
                     for a in range(0, len(steps), STEP_TOKENS)]
            logp = torch.log_softmax(torch.cat([first, *later]), dim=-1)
            at = {}  # request -> the logits row of its first step
            for n, step in enumerate(steps):
                at.setdefault(step[3], len(batch) + n)
            spans, rows_of, targets = [], [], []  # each target token's logits row, read in one op
            for g, (ctx, members) in enumerate(batch):
                for i in members:
                    cont = seqs[i][1]
                    spans.append((i, len(targets), len(targets) + len(cont)))
                    rows_of += [g, *range(at.get(i, 0), at.get(i, 0) + len(cont) - 1)]
                    targets += cont
            picked = logp[rows_of, targets].tolist()
            greedy = (logp.argmax(-1)[rows_of] == torch.tensor(targets)).tolist()
            for i, a, b in spans:
                results[i] = (math.fsum(picked[a:b]), all(greedy[a:b]))
            if progress:
                progress(sum(len(m) for _, m in batch))
    finally:
        for layer, cache in zip(model.layers, caches):
            layer.attention.cache = cache
    return results


def prefix_tree(contexts: Sequence[Sequence[int]], min_shared: int = MIN_SHARED
                ) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """The prefixes contexts share, as a tree, so that each is prefilled once: the subject line
    before every MMLU question of a subject, the same few-shot examples before each question.

    Args:
        contexts: token sequences, distinct, none empty.
        min_shared: the fewest tokens a shared prefix adds to its parent's to be a node of its own.
    Returns:
        (nodes, leaves): nodes (parent, start, end, context), a parent before its children (-1:
        none), each holding tokens start..end-1 of every context under it (`context`: one of them);
        leaves[i] the node that ends context i. A context's last token is always its leaf's own.
    """
    order = sorted(range(len(contexts)), key=lambda i: tuple(contexts[i]))
    # neighbours' shared tokens, leaving each context at least its last token
    common = [min(common_prefix(contexts[a], contexts[b]), len(contexts[a]) - 1, len(contexts[b]) - 1)
              for a, b in zip(order, order[1:])]
    nodes: list[tuple[int, int, int, int]] = []
    leaves = [0] * len(contexts)
    todo = [(0, len(order), 0, -1)]  # (lo, hi, depth, parent): order[lo:hi] share their first `depth` tokens
    while todo:
        lo, hi, depth, parent = todo.pop()
        if hi - lo == 1:
            leaves[order[lo]] = len(nodes)
            nodes.append((parent, depth, len(contexts[order[lo]]), order[lo]))
            continue
        shared = min(common[lo:hi - 1])  # what all of order[lo:hi] share (they are sorted)
        if shared - depth >= min_shared:
            nodes.append((parent, depth, shared, order[lo]))
            parent, depth = len(nodes) - 1, shared
        cuts = [lo] + [k + 1 for k in range(lo, hi - 1) if common[k] == shared] + [hi]
        todo += reversed([(a, b, depth, parent) for a, b in zip(cuts, cuts[1:])])  # depth first, in order
    return nodes, leaves


def _plan(seqs, batch) -> tuple[list[tuple[int, int, int, int, int]], list[int], dict[int, int], int]:
    """A batch's prefix tree (`prefix_tree` of its contexts, each node with its KV-cache row
    appended), the rows of its requests, and how many rows. A node continues in its parent's row
    (the first child) or gets a copy of it; a group's first request continues in its context's
    row, each other request of more than one token gets a copy (a one-token request is read off
    the context's logits: no steps)."""
    nodes, leaves = prefix_tree([ctx for ctx, _ in batch], MIN_SHARED)
    node_rows, taken, n = [], set(), 0
    for parent, *_ in nodes:
        if parent >= 0 and parent not in taken:
            taken.add(parent)
            node_rows.append(node_rows[parent])
        else:
            node_rows.append(n)
            n += 1
    rows = {}
    for g, (_, members) in enumerate(batch):
        rows[members[0]] = node_rows[leaves[g]]
        for i in members[1:]:
            if len(seqs[i][1]) > 1:
                rows[i] = n
                n += 1
            else:
                rows[i] = rows[members[0]]
    return [(*node, row) for node, row in zip(nodes, node_rows)], leaves, rows, n


def _prefill_tree(runner, contexts, nodes, leaves) -> torch.Tensor:
    """Prefill a prefix tree (`_plan`'s nodes: (parent, start, end, context, row)) a level at a
    time, every token through the prompt matmuls (`Runner.prefill(dense=True)`, so a context's
    numbers are those it gets prefilled whole and alone); after each level, a node's positions are
    copied into the rows of its children that do not continue in its own. Returns the logits
    (len(contexts), V) after each context."""
    depth: list[int] = []
    for parent, *_ in nodes:
        depth.append(0 if parent < 0 else depth[parent] + 1)
    outs, at = [], {}  # the logits of every node, and where each node's row is in them
    for level in range(max(depth) + 1):
        ids = [k for k, d in enumerate(depth) if d == level]
        outs.append(runner.prefill([(list(contexts[c][a:b]), a, row) for _, a, b, c, row in (nodes[k] for k in ids)],
                                   dense=True))
        at.update({k: len(at) + n for n, k in enumerate(ids)})
        copies: dict[int, list[int]] = {}
        for parent, *_, row in nodes:
            if parent >= 0 and depth[parent] == level and row != nodes[parent][4]:
                copies.setdefault(parent, []).append(row)
        for parent, dsts in copies.items():
            runner.fork(nodes[parent][4], dsts, nodes[parent][2])
    return torch.cat(outs)[[at[leaf] for leaf in leaves]]


@torch.inference_mode()
def _forward_loglikelihoods(llm, seqs, batch_tokens: int, progress) -> list[tuple[float, bool]]:
    """The torch modules' batched forward (see the module docstring)."""
    model = llm.model

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
