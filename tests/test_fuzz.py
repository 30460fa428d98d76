"""Fuzzing within a bounded time (issue 14): schemathesis generates requests from the server's own
OpenAPI schema (request bodies included) and sends them to the real application (real store,
real engine on a tiny random model); hypothesis feeds the Modelfile and GGUF parsers mutated and
random input. Every answer must be a clean one: a 2xx, or a 4xx with `{"error": ...}`; every
parser failure a `HerdError`. The counts of cases run go to test-artifacts/fuzz/counts.json.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llamaherd.errors import HerdError  # noqa: E402
from llamaherd.server.app import Settings, create_app  # noqa: E402
from llamaherd.store import Store  # noqa: E402
from llamaherd.store.modelfile import format_modelfile, parse_modelfile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COUNTS: Counter = Counter()
FOUND: list[str] = []
pytestmark = [pytest.mark.slow, pytest.mark.integration]  # the real SmolLM2 tokenizer; ~40 s
FAST = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


HEADERS = {"Host": "localhost", "Authorization": "Bearer fuzz"}
HOME = Path(tempfile.mkdtemp(prefix="herd-fuzz-"))


def _load_tiny(path):
    """A 2-layer random model with the real SmolLM2 tokenizer, made on the first request."""
    import gguf

    from llamaherd.fetch import smollm2_gguf
    from llamaherd.tokenizer.bpe import gguf_metadata, tokenizer_from_gguf
    from test_trust import tiny_llama_loader

    if "load" not in STATE:
        STATE["load"] = tiny_llama_loader(tokenizer_from_gguf(gguf_metadata(gguf.GGUFReader(smollm2_gguf()))))
    return STATE["load"](path)


def _app():
    """The server over a real store (a tiny GGUF as `tiny`) and a real engine on a tiny model."""
    from llamaherd.engine.models import Engine, EngineConfig, store_resolver
    from test_store import tiny_gguf

    store = Store(HOME, catalog=lambda name: None)  # nothing is downloaded
    tiny_gguf(HOME / "tiny.gguf")
    store.create("tiny", "FROM tiny.gguf\n", base_dir=HOME)
    engine = Engine(store_resolver(store), EngineConfig(num_parallel=2, context_length=32, max_queue=8),
                    loader=_load_tiny)
    # A key: the test client is not on loopback, and management needs a key from elsewhere.
    return create_app(Settings(api_key="fuzz"), engine=engine, store=store)


STATE: dict = {}
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(), headers=HEADERS)
schema.config.phases.coverage.enabled = False  # its thousands of boundary cases: too long for CI here


@pytest.fixture(scope="module", autouse=True)
def counts(smollm2):
    from test_trust import tiny_llama_loader

    STATE["load"] = tiny_llama_loader(smollm2)  # the session's tokenizer (loaded once for the suite)
    yield
    out = ROOT / "test-artifacts" / "fuzz"
    out.mkdir(parents=True, exist_ok=True)
    (out / "counts.json").write_text(json.dumps({"cases": dict(COUNTS), "total": sum(COUNTS.values()),
                                                 "found": FOUND}, indent=2))


@schema.parametrize()
@FAST
def test_every_answer_is_clean(case):
    """No 500, and every 4xx says what is wrong in the API's error shape."""
    key = f"{case.method} {case.path}"
    COUNTS[key] += 1
    using = case.path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show") or \
        case.path.startswith("/v1/")
    if using and isinstance(case.body, dict) and COUNTS[key] % 2:
        case.body["model"] = "tiny"  # every other case reaches the model (the rest: random names)
    response = case.call(headers=HEADERS, timeout=60)
    status = response.status_code
    if status >= 500 and status not in (503, 507):
        FOUND.append(f"{case.method} {case.path}: {status} {response.text[:200]}")
    assert status < 500 or status in (503, 507), response.text
    content_type = (response.headers.get("content-type") or [""])[0]
    if 400 <= status < 500 and content_type.startswith("application/json") and response.text:
        error = response.json()["error"]  # a string, or OpenAI's object with a message
        assert isinstance(error, str) or isinstance(error["message"], str)
    assert Store(HOME).check() == []  # the store is intact after each


# -- the parsers -------------------------------------------------------------------------------------------

MODELFILE_WORDS = st.sampled_from(["FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "LICENSE", "ADAPTER",
                                   "from", "#", '"""', '"', "temperature", "stop", "num_ctx", "user", "nan", "1e309",
                                   "-5", "0", "\n", "\t", " ", "x", "\\", "{{", "}}"])


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@hypothesis.given(st.lists(st.one_of(MODELFILE_WORDS, st.text(max_size=8)), max_size=30).map(" ".join))
def test_modelfile_parser(text):
    """A Modelfile parses, or fails with a HerdError naming the problem; what parses writes back
    to text that parses to the same thing."""
    COUNTS["modelfile parser"] += 1
    try:
        mf = parse_modelfile(text)
    except HerdError as e:
        assert str(e) and "\n" not in str(e).strip() or "Modelfile" in str(e)
        return
    again = parse_modelfile(format_modelfile(mf))
    assert (again.from_, again.parameters, again.template, again.system, again.messages, again.licenses,
            again.adapters) == (mf.from_, mf.parameters, mf.template, mf.system, mf.messages, mf.licenses,
                                mf.adapters)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    from test_store import tiny_gguf

    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "t.gguf", template="{{ messages }}").read_bytes()


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` cut, with bytes flipped, or with a length field made huge: what a damaged file holds."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "big", "zero"]))
        at = draw(st.integers(0, max(0, len(buf) - 1)))
        if kind == "flip" and buf:
            buf[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del buf[at:]
        elif kind == "big" and at + 8 <= len(buf):
            buf[at:at + 8] = draw(st.sampled_from([b"\xff" * 8, (1 << 62).to_bytes(8, "little"),
                                                   (1 << 31).to_bytes(8, "little")]))
        elif kind == "zero" and at + 8 <= len(buf):
            buf[at:at + 8] = bytes(8)
    return bytes(buf)


def test_gguf_readers(gguf_bytes, tmp_path):
    """A damaged GGUF file is refused with a HerdError by the store's header reader and by the
    weights reader, never another exception (nor a hang, nor a huge allocation)."""
    from llamaherd.store.details import model_details
    from llamaherd.formats.gguf import GGUFFile

    path = tmp_path / "m.gguf"

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @hypothesis.given(mutated(gguf_bytes))
    def check(data):
        COUNTS["gguf readers"] += 1
        path.write_bytes(data)
        for read in (model_details, GGUFFile):
            try:
                read(path)
            except HerdError:
                pass
            except Exception as e:  # noqa: BLE001 — a finding
                FOUND.append(f"{read.__name__}: {type(e).__name__}: {e}"[:300])
                raise

    check()
