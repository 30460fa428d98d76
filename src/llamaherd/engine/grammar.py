"""Constrained decoding: the output follows a grammar (JSON, or a JSON schema), token by token.

Engine: llguidance (https://github.com/guidance-ai/llguidance). Why it and not xgrammar or
outlines-core: it computes each step's token mask on the fly from a lazily built lexer and an
Earley parser, so a new schema costs ~1 ms to start instead of a per-schema, per-vocabulary
precompilation (outlines-core builds a full index; xgrammar compiles and caches a grammar); it
covers JSON Schema broadly (refs, anyOf, patterns, formats) and reports schemas it cannot honour
as errors; it is a small Rust wheel without a torch dependency (so it does not pin ours) and it
is what llama.cpp, vLLM and SGLang use for the same job. It is optional: without it, `format`
is an error that says how to install it.

    constraint = Constraint(grammar_tokenizer(tokenizer), compile_format({"type": "object"}), vocab)
    logits = constraint.mask(logits)     # disallowed tokens -> -inf
    constraint.accept(token)             # after sampling
    constraint.done                      # the grammar is complete: stop
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch

from ..errors import HerdError

# JSON whitespace the model may write between tokens: bounded, so a small model cannot spin in
# an endless run of newlines inside the grammar.
JSON_OPTIONS = {"whitespace_pattern": r"[ \t\n\r]{0,20}"}

_lock = threading.Lock()
_tokenizers: dict[int, Any] = {}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise HerdError("structured outputs (format / response_format) need the llguidance package: "
                        "pip install llguidance") from None
    return llguidance


def compile_format(format: str | dict[str, Any]) -> str:
    """An llguidance grammar for Ollama's `format`: "json" (any JSON object) or a JSON schema.

    Raises:
        HerdError: not "json" nor a JSON object, or a schema llguidance rejects.
    """
    llg = _llguidance()
    if format == "json":
        schema: Any = {"type": "object"}
    elif isinstance(format, dict):
        schema = format
    elif isinstance(format, str):
        try:
            schema = json.loads(format)
        except ValueError:
            raise HerdError(f"format must be \"json\" or a JSON schema, got {format!r}") from None
        if not isinstance(schema, dict):
            raise HerdError("format must be \"json\" or a JSON schema object")
    else:
        raise HerdError(f"format must be \"json\" or a JSON schema, got {type(format).__name__}")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise HerdError(f"invalid JSON schema: {_short(e)}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise HerdError(f"invalid JSON schema: {_short(messages[0]) if messages else 'rejected'}")
    return grammar


def _short(message: Any) -> str:
    """llguidance's message, without the matcher state some of them append: its first line, cut."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else "rejected"
    return text if len(text) <= 300 else text[:300] + "..."


class _Wrapped:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer, stop_ids: frozenset[int]):
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.n_words)]
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(stop_ids)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_tokens.values())
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tokenizer.encode(text)


def grammar_tokenizer(tokenizer, stop_ids: frozenset[int] | None = None):
    """llguidance's view of a tokenizer (built once per tokenizer: it reads every token's bytes).
    `stop_ids` (default the tokenizer's) are the tokens that may end a complete output."""
    llg = _llguidance()
    stop_ids = stop_ids if stop_ids is not None else tokenizer.stop_ids
    with _lock:
        cached = _tokenizers.get(id(tokenizer))
        if cached is None or cached[0] is not tokenizer:
            wrapped = _Wrapped(tokenizer, stop_ids)
            lltok = llg.LLTokenizer(llg.TokenizerWrapper(wrapped), n_vocab=tokenizer.n_words,
                                    eos_token=sorted(stop_ids) or None)
            cached = (tokenizer, lltok)
            _tokenizers[id(tokenizer)] = cached
        return cached[1]


class Constraint:
    """One request's grammar state.

    Args:
        lltok: from `grammar_tokenizer`.
        grammar: from `compile_format`.
        vocab_size: the model's output size (may exceed the tokenizer's; the extra ids are never allowed).
    """

    def __init__(self, lltok, grammar: str, vocab_size: int):
        llg = _llguidance()
        self.matcher = llg.LLMatcher(lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise HerdError(f"invalid format: {_short(self.matcher.get_error())}")
        self.vocab_size = vocab_size
        self._n_words = lltok.vocab_size
        self._bitmask = torch.zeros((1, (self._n_words + 31) // 32), dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Bool (vocab_size,): the tokens the grammar allows next."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bitmask)
        if self.matcher.is_error():
            raise HerdError(f"structured output failed: {_short(self.matcher.get_error())}")
        bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little")[: self._n_words]
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, self._n_words)
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        return allowed

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) with the tokens the grammar forbids set to -inf."""
        return logits.masked_fill(~self.allowed().to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise HerdError(f"structured output failed: {_short(self.matcher.get_error() or 'token rejected')}")

    @property
    def done(self) -> bool:
        """Nothing but an end token may follow."""
        return self.matcher.is_stopped()
