"""llamaherd: the Llama 3 system in Python.

    import llamaherd
    llm = llamaherd.load("model.gguf")          # or a HF / Meta checkpoint directory
    print("".join(llm.chat([{"role": "user", "content": "Hi"}], temperature=0)))
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

__all__ = ["load", "load_tokenizer", "HerdError", "__version__"]

from .errors import HerdError


def load(path: str | Path, device: str | None = None, dtype=None, quantized: bool | None = None):
    """Load a model (`.gguf` file, Hugging Face or Meta directory); returns a `llamaherd.llm.Llama`.
    See `Llama.load` for the arguments."""
    from .llm import Llama

    return Llama.load(path, device=device, dtype=dtype, quantized=quantized)


def load_tokenizer(spec: str | Path = "llama3"):
    """A tokenizer: "llama3" (Meta's, offline), a `tokenizer.model`, or a `tokenizer.json` / directory."""
    from .tokenizer import load_tokenizer as _load

    return _load(spec)
