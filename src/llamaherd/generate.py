"""Sampling and the token stream: small pure functions, and a `generate` that yields token ids.

The order of the sampling steps follows llama.cpp / Ollama: penalties, then top-k, top-p and min-p
filtering, then temperature, then a draw. Temperature 0 is greedy (argmax), whatever else is set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .errors import HerdError
from .options import check_option
from .quantize import native


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
    ids = None
    if 0 < opts.top_k < logits.shape[-1]:
        # Only the k best can be drawn: softmax and the top-p sort over k values, not the whole
        # vocabulary (~3 ms a token for 49k on a CPU). topk keeps exactly k, as llama.cpp does.
        logits, ids = torch.topk(logits, opts.top_k)
    i = int(torch.multinomial(logits_to_probs(logits, opts), 1, generator=generator))
    return i if ids is None else int(ids[i])


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


@torch.inference_mode()
def prefill(model, tokens: Sequence[int], start_pos: int = 0) -> torch.Tensor:
    """Run the prompt through the model (filling the KV cache from `start_pos`); logits of the last token.

    The prompt goes in chunks that start at multiples of PREFILL_CHUNK positions. Matmul and attention
    kernels round differently for different numbers of rows, so a prompt split at other places would
    give slightly different keys and values; with fixed boundaries, a prompt resumed from a cached
    prefix that ends on a boundary is computed exactly as it would be from scratch. It also bounds
    the memory a long prompt needs. (The native path computes every token on its own; its float32
    blocks end on the same boundaries, so a resume there is exact on it too.)
    """
    tokens = list(tokens)
    logits = native.prefill(model, tokens, start_pos)  # GGUF-block models on CPU: whole-prompt C calls
    if logits is not None:
        return logits
    device = model.device
    end = start_pos + len(tokens)
    pos = start_pos
    while pos < end:
        stop = min(end, (pos // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
        x = torch.tensor([tokens[pos - start_pos:stop - start_pos]], device=device)
        logits = model(x, torch.arange(pos, stop, device=device)[None], last_only=True)
        pos = stop
    return logits[0, -1]


PREFILL_CHUNK = native.DENSE_ROWS  # 64; also where the native path's float32 blocks end, so resumes stay exact


@torch.inference_mode()
def decode_one_token(model, token: int, pos: int) -> torch.Tensor:
    """Logits after feeding one token at position `pos`."""
    logits = native.decode(model, [token], [pos], [0])  # GGUF-block models on CPU: one C call
    if logits is not None:
        return logits[0]
    device = model.device
    return model(torch.tensor([[token]], device=device), torch.tensor([[pos]], device=device))[0, -1]


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


def generate(model, prompt: Sequence[int], opts: SamplingOptions, stop_ids: frozenset[int] = frozenset(),
             cached: int = 0) -> Iterator[int]:
    """Yield new token ids after `prompt` until a stop token (not yielded), `num_predict` tokens, or a
    full context.

    The caller sizes the KV cache (`model.setup_cache`) to at least num_ctx positions; `cached` says
    how many leading prompt tokens are already in it (a chat's earlier turns), so only the rest is
    prefilled.
    """
    num_ctx = opts.num_ctx or model.cache_len
    if len(prompt) == 0:
        raise HerdError("the prompt is empty")
    if len(prompt) >= num_ctx:
        raise HerdError(f"the prompt is {len(prompt)} tokens, which does not fit the context of {num_ctx} "
                        "(raise num_ctx or shorten the prompt)")
    # At least one token must run to give logits; resume on a chunk boundary (see `prefill`).
    cached = min(cached, len(prompt) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
    generator = make_generator(opts.seed)
    history = list(prompt)
    logits = prefill(model, prompt[cached:], cached)
    budget = opts.num_predict if opts.num_predict >= 0 else num_ctx
    # Speculation needs every guessed token's logits to be what a step of its own gives: the native
    # step computes each row as if alone, so the output is exactly that of plain greedy decoding.
    lookup = (PromptLookup(history) if opts.speculate and opts.temperature <= 0
              and native.decoder(model) is not None else None)
    guesses = opts.speculate  # how many guesses to check next, adapted to how many hold
    chosen = [sample(logits, history, opts, generator)] if budget > 0 else []
    while chosen:
        for token in chosen:
            if token in stop_ids:
                return
            yield token
            history.append(token)
            if lookup:
                lookup.push(token)
            if len(history) - len(prompt) == budget or len(history) >= num_ctx:
                return
        room = min(budget - (len(history) - len(prompt)), num_ctx - len(history)) - 1
        drafts = lookup.propose(min(guesses, room)) if lookup else []
        chosen, guesses = next_tokens(model, history, drafts, opts, generator, guesses)


def next_tokens(model, history: list[int], drafts: list[int], opts: SamplingOptions,
                generator: torch.Generator, guesses: int) -> tuple[list[int], int]:
    """The model's next token(s) after `history`, whose last token has not run yet: one, or, given
    guesses `drafts` for what follows, all rows checked in one step — the guesses the model makes
    itself, then its own choice — and how many guesses to check next time."""
    pos = len(history) - 1
    if not drafts:
        return [sample(decode_one_token(model, history[-1], pos), history, opts, generator)], guesses
    rows = native.decode(model, [history[-1], *drafts], list(range(pos, pos + len(drafts) + 1)),
                         [0] * (len(drafts) + 1))
    chosen = []
    for row, draft in zip(rows, drafts):
        chosen.append(sample(row, history + chosen, opts, generator))
        if chosen[-1] != draft:  # a wrong guess cost a row: check fewer next time
            return chosen, max(1, len(chosen) - 1)
    chosen.append(sample(rows[len(drafts)], history + chosen, opts, generator))  # every guess held
    return chosen, min(opts.speculate, 2 * guesses)
