"""What goes into the engine and what comes out of it: requests, streamed events, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from ..errors import HerdError, ModelNotFound, Unsupported  # noqa: F401 — part of the engine's interface


class QueueFull(HerdError):
    """Too many requests are waiting (HTTP 503); the client should retry later."""


# -- requests ---------------------------------------------------------------------------------


@dataclass
class GenerateRequest:
    """One generation, whichever API it came from.

    Exactly one of `messages` (a chat) or `prompt` (text, or token ids) is set.
    """

    model: str
    messages: list[dict[str, Any]] | None = None  # chat messages: role, content, tool_calls, ...
    tools: list[dict[str, Any]] | None = None  # OpenAI/Ollama function definitions
    prompt: str | list[int] | None = None  # text (templated unless raw) or token ids (used as they are)
    system: str | None = None  # /api/generate: system message
    template: str | None = None  # a chat template to use instead of the model's
    raw: bool = False  # /api/generate: the prompt is complete, no template
    suffix: str | None = None  # fill-in-the-middle: text after the insertion
    context: list[int] | None = None  # /api/generate (deprecated): tokens of the previous exchange
    options: dict[str, Any] = field(default_factory=dict)  # Ollama-style options (SamplingOptions)
    format: str | dict[str, Any] | None = None  # "json" or a JSON schema: constrained decoding
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and k alternatives
    keep_alive: float | None = None  # seconds to keep the model loaded after this request; None: default
    # False: the caller reads the reply whole, so its pieces come with the end in one hand-over
    # instead of waking the server's event loop for every token (a thread that competes with the
    # decode step's threads for the CPU)
    stream: bool = True


@dataclass
class EmbedRequest:
    model: str
    inputs: list[str | list[int]]
    truncate: bool = True  # cut inputs to the context length instead of failing
    options: dict[str, Any] = field(default_factory=dict)
    keep_alive: float | None = None
    dimensions: int | None = None  # keep the first n dimensions (then re-normalise)


@dataclass
class ScoreRequest:
    """Teacher-forced log-probabilities of a prompt's tokens (OpenAI completions `echo` + `logprobs`)."""

    model: str
    prompt: str | list[int]
    top: int = 0  # alternatives per position
    keep_alive: float | None = None


# -- results ----------------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before penalties and filtering)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the k most likely tokens, best first


@dataclass
class Delta:
    """New output: text safe to show (may be empty while a stop string might be starting) and the
    tokens it came from."""

    text: str
    tokens: tuple[int, ...] = ()
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Done:
    """The end of a generation, with Ollama's statistics (durations in nanoseconds)."""

    reason: str  # "stop": stop token or string, or the grammar is complete; "length": num_predict or num_ctx
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    load_duration: int = 0
    context: list[int] = field(default_factory=list)  # prompt + generated tokens (Ollama's `context`)


@dataclass
class EmbedResult:
    embeddings: list[list[float]]
    prompt_eval_count: int
    load_duration: int = 0


@dataclass
class ScoreResult:
    tokens: list[int]
    logprobs: list[TokenLogprob | None]  # None for the first token: nothing comes before it
    load_duration: int = 0
    token_bytes: Callable[[int], bytes] | None = None  # a token's text, for the response


@dataclass
class RunningModel:
    """A loaded model, as /api/ps shows it."""

    name: str
    digest: str
    size: int  # bytes in memory: weights and KV cache
    expires_at: float  # Unix time; inf: kept until unloaded
    context_length: int  # the context in use (the latest request's num_ctx)
    details: dict[str, Any] = field(default_factory=dict)
    size_vram: int = 0  # bytes of it in GPU memory
