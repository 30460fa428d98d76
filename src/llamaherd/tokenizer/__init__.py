"""Tokenizers: text <-> token ids, behind one interface whatever the model format.

- `llama3.Llama3Tokenizer`: Meta's tiktoken tokenizer (from `tokenizer.model`, or the ranks shipped
  in the quicktok-v1 package).
- `bpe.HFTokenizer`: byte-level BPE from a GGUF file's metadata (`bpe.tokenizer_from_gguf`) or a
  Hugging Face `tokenizer.json` (`bpe.tokenizer_from_hf`).

Chat formats live in `chat`, incremental detokenization in `stream`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import FormatError, HerdError
from ..formats import GGUF_MAGIC
from .bpe import HFTokenizer, gguf_metadata, tokenizer_from_gguf, tokenizer_from_hf
from .llama3 import Llama3Tokenizer


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of llamaherd relies on from a tokenizer.

    Attributes:
        n_words: vocabulary size, special tokens included.
        bos_id: id of the beginning-of-sequence token, if the model has one.
        eos_id: id of the end-of-sequence token, if the model has one.
        stop_ids: ids that end generation (EOS and the end-of-turn/message tokens).
        special_tokens: special-token text -> id.
        add_bos: whether prompts start with BOS by default.
        chat_template: the model's own Jinja chat template, if it ships one.
    """

    n_words: int
    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]
    special_tokens: dict[str, int]
    add_bos: bool
    chat_template: str | None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token text is plain text unless `allow_special`."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text."""
        ...

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes of one token (a special token gives its UTF-8 text)."""
        ...


@cache
def _default_llama3() -> Llama3Tokenizer:
    # Building the 128k-rank encoding takes a moment; tokenizers are read-only, so share one.
    return Llama3Tokenizer.default()


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a name or a path.

    Args:
        spec: `"llama3"` (the Llama 3 tokenizer from the quicktok-v1 ranks); a Meta
            `tokenizer.model`; a `tokenizer.json` or a folder with one (plus
            `tokenizer_config.json` for the chat template, BOS and EOS); a folder with a
            `tokenizer.model`; or a `.gguf` file.
    Returns:
        The tokenizer.
    Raises:
        HerdError: nothing usable at `spec`; FormatError if the file is corrupt or unsupported.
    """
    if str(spec) == "llama3":
        return _default_llama3()
    path = Path(spec)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return tokenizer_from_hf(path)
        if (path / "tokenizer.model").is_file():
            return Llama3Tokenizer.from_file(path / "tokenizer.model")
    elif path.is_file():
        # Tell the formats apart by their first bytes, not by the file name.
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
        if head.startswith(b"{"):
            return tokenizer_from_hf(path)
        if head.startswith(GGUF_MAGIC):
            from ..formats.gguf import GGUFFile  # numpy only: no torch import

            return tokenizer_from_gguf(GGUFFile(path).metadata)
        return Llama3Tokenizer.from_file(path)
    raise HerdError(f"no tokenizer found at {spec}")


__all__ = ["Tokenizer", "load_tokenizer", "Llama3Tokenizer", "HFTokenizer", "tokenizer_from_gguf",
           "tokenizer_from_hf", "gguf_metadata"]
