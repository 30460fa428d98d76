"""Sampling and the token stream: small pure functions, and a `generate` that yields token ids.

The order of the sampling steps follows llama.cpp / Ollama: penalties, then top-k, top-p and min-p
filtering, then temperature, then a draw. Temperature 0 is greedy (argmax), whatever else is set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .errors import HerdError
from .options import check_option


@dataclass
class SamplingOptions:
    """Generation options, named and defaulted as in Ollama's `options`."""

    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.9  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repeat_penalty: float = 1.1  # 1.0: off
    repeat_last_n: int = 64  # how many recent tokens the penalties see; -1: num_ctx, 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed, same output
    stop: Sequence[str] = field(default_factory=tuple)
    num_predict: int = -1  # -1: until a stop token or the context is full
    num_ctx: int | None = None  # context window; None: min(4096, the model's)
    speculate: int = 0  # llamaherd's own: at temperature 0, check up to this many tokens guessed by
    # prompt lookup in one step (see `PromptLookup`); the output is the same, only sooner

    @classmethod
    def from_dict(cls, options: dict | None) -> "SamplingOptions":
        """From an Ollama-style options dict; unknown keys are ignored, wrong types are an error."""
        opts = cls()
        for f in fields(cls):
            if options and f.name in options and options[f.name] is not None:
                setattr(opts, f.name, options[f.name])
        opts.validate()
        return opts

    def validate(self) -> None:
        """Check and type every option (`llamaherd.options`: the one validation the CLI, the
        Modelfile and both APIs share); `HerdError` naming the option and its range."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, check_option(f.name, value))


# Probability floors tried, largest first, for a set of candidates holding the whole top-p nucleus
# (see `candidates`): at most 1/t tokens each.
NUCLEUS_FLOOR = (1e-3, 1e-4, 1e-5)


def apply_penalties(logits: torch.Tensor, history: Sequence[int], opts: SamplingOptions) -> torch.Tensor:
    """Repeat (llama.cpp: divide positive logits, multiply negative ones), presence and frequency
    penalties over the last `repeat_last_n` tokens. logits: (V,) float32 on the CPU; a new tensor
    if any penalty applies."""
    n = len(history) if opts.repeat_last_n == -1 else opts.repeat_last_n
    recent = history[-n:] if n > 0 else []
    if not recent or (opts.repeat_penalty == 1.0 and not opts.presence_penalty and not opts.frequency_penalty):
        return logits
    # In numpy: this runs for every token of every stream, and on a few dozen values each numpy
    # operation costs ~1 µs where torch's cost ~5-10 (measured: 84 -> 30 µs a call).
    counted = Counter(recent)
    ids = np.fromiter(counted, dtype=np.int64, count=len(counted))
    out = logits.numpy().copy()
    picked = out[ids]
    if opts.repeat_penalty != 1.0:
        penalty = np.float32(opts.repeat_penalty)
        picked = np.where(picked > 0, picked / penalty, picked * penalty)
    if opts.frequency_penalty:
        picked -= np.fromiter(counted.values(), dtype=np.float32, count=len(counted)) * np.float32(opts.frequency_penalty)
    if opts.presence_penalty:
        picked -= np.float32(opts.presence_penalty)
    out[ids] = picked
    return torch.from_numpy(out)


def logits_to_probs(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """Probabilities (V,) after top-k, top-p, min-p filtering and temperature. logits: (V,) float32."""
    logits = logits / opts.temperature
    if 0 < opts.top_k < logits.shape[-1]:
        kth = torch.topk(logits, opts.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if opts.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p: drop a token if the mass before it already does.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= opts.top_p
        drop[0] = False
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if opts.min_p > 0.0:
        probs = probs.masked_fill(probs < opts.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def sample(logits: torch.Tensor, history: Sequence[int], opts: SamplingOptions,
           generator: torch.Generator | None = None) -> int:
    """Pick the next token from logits (V,) given the tokens so far."""
    logits = apply_penalties(logits.float().cpu(), history, opts)
    if opts.temperature <= 0.0:
        return int(logits.numpy().argmax())  # numpy's is vectorized: 5 µs for 49k logits, torch's 56
    probs, ids = candidates(logits, opts)
    i = draw(probs, generator)
    return i if ids is None else int(ids[i])


def candidates(logits: torch.Tensor, opts: SamplingOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logits_to_probs` without the work over the whole vocabulary: (probs, ids) such that token
    ids[i] has probability probs[i] (ids None: probs is over the whole vocabulary). The same
    distribution: every token left out has probability 0 in `logits_to_probs`.

    With top-k, only the k best can be drawn: softmax and the top-p sort run over k values (topk
    keeps exactly k, as llama.cpp does). Without it, sorting the whole vocabulary for top-p costs
    ~10 ms a token for 49k logits. But the nucleus is made of the most likely tokens: if the tokens
    of probability >= t already hold top_p of the mass, every token below t comes after them in the
    sorted order with at least top_p before it, so it is dropped. One pass finds them (at most 1/t
    tokens), and only they are sorted. min-p likewise keeps only tokens of probability >= min_p
    times the largest.
    """
    V = logits.shape[-1]
    if 0 < opts.top_k < V:
        logits, ids = torch.topk(logits, opts.top_k)
        return logits_to_probs(logits, opts), ids
    if opts.top_p >= 1.0 and opts.min_p <= 0.0:
        return torch.softmax(logits / opts.temperature, dim=-1), None
    # In numpy: torch's boolean indexing and nonzero cost ~0.5 ms on 49k values, and its
    # elementwise ops run on every thread, which on a busy machine can take milliseconds.
    x = logits.numpy() / np.float32(opts.temperature)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    floor = opts.min_p * probs.max()
    ids = None
    for t in NUCLEUS_FLOOR if opts.top_p < 1.0 else ():
        if t <= floor:
            break  # min-p cuts deeper: its set holds all that top-p and min-p leave (below)
        above = np.flatnonzero(probs >= t)
        if above.size and probs[above].sum(dtype=np.float64) >= opts.top_p:  # top_p 0: the argmax
            ids = above  # the nucleus lies inside
            break
    if ids is None:
        if floor <= 0.0:
            return logits_to_probs(logits, opts), None
        ids = np.flatnonzero(probs >= floor)
    order = np.argsort(-probs[ids], kind="stable")
    ids = ids[order]
    kept = probs[ids].astype(np.float64)
    if opts.top_p < 1.0:  # as logits_to_probs: drop a token if the mass before it reaches top_p
        drop = (np.cumsum(kept) - kept) >= opts.top_p
        drop[0] = False
        kept[drop] = 0.0
    return torch.from_numpy(kept / kept.sum()), torch.from_numpy(ids)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """An index drawn in proportion to probs (P,), by inverting the cumulative sum with one uniform
    number: torch.multinomial draws an exponential for every entry (~7 ms for 49k)."""
    cdf = np.cumsum(probs.numpy(), dtype=np.float64)
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)  # u < cdf[-1]: never a 0 entry


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


class PromptLookup:
    """Draft tokens by prompt lookup: where the last N tokens occurred before (in the prompt or the
    reply), guess that what followed them then follows now. Summaries, quotes, code edits and
    structured output repeat their input a lot. An index from each N-gram to its latest
    continuation makes a guess O(1) a token."""

    def __init__(self, tokens: Sequence[int], n: int = 3):
        self.n, self.tokens, self.index = n, [], {}
        for token in tokens:
            self.push(token)

    def push(self, token: int) -> None:
        self.tokens.append(token)
        if len(self.tokens) > self.n:  # the N-gram before the newest token: continued at the newest
            self.index[tuple(self.tokens[-self.n - 1:-1])] = len(self.tokens) - 1

    def propose(self, k: int) -> list[int]:
        at = self.index.get(tuple(self.tokens[-self.n:]))
        return [] if at is None or k <= 0 else self.tokens[at:at + k]
