"""Tokenizer endpoints, as vLLM serves them and lm-evaluation-harness's `local-completions`
backend reads them (`tokenizer_backend=remote`), so it needs no Hugging Face tokenizer download:

    GET  /tokenizer_info            {"eos_token", "bos_token", "pad_token", "chat_template", ...}
    POST /tokenize    {"prompt": "text", "add_special_tokens": true}  ->  {"tokens", "count", "max_model_len"}
    POST /detokenize  {"tokens": [1, 2]}                              ->  {"prompt": "text"}

The model is the request's "model" (a body field, or ?model= for GET); without one, the only
model loaded, else the only model in the store. Special-token text (e.g. "<|im_end|>") reads as
the special token, as in vLLM: clients find the EOS id by tokenizing the EOS text. Only the
tokenizer is read (from the model file, cached), never the weights.
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ..errors import HerdError
from .http import parse_body


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str = Field(description="text to tokenize")
    add_special_tokens: bool = Field(True, description="add BOS when the model's tokenizer adds it")


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int] = Field(description="token ids")


@lru_cache(maxsize=8)
def _tokenizer(path: str, digest: str):
    """The tokenizer of a model file or directory (cached by the model's digest). A GGUF file's
    metadata is read by herd's own reader (`formats.gguf`): gguf's parses every field in Python,
    seconds for a 49k vocabulary on a server's first /tokenize."""
    from ..tokenizer import load_tokenizer

    return load_tokenizer(Path(path))


def _pick(request: Request, model: str | None) -> tuple[Any, str, Any]:
    """(tokenizer, model name, resolved model) for a request."""
    handler = request.app.state.handler
    store = handler._store()
    if not model:
        running = [m.name for m in handler.running()] if handler.engine is not None else []
        if len(running) == 1:
            model = running[0]
        else:
            stored = [m.name for m in store.list()]
            if len(stored) != 1:
                raise HerdError("name the model: \"model\" in the body (or ?model= for GET /tokenizer_info)")
            model = stored[0]
    resolved = store.resolve(model)  # an unknown name is a 404, as everywhere
    return _tokenizer(str(resolved.path), resolved.digest), resolved.name, resolved


def _token_text(tok, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    return tok.token_bytes(token_id).decode("utf-8", "replace")


def routes() -> APIRouter:
    router = APIRouter()

    @router.get("/tokenizer_info")
    async def tokenizer_info(request: Request, model: str | None = None):
        tok, name, resolved = await asyncio.to_thread(_pick, request, model)
        eos = _token_text(tok, tok.eos_id)
        return {"model": name, "tokenizer_class": type(tok).__name__, "eos_token": eos,
                "bos_token": _token_text(tok, tok.bos_id), "pad_token": eos, "add_bos_token": tok.add_bos,
                "chat_template": resolved.template or tok.chat_template, "vocab_size": tok.n_words,
                "model_max_length": resolved.details.get("context_length")}

    @router.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse_body(request, TokenizeRequest)
        tok, name, resolved = await asyncio.to_thread(_pick, request, body.model)
        ids = tok.encode(body.prompt, bos=body.add_special_tokens and tok.add_bos, allow_special=True)
        return {"tokens": ids, "count": len(ids), "max_model_len": resolved.details.get("context_length")}

    @router.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse_body(request, DetokenizeRequest)
        tok, name, _ = await asyncio.to_thread(_pick, request, body.model)
        bad = [t for t in body.tokens if not 0 <= t < tok.n_words]
        if bad:
            raise HerdError(f"token id {bad[0]} is outside the vocabulary (0..{tok.n_words - 1})")
        return {"prompt": tok.decode(body.tokens)}

    return router
