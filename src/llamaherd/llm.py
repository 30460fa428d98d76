"""`Llama`: a loaded model with its tokenizer — the object `llamaherd.load()` returns.

    llm = llamaherd.load("SmolLM2-135M-Instruct.Q4_1.gguf")
    for text in llm.chat([{"role": "user", "content": "Hi!"}], temperature=0):
        print(text, end="")

`stream()` is the one code path: it runs the server's batch loop (`engine.scheduler`, one row) and
yields `Chunk`s (text plus token ids) and a last chunk with Ollama's statistics, so every option
(stop strings, penalties, `format`, logprobs, `speculate`) works as in the server. `generate()` and
`chat()` are views of it that yield only text.

Context rule: a prompt that does not fit `num_ctx` is an error for `generate`; `chat` keeps the
system messages and the newest messages that fit in three quarters of `num_ctx` (the last message
always; if even that does not fit, it is an error). Generation stops when the context is full
(`done_reason` "length").
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import HerdError
from .generate import SamplingOptions
from .engine.runner import make_runner
from .engine.scheduler import Job, Scheduler
from .engine.types import Done


@dataclass
class Chunk:
    """A piece of streamed output; the last one has `done=True` and the statistics (durations in ns)."""

    text: str = ""
    tokens: tuple[int, ...] = ()
    done: bool = False
    done_reason: str | None = None  # "stop" (stop token or string) or "length" (num_predict / num_ctx)
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    logprobs: tuple = ()  # engine.types.TokenLogprob of each token, when asked for


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Llama:
    def __init__(self, model, tokenizer, *, path: Path | None = None, format: str = "",
                 metadata: dict | None = None, load_duration: float = 0.0, kv_cache_type: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.args = model.args
        self.path = path
        self.format = format
        self.metadata = metadata or {}
        self.load_duration = load_duration  # seconds
        self.runner = make_runner(model, kv_cache_type)  # the backend, chosen once
        self._scheduler: Scheduler | None = None  # made on first use (`scheduler`)
        self._lltok = None  # llguidance's view of the tokenizer, made on first `format`

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
             quantized: bool | None = None, quantize: str | None = None,
             kv_cache_type: str | None = None) -> "Llama":
        """Load a `.gguf` file, a Hugging Face directory or a Meta checkpoint directory.

        Args:
            device: "cpu" or "cuda"; default CUDA when there is one.
            dtype: float dtype of unquantized weights; default bf16 on CUDA, float32 on CPU.
            quantized: keep GGUF weights 4/8-bit (fast CPU kernels, bf16 matmul inputs); default
                on for CPU, where it also keeps a 16-bit Hugging Face or Meta checkpoint's weights
                as stored for the native kernels' float path when no dtype is given. Off gives the
                reference path: weights dequantized to `dtype`.
            quantize: "q8_0", "q4_0" or "q4_k" (llama.cpp's Q4_K_M mix): quantize any checkpoint
                (a Hugging Face directory...) at load into GGUF blocks for the native CPU kernels.
            kv_cache_type: the KV cache's element type, "f32", "f16" or "q8_0" (llama.cpp's
                --cache-type-k/v); default HERD_KV_CACHE_TYPE, else f32 (a 16-bit model: its own
                dtype). q8_0 needs the native CPU kernels (a GGUF block model); elsewhere it
                becomes f16.
        """
        from .weights import build_model, load_checkpoint

        start = time.perf_counter()
        device = device or default_device()
        # A 16-bit Hugging Face / Meta checkpoint on the CPU, no dtype asked: its weights as stored,
        # on the native kernels' float path (as llama.cpp runs an F16 GGUF); see load_checkpoint.
        float_blocks = quantized is not False and device == "cpu" and dtype is None and quantize is None
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if quantized is None:
            quantized = device == "cpu"
        if quantize is not None and not device.startswith("cpu"):
            raise HerdError(f"quantize={quantize!r} is for the CPU (its kernels are CPU ones), not {device}")
        ckpt = load_checkpoint(path, dtype, quantized=quantized, quantize=quantize, float_blocks=float_blocks)
        model = build_model(ckpt.args, ckpt.state_dict, device, ckpt.quantized)
        return cls(model, ckpt.tokenizer, path=ckpt.path, format=ckpt.format, metadata=ckpt.metadata,
                   load_duration=time.perf_counter() - start, kv_cache_type=kv_cache_type)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- prompts ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Raw prompt tokens: BOS (when the model wants one) and the text, special tokens as text."""
        return self.tokenizer.encode(text, bos=self.tokenizer.add_bos)

    def encode_chat(self, messages: Sequence[dict[str, Any]], template: str | None = None,
                    add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Chat prompt tokens, rendered with the model's chat template (or `template`), with
        `tools` (function definitions) for templates that render them."""
        from .chat.template import format_prompt

        if not messages:
            raise HerdError("messages must not be empty")
        return format_prompt(self.tokenizer, list(messages), add_generation_prompt, template, tools=tools)

    def fit_chat(self, messages: Sequence[dict[str, Any]], num_ctx: int, template: str | None = None,
                 tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Chat prompt tokens that fit in 3/4 of the context: drop the oldest non-system messages if needed."""
        budget = num_ctx - num_ctx // 4
        messages = list(messages)
        while True:
            tokens = self.encode_chat(messages, template, tools=tools)
            if len(tokens) <= budget:
                return tokens
            droppable = [i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"]
            if not droppable:
                raise HerdError(f"the last message is {len(tokens)} tokens with the system prompt, which does "
                                f"not fit the context of {num_ctx} (raise num_ctx or shorten it)")
            del messages[droppable[0]]

    def options(self, options: SamplingOptions | dict | None = None, **kwargs) -> SamplingOptions:
        if isinstance(options, SamplingOptions):
            opts = options
        else:
            opts = SamplingOptions.from_dict({**(options or {}), **kwargs})
        if opts.num_ctx is None:
            opts.num_ctx = min(4096, self.args.max_seq_len)
        if opts.num_ctx > self.args.max_seq_len:
            raise HerdError(f"num_ctx {opts.num_ctx} exceeds the model's context length {self.args.max_seq_len}")
        return opts

    # -- generation -------------------------------------------------------------------------

    @property
    def scheduler(self) -> Scheduler:
        """The server's batch loop (`engine.scheduler.Scheduler`) over this model, one row: every
        generation from Python and `herd run` goes through it, as every server request does."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self.runner, n_rows=1, max_ctx=self.args.max_seq_len,
                                        name=self.path.name if self.path else "model")
        return self._scheduler

    def close(self) -> None:
        """Stop the batch loop's thread (a later generation starts it again)."""
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None

    def constraint(self, format: str | dict[str, Any]):
        """The grammar constraint (`engine.grammar.Constraint`) for a `format`: "json" or a JSON schema."""
        from .engine import grammar

        compiled = grammar.compile_format(format)
        if self._lltok is None:
            self._lltok = grammar.grammar_tokenizer(self.tokenizer)
        return grammar.Constraint(self._lltok, compiled, self.args.vocab_size)

    def stream(self, prompt: Sequence[int], opts: SamplingOptions, *, format: str | dict | None = None,
               logprobs: int | None = None) -> Iterator[Chunk]:
        """Generate after the prompt tokens; yield text chunks, then a final chunk with statistics.

        Args:
            prompt: the prompt's token ids.
            opts: sampling options (`options()`): stop strings, penalties, seed, `speculate`...
            format: constrain the output to JSON ("json") or to a JSON schema (a dict).
            logprobs: None, or k >= 0: each chunk carries its tokens' logprobs and k best alternatives.

        Stop strings are honoured across chunk boundaries: text that could be the start of a stop
        string is held back until it is known not to be one. A prompt that starts with the previous
        one's prompt reuses its keys and values (see `Scheduler`), with the same result.
        """
        events: queue.SimpleQueue = queue.SimpleQueue()
        constraint = self.constraint(format) if format not in (None, "") else None
        job = Job(list(prompt), opts, self.tokenizer.stop_ids, self.tokenizer, events.put,
                  logprobs=logprobs, constraint=constraint)
        loop = self.scheduler
        loop.submit(job)
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Done):
                    yield Chunk(done=True, done_reason=event.reason,
                                prompt_eval_count=len(job.prompt) - job.reused,
                                prompt_eval_duration=event.prompt_eval_duration, eval_count=event.eval_count,
                                eval_duration=event.eval_duration)
                    return
                yield Chunk(event.text, tuple(event.tokens), logprobs=tuple(event.logprobs or ()))
        finally:
            if not job.finished:
                loop.cancel(job)

    def generate(self, prompt: str, *, raw: bool = False, system: str | None = None,
                 template: str | None = None, format: str | dict | None = None, **options) -> Iterator[str]:
        """Stream the reply to `prompt`. As Ollama's /api/generate: the prompt is wrapped in the chat
        template as a user message unless `raw`; `format`: "json" or a JSON schema. Options: see
        `SamplingOptions`."""
        opts = self.options(**options)
        if raw:
            ids = self.encode(prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = self.encode_chat(messages, template)
        for chunk in self.stream(ids, opts, format=format):
            if chunk.text:
                yield chunk.text

    def chat(self, messages: Sequence[dict[str, Any]], *, template: str | None = None,
             format: str | dict | None = None, **options) -> Iterator[str]:
        """Stream the assistant's reply to `messages` ({"role", "content"} dicts); `format`: "json"
        or a JSON schema."""
        opts = self.options(**options)
        for chunk in self.stream(self.fit_chat(messages, opts.num_ctx, template), opts, format=format):
            if chunk.text:
                yield chunk.text

    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits (T, V) in float32 for a token sequence, teacher-forced, without the KV cache."""
        return self.runner.logits(list(tokens))

