"""Loading a model for the engine: `LoadedModel` is a checkpoint's model, its tokenizer and its
runner (the backend, chosen once at load), with what the engine needs besides the batch loop:
prompt tokens, chat prompts fitted to a context, teacher-forced logits. The facade
`llamaherd.llm.Llama` is a `LoadedModel` that also generates; the engine depends only on this.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import HerdError
from .runner import make_runner


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LoadedModel:
    """A checkpoint loaded for the engine: the model, its tokenizer, and its runner (the backend,
    chosen once), with prompt building and teacher-forced logits. `llamaherd.llm.Llama` adds
    generation on top; the server's engine holds these."""

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

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
             quantized: bool | None = None, quantize: str | None = None,
             kv_cache_type: str | None = None) -> "LoadedModel":
        """Load a `.gguf` file, a Hugging Face directory or a Meta checkpoint directory.

        Args:
            device: "cpu" or "cuda"; default CUDA when there is one.
            dtype: float dtype of unquantized weights; default bf16 on CUDA, float32 on CPU.
            quantized: keep GGUF weights 4/8-bit (default): on a CPU, the native block kernels
                (or torch's int4/int8 ones), where it also keeps a 16-bit Hugging Face or Meta
                checkpoint's weights as stored for the native kernels' float path when no dtype is
                given; on CUDA, Q4_0/Q4_1/Q4_K projections in torch's int4 layers (tinygemm) and
                the other types in `dtype`. Off gives the reference path: weights dequantized to
                `dtype` (the default on other devices).
            quantize: "q8_0", "q4_0" or "q4_k" (llama.cpp's Q4_K_M mix): quantize any checkpoint
                (a Hugging Face directory...) at load into GGUF blocks for the native CPU kernels.
            kv_cache_type: the KV cache's element type, "f32", "f16" or "q8_0" (llama.cpp's
                --cache-type-k/v); default HERD_KV_CACHE_TYPE, else f32 (a 16-bit model: its own
                dtype). q8_0 needs the native CPU kernels (a GGUF block model); elsewhere it
                becomes f16.
        """
        from ..weights import build_model, load_checkpoint

        start = time.perf_counter()
        device = device or default_device()
        # A 16-bit Hugging Face / Meta checkpoint on the CPU, no dtype asked: its weights as stored,
        # on the native kernels' float path (as llama.cpp runs an F16 GGUF); see load_checkpoint.
        float_blocks = quantized is not False and device == "cpu" and dtype is None and quantize is None
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        # torch's int4 kernels (tinygemm) are built for compute capability 8.0 (Ampere) and later;
        # older GPUs (T4, V100) take the bf16 path.
        gpu = device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 0)
        if quantized is None:
            quantized = device == "cpu" or gpu
        if quantize is not None and not device.startswith("cpu"):
            raise HerdError(f"quantize={quantize!r} is for the CPU (its kernels are CPU ones), not {device}")
        ckpt = load_checkpoint(path, dtype, quantized=quantized, quantize=quantize, gpu=gpu,
                               float_blocks=float_blocks)
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
        from ..chat.template import format_prompt

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

    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits (T, V) in float32 for a token sequence, teacher-forced, without the KV cache."""
        return self.runner.logits(list(tokens))
