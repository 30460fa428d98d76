"""llamaherd: the Llama 3 system in Python.

    import llamaherd
    llm = llamaherd.load("smollm2:135m")        # a store name, a .gguf file, or a HF / Meta directory
    print("".join(llm.chat([{"role": "user", "content": "Hi"}], temperature=0)))
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

__all__ = ["load", "load_tokenizer", "HerdError", "__version__"]

import os as _os

from . import settings as _settings
from .errors import HerdError

# Before anything imports torch, whose OpenMP runtime reads these once: see settings.openmp_env.
# (A program that imported torch first keeps the runtime's defaults.)
_os.environ.update(_settings.openmp_env())


def load(model: str | Path, device: str | None = None, dtype=None, quantized: bool | None = None,
         quantize: str | None = None, kv_cache_type: str | None = None):
    """Load a model; returns a `llamaherd.llm.Llama` (see `Llama.load` for the other arguments).

    Args:
        model: a name in the store (`smollm2:135m`, pulled first if the catalog knows it, as
            `herd run` does), or a `.gguf` file, a Hugging Face or a Meta checkpoint directory.
        quantize: "q8_0", "q4_0" or "q4_k": quantize the weights at load for the native CPU kernels.
    """
    from .llm import Llama
    from .resolve import resolve_model

    if quantize is not None:
        from .quantize.blocks import check_scheme

        check_scheme(quantize)  # before a pull
    return Llama.load(resolve_model(model).path, device=device, dtype=dtype, quantized=quantized,
                      quantize=quantize, kv_cache_type=kv_cache_type)


def load_tokenizer(spec: str | Path = "llama3"):
    """A tokenizer: "llama3" (Meta's, offline), a `tokenizer.model`, or a `tokenizer.json` / directory."""
    from .tokenizer import load_tokenizer as _load

    return _load(spec)
