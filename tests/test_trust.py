"""Trust (issue 14): no data lost, no one let in, no request that takes the server down.

Each test is a case a hostile or careless client tried: a damaged manifest before a garbage
collection, a killed upload, a Modelfile injection through /api/create, management from another
machine, option values that break sampling, storage faults, request templates that eat memory or
never end. The store is real (tiny GGUF files); the server is the real app in-process, over a fake
engine where the engine is not the point, over the real engine on a tiny random model where it is.
"""

from __future__ import annotations

import errno
import hashlib
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from llamaherd import cli  # noqa: E402
from llamaherd.errors import HerdError  # noqa: E402
from llamaherd.server.app import Settings, create_app, exposure_warning  # noqa: E402
from llamaherd.store import Store  # noqa: E402
from llamaherd.store.modelfile import parse_modelfile  # noqa: E402
from test_server_api import FakeEngine  # noqa: E402
from test_store import blob_files, file_digest, tiny_gguf  # noqa: E402


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "herd"
    monkeypatch.setenv("HERD_HOME", str(root))
    return root


def two_models(home: Path, tmp_path: Path) -> Store:
    """A store holding `a` and `b`, made from different GGUF files."""
    store = Store()
    tiny_gguf(tmp_path / "a.gguf", seed=1)
    tiny_gguf(tmp_path / "b.gguf", seed=2)
    store.create("a", "FROM a.gguf\nSYSTEM I am a.\n", base_dir=tmp_path)
    store.create("b", "FROM b.gguf\n", base_dir=tmp_path)
    return store


def manifest_of(home: Path, model: str) -> Path:
    return home / "manifests" / "local" / "library" / model / "latest"


def client_for(store, engine=None, client_host="127.0.0.1", **settings) -> TestClient:
    app = create_app(Settings(**settings), engine=engine or FakeEngine(), store=store)
    return TestClient(app, base_url="http://localhost:11434", client=(client_host, 50000))


# -- data loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["newer schema", "truncated", "not json"])
def test_collection_never_deletes_what_an_unreadable_manifest_may_use(home, tmp_path, damage):
    store = two_models(home, tmp_path)
    weights = file_digest(tmp_path / "a.gguf").replace(":", "-")
    path = manifest_of(home, "a")
    text = path.read_text()
    path.write_text({"newer schema": text.replace('"schemaVersion": 2', '"schemaVersion": 3'),
                     "truncated": text[:len(text) // 2], "not json": "\x00garbage"}[damage])
    store.remove("b")  # collects garbage
    assert weights in blob_files(home)
    path.write_text(text)  # repaired: the model is whole again
    assert store.resolve("a").system == "I am a."
    store.remove("a")
    assert blob_files(home) == set()


def test_broken_models_are_listed_with_their_error_and_doctor_says_what_is_wrong(home, tmp_path, capsys):
    store = two_models(home, tmp_path)
    assert cli.main(["doctor"]) == 0
    assert "ok: 2 model(s)" in capsys.readouterr().out

    manifest_of(home, "a").write_text('{"schemaVersion": 3}')
    b = store.resolve("b").path
    b.chmod(0o644)
    data = bytearray(b.read_bytes())
    data[-1] ^= 1
    b.write_bytes(bytes(data))  # bit rot
    entries = {e.name: e for e in store.list()}
    assert set(entries) == {"a:latest", "b:latest"}
    assert "unsupported schemaVersion 3" in entries["a:latest"].error and entries["b:latest"].error is None
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "a:latest" in out and "BROKEN: its manifest is corrupt: unsupported schemaVersion 3" in out

    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("a:latest: its manifest is corrupt") for line in out)
    assert any(line.startswith("b:latest: blob sha256:") and "another sha256" in line for line in out)
    b.unlink()
    assert cli.main(["doctor"]) == 1
    assert "is missing" in capsys.readouterr().out


def test_tags_lists_broken_models_and_a_config_that_is_not_an_object_is_no_500(home, tmp_path):
    store = two_models(home, tmp_path)
    manifest = json.loads(manifest_of(home, "b").read_text())
    config = home / "blobs" / manifest["config"]["digest"].replace(":", "-")
    config.write_text("[1, 2]")  # JSON, but not an object
    manifest_of(home, "a").write_text("{")
    with client_for(store) as c:
        r = c.get("/api/tags")
        assert r.status_code == 200
        models = {m["name"]: m for m in r.json()["models"]}
        assert "not a JSON object" in models["b:latest"]["error"] and "corrupt" in models["a:latest"]["error"]
        assert str(home) not in r.text
        r = c.post("/api/show", json={"model": "b"})
        assert r.status_code == 400 and "not a JSON object" in r.json()["error"]


def test_uploads_are_ordinary_blobs_bounded_and_used_in_place(home, tmp_path):
    store = Store()
    gguf = tiny_gguf(tmp_path / "up.gguf").read_bytes()
    digest = "sha256:" + hashlib.sha256(gguf).hexdigest()
    (home / "blobs").mkdir(parents=True)
    (home / "blobs" / ".upload-killed").write_bytes(b"half an upload")
    with client_for(store, max_body=len(gguf) + 10) as c:
        assert not (home / "blobs" / ".upload-killed").exists()  # cleaned at start
        assert c.head(f"/api/blobs/{digest}").status_code == 404
        assert c.post(f"/api/blobs/{digest}", content=b"other").status_code == 400
        assert c.post(f"/api/blobs/{digest}", content=gguf).status_code == 201
        assert c.head(f"/api/blobs/{digest}").status_code == 200
        assert blob_files(home) == {digest.replace(":", "-")}  # no temp file left, and one copy
        r = c.post("/api/create", json={"model": "up", "files": {"m.gguf": digest}, "stream": False})
        assert r.status_code == 200, r.text
        assert store.resolve("up").path == home / "blobs" / digest.replace(":", "-")
        assert len([b for b in blob_files(home) if (home / "blobs" / b).stat().st_size == len(gguf)]) == 1
        assert not (home / "uploads").exists()
        big = b"GGUF" + bytes(len(gguf) + 100)
        r = c.post("/api/blobs/sha256:" + hashlib.sha256(big).hexdigest(), content=big)
        assert r.status_code == 413
        assert c.request("DELETE", "/api/delete", json={"model": "up"}).status_code == 200
        assert blob_files(home) == set()  # the upload went with the last model using it
        assert c.post(f"/api/blobs/{digest}", content=gguf).status_code == 201
        store.prune()
        assert blob_files(home) == set()  # an upload no model uses is collected
        r = c.post("/api/create", json={"model": "x", "files": {"m.gguf": digest}})
        assert r.status_code == 400 and "upload it first" in r.json()["error"]


def test_storage_faults_are_clear_errors(home, tmp_path, monkeypatch, capsys):
    import llamaherd.store.store as store_module

    store = two_models(home, tmp_path)

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(store_module, "atomic_write", read_only)
    assert cli.main(["cp", "a", "c"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read-only file system" in err
    with client_for(store) as c:
        r = c.post("/api/copy", json={"source": "a", "destination": "c"})
        assert r.status_code == 503 and "read-only" in r.json()["error"] and str(home) not in r.text

        def full(self, tmp, digest):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

        monkeypatch.setattr(Store, "commit_upload", full)
        data = b"GGUF upload"
        r = c.post("/api/blobs/sha256:" + hashlib.sha256(data).hexdigest(), content=data)
        assert r.status_code == 507 and r.json() == {"error": "no space left on the server's disk"}
        assert not list((home / "blobs").glob(".upload-*"))


# -- security --------------------------------------------------------------------------------------------


def test_create_builds_the_model_from_json_without_injection(home, tmp_path):
    store = Store()
    tiny_gguf(tmp_path / "base.gguf")
    store.create("base", "FROM base.gguf\n", base_dir=tmp_path)
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"GGUF secret weights")
    system = f'Be kind.\nADAPTER {secret}\n"""\nPARAMETER temperature 5'
    template = '{{ "\\"\\"\\"" }}{% for m in messages %}{{ m.content }}{% endfor %}\nADAPTER /etc/passwd'
    with client_for(store) as c:
        r = c.post("/api/create", json={
            "model": "evil", "from": "base", "system": system, "template": template,
            "messages": [{"role": "user", "content": 'hi\nMESSAGE system """x'}],
            "parameters": {"stop": ["a\nADAPTER /etc"], "temperature": 0.5}, "stream": False})
        assert r.status_code == 200, r.text
        m = store.resolve("evil")
        assert (m.system, m.template, m.adapters) == (system, template, [])
        assert m.messages == [{"role": "user", "content": 'hi\nMESSAGE system """x'}]
        assert m.params == {"stop": ["a\nADAPTER /etc"], "temperature": 0.5}
        assert file_digest(secret).replace(":", "-") not in blob_files(home)
        for bad, message in [({"parameters": {"temperature\nADAPTER /etc/passwd": 1}}, "unknown option"),
                             ({"parameters": {"stop": [{"a": 1}]}}, "stop must be a string"),
                             ({"parameters": {"temperature": "nan"}}, "temperature must be a finite number"),
                             ({"parameters": {"temperature": -5}}, "temperature must be between 0 and 100"),
                             ({"parameters": {"num_ctx": 10 ** 12}}, "num_ctx"),
                             ({"parameters": {"num_ctx": 1000}}, "exceeds the model's context length 64"),
                             ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
                             ({"template": "{% for %}"}, "invalid chat template")]:
            r = c.post("/api/create", json={"model": "bad", "from": "base", **bad, "stream": False})
            assert r.status_code == 400 and message in r.json()["error"], (bad, r.text)
        assert not store.has("bad")


def test_management_needs_this_machine_or_a_key(home, tmp_path):
    store = two_models(home, tmp_path)
    calls = [("POST", "/api/create", {"model": "x", "from": "a"}), ("DELETE", "/api/delete", {"model": "a"}),
             ("POST", "/api/copy", {"source": "a", "destination": "x"}), ("POST", "/api/pull", {"model": "a"}),
             ("POST", "/api/push", {"model": "a"}), ("POST", "/api/blobs/sha256:" + "0" * 64, None)]
    with client_for(store, client_host="192.168.1.20", host="0.0.0.0") as c:
        for method, path, body in calls:
            r = c.request(method, path, json=body)
            assert r.status_code == 403 and "HERD_API_KEY" in r.json()["error"], path
        assert c.get("/api/tags").status_code == 200  # using models is not management
        assert c.post("/api/generate", json={"model": "a", "prompt": "hi", "stream": False}).status_code == 200
    assert store.has("a")
    with client_for(store, client_host="192.168.1.20", host="0.0.0.0", api_key="k") as c:
        r = c.post("/api/copy", json={"source": "a", "destination": "x"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and store.has("x")
    warning = exposure_warning(Settings(host="0.0.0.0"))
    assert "HERD_API_KEY" in warning and "0.0.0.0:11434" in warning
    assert exposure_warning(Settings()) is None and exposure_warning(Settings(host="0.0.0.0", api_key="k")) is None


def test_pull_of_an_invalid_name_is_a_400_before_streaming(home):
    with client_for(Store()) as c:
        r = c.post("/api/pull", json={"model": "../../etc/passwd"})
        assert r.status_code == 400 and "error" in r.json()
        r = c.post("/api/pull", json={"model": "no-such-model-anywhere"})
        assert r.status_code == 404 and "not in the catalog" in r.json()["error"]


def test_errors_never_show_server_paths(home, tmp_path):
    store = two_models(home, tmp_path)
    blob = store.resolve("a").path

    class Failing(FakeEngine):
        async def generate(self, req):
            raise HerdError(f"{blob} is not a valid GGUF file (truncated); see {home}/models/x")

    with client_for(store, engine=Failing()) as c:
        for path in ("/api/generate", "/v1/completions"):
            r = c.post(path, json={"model": "a", "prompt": "hi", "stream": False})
            assert r.status_code == 400 and str(home) not in r.text and str(tmp_path) not in r.text
            assert "blob sha256:" in r.text and "$HERD_HOME/models/x" in r.text


# -- request templates ------------------------------------------------------------------------------------


def test_request_templates_are_refused_unless_allowed(home):
    engine = FakeEngine()
    body = {"model": "m", "prompt": "hi", "template": "{{ messages }}", "stream": False}
    with client_for(Store(), engine=engine) as c:
        r = c.post("/api/generate", json=body)
        assert r.status_code == 400 and "HERD_ALLOW_REQUEST_TEMPLATES" in r.json()["error"]
    with client_for(Store(), engine=engine, allow_request_templates=True) as c:
        assert c.post("/api/generate", json=body).status_code == 200
    assert engine.requests[-1].template == "{{ messages }}"
    assert Settings.from_env({"HERD_ALLOW_REQUEST_TEMPLATES": "1"}).allow_request_templates


@pytest.mark.parametrize("template, message", [
    ("{{ 'x' * 200000000 }}", "repeats a value"),
    ("{{ [0] * 100000000 }}", "repeats a value"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than 0.5 s"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "made a value"),
    ("{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}", "made a value"),
    ("{{ 'x'|center(1000000000) }}", "passed 1,000,000,000"),
    ("{{ 'x'.ljust(1000000000) }}", "passed 1,000,000,000"),
    ("{{ '%*d' % (1000000000, 1) }}", "passed 1,000,000,000"),
    ("{{ 10 ** 100000 }}", "power too large"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
     "longer than (16,777,216 characters|0.5 s)"),  # whichever comes first (tracemalloc slows it)
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "chat template error"),
])
def test_templates_are_bounded_in_time_and_size(template, message, monkeypatch):
    import tracemalloc

    from llamaherd.chat import sandbox
    from llamaherd.chat.template import JinjaChatTemplate

    monkeypatch.setattr(sandbox, "MAX_SECONDS", 0.5)
    start = time.monotonic()
    # The peak of what the render allocates (not the process's peak RSS, which earlier tests in the
    # same process set): the unbounded templates made 200 MB to 14.7 GB.
    tracemalloc.start()
    try:
        with pytest.raises(HerdError, match=message):
            JinjaChatTemplate(template).render([{"role": "user", "content": "hi"}])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 3
    assert peak < 100 << 20
    assert JinjaChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}").render(
        [{"role": "user", "content": "hi"}]) == "hi"


# -- options -----------------------------------------------------------------------------------------------


BAD_OPTIONS = [({"temperature": 1e-300}, r"temperature must be 0 \(greedy\) or at least"),
               ({"repeat_penalty": 0}, "repeat_penalty must be between"),
               ({"min_p": 5}, "min_p must be between 0 and 1"),
               ({"frequency_penalty": -1e300}, "frequency_penalty must be between"),
               ({"temperature": -5}, "temperature must be between 0 and 100"),
               ({"num_ctx": 10 ** 12}, "num_ctx must be between"),
               ({"stop": [{"a": 1}]}, "stop must be a string"),
               ({"seed": 1 << 70}, "seed must be between")]


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_one_option_validation_for_every_caller(options, message, home, tmp_path):
    from llamaherd.generate import SamplingOptions

    with pytest.raises(HerdError, match=message):
        SamplingOptions.from_dict(options)
    (name, value), = options.items()
    if not isinstance(value, list):
        with pytest.raises(HerdError, match=f"Modelfile line 2: option {message}"):
            parse_modelfile(f"FROM x\nPARAMETER {name} {value}\n")
    tiny_gguf(tmp_path / "t.gguf")
    with pytest.raises(HerdError, match=message):
        Store().create("t", parse_modelfile("FROM t.gguf\n").__class__(from_="t.gguf", parameters=options),
                       base_dir=tmp_path)
    assert not Store().has("t")


def test_nan_in_a_modelfile_is_refused():
    with pytest.raises(HerdError, match="Modelfile line 2: option temperature must be a finite number"):
        parse_modelfile("FROM x\nPARAMETER temperature nan\n")


# -- wrong answers and 500s ---------------------------------------------------------------------------------


def test_a_stop_tokens_logprob_is_reported_for_completions_only(home):
    from llamaherd.engine.types import Delta, Done, TokenLogprob

    class StopsAtOnce(FakeEngine):
        async def generate(self, req):
            gen = await super().generate(req)

            async def events():
                yield Delta("", (), [TokenLogprob(3, -0.25, [(3, -0.25)])])  # the stop token, no text
                yield Done("stop", prompt_eval_count=3, eval_count=0, context=[1, 2, 3])

            gen.__aiter__ = events
            return _Iter(gen, events)

    class _Iter:
        def __init__(self, gen, events):
            self.gen, self.events = gen, events

        def __getattr__(self, name):
            return getattr(self.gen, name)

        def __aiter__(self):
            return self.events()

    with client_for(Store(), engine=StopsAtOnce()) as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": "Hello world", "echo": True, "logprobs": 1,
                                            "max_tokens": 1, "temperature": 0}).json()
        lp = r["choices"][0]["logprobs"]["token_logprobs"]
        assert lp == [None, -1.0, -2.0, -0.25]  # prompt (echoed), then the generated stop token's entry
        assert r["choices"][0]["finish_reason"] == "stop"
        r = c.post("/api/generate", json={"model": "m", "prompt": "hi", "logprobs": True, "stream": False}).json()
        assert r["response"] == "" and "logprobs" not in r


def tiny_llama_loader(tokenizer):
    """path -> a Llama: a 2-layer random model with `tokenizer` (the real SmolLM2 one)."""
    import torch

    from llamaherd.config import ModelArgs
    from llamaherd.llm import Llama
    from llamaherd.model import Transformer

    def load(path):
        torch.manual_seed(0)
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                         hidden_dim=128, max_seq_len=512, tie_embeddings=True)
        model = Transformer(args)
        model.init_weights()
        return Llama(model.eval(), tokenizer, path=path)

    return load


@pytest.fixture(scope="module")
def tiny_loader(smollm2):
    return tiny_llama_loader(smollm2)


def tiny_engine(tiny_loader, **config):
    from llamaherd.engine.models import Engine, EngineConfig, ModelRef

    return Engine(lambda name: ModelRef(name, Path("/models") / name, digest=name), EngineConfig(**config),
                  loader=tiny_loader)


def test_the_scheduler_reports_the_stop_tokens_logprob(tiny_loader):
    import queue

    from llamaherd.engine.scheduler import Job, Scheduler
    from llamaherd.engine.types import Delta, Done
    from llamaherd.generate import SamplingOptions

    llm = tiny_loader("x")
    scheduler = Scheduler(llm.runner, n_rows=1, max_ctx=512)
    try:
        events: queue.Queue = queue.Queue()
        every_token = frozenset(range(llm.tokenizer.n_words))  # whatever comes first is a stop token
        scheduler.submit(Job(llm.encode("Hello"), SamplingOptions.from_dict({"temperature": 0, "num_ctx": 64}),
                             every_token, llm.tokenizer, events.put, logprobs=1))
        first, last = events.get(timeout=60), events.get(timeout=60)
        assert isinstance(first, Delta) and first.text == "" and first.tokens == () and len(first.logprobs) == 1
        assert first.logprobs[0].logprob <= 0 and isinstance(last, Done) and last.reason == "stop"
    finally:
        scheduler.close()


def test_max_queue_holds_under_a_burst(tiny_loader):
    from llamaherd.engine.types import GenerateRequest, QueueFull

    async def run():
        engine = tiny_engine(tiny_loader, num_parallel=2, max_queue=3)
        await engine.start()
        try:
            await engine.load("a")
            req = GenerateRequest(model="a", prompt="hi " * 100, options={"num_predict": 50, "num_ctx": 512})
            results = await asyncio.gather(*(engine.generate(req) for _ in range(20)), return_exceptions=True)
            accepted = [g for g in results if not isinstance(g, BaseException)]
            assert len(accepted) == 2 + 3 and all(isinstance(e, QueueFull) for e in results if e not in accepted)
            for g in accepted:
                g.cancel()
        finally:
            await engine.close()

    import asyncio

    asyncio.run(run())


def test_huge_prompts_are_refused_by_length_before_tokenizing(tiny_loader, monkeypatch):
    import asyncio

    from llamaherd.engine.types import EmbedRequest, GenerateRequest, ScoreRequest

    huge = "word " * 2_000_000  # 10 MB

    async def run():
        engine = tiny_engine(tiny_loader)
        await engine.start()
        try:
            await engine.load("a")
            tok = engine._models["a"].llm.tokenizer
            monkeypatch.setattr(tok, "encode", lambda *a, **k: pytest.fail("tokenized a huge prompt"))
            for req in [GenerateRequest(model="a", prompt=huge), GenerateRequest(model="a", prompt=huge, raw=True),
                        GenerateRequest(model="a", messages=[{"role": "user", "content": huge}])]:
                start = time.monotonic()
                with pytest.raises(HerdError, match="characters.*, more than fit in"):
                    await engine.generate(req)
                assert time.monotonic() - start < 1
            with pytest.raises(HerdError, match="characters"):
                await engine.score(ScoreRequest(model="a", prompt=huge))
            with pytest.raises(HerdError, match="characters"):
                await engine.embed(EmbedRequest(model="a", inputs=[huge], truncate=False))
        finally:
            await engine.close()

    asyncio.run(run())


def test_tool_choice_and_tool_schemas(home):
    engine = FakeEngine()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}]
    body = {"model": "m", "messages": [{"role": "user", "content": "the weather?"}], "tools": tools}
    with client_for(Store(), engine=engine) as c:
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        assert engine.requests[-1].format is None and len(engine.requests[-1].tools) == 2
        assert c.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).status_code == 200
        assert engine.requests[-1].tools is None
        r = c.post("/v1/chat/completions", json={**body, "tool_choice": "required"})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "tool_calls"
        names = [o["properties"]["name"]["const"] for o in engine.requests[-1].format["anyOf"]]
        assert names == ["get_weather", "other"]
        named = {"type": "function", "function": {"name": "get_weather"}}
        assert c.post("/v1/chat/completions", json={**body, "tool_choice": named}).status_code == 200
        assert engine.requests[-1].format["properties"]["name"] == {"const": "get_weather"}
        for bad, message in [({"tool_choice": "sometimes"}, "tool_choice must be"),
                             ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
                             ({"tool_choice": "required", "tools": None}, "needs tools"),
                             ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
                              "parameters must be a JSON schema of type object"),
                             ({"stop": [{"a": 1}]}, "stop")]:
            r = c.post("/v1/chat/completions", json={**body, **bad})
            assert r.status_code == 400 and message in r.json()["error"]["message"], (bad, r.text)
        r = c.post("/api/chat", json={"model": "m", "messages": body["messages"], "stream": False,
                                      "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]})
        assert r.status_code == 400 and "type object" in r.json()["error"]


def test_a_bad_ref_in_a_schema_is_a_short_message():
    pytest.importorskip("llguidance")
    from llamaherd.engine.grammar import compile_format

    for schema in [{"$ref": "#/$defs/nope"}, {"type": "object", "properties": {"a": {"$ref": "http://x/y"}}}]:
        with pytest.raises(HerdError) as e:
            compile_format(schema)
        assert str(e.value).startswith("invalid JSON schema:") and "\n" not in str(e.value)
        assert len(str(e.value)) < 400


# -- slow clients ------------------------------------------------------------------------------------------


def test_slow_clients_are_closed_and_connections_bounded(home):
    import socket
    import threading

    import uvicorn

    from llamaherd.server.app import connection_limits

    settings = Settings(max_connections=8, header_timeout=0.5)
    app = create_app(settings, engine=FakeEngine(), store=Store())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           **connection_limits(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)

        def request() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return c.recv(65536)

        def closed(c: socket.socket, within: float) -> bool:
            c.settimeout(within)
            try:
                return c.recv(1) == b""
            except ConnectionResetError:  # closed with our bytes unread: a reset
                return True
            except socket.timeout:
                return False

        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        for c in slow:
            c.sendall(b"GET /api/version HTTP/1.1\r\nHost: local")  # and then nothing
        time.sleep(0.2)
        # Over the limit of 8: closed at once; the others when their headers are late.
        assert sum(closed(c, 0.05) for c in slow) >= 12
        assert all(closed(c, 2) for c in slow)
        for c in slow:
            c.close()
        time.sleep(0.1)
        assert request().startswith(b"HTTP/1.1 200")
        # A keep-alive connection must send its next request's headers in time too.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = b""
            while not response.endswith(b"}"):  # the whole JSON answer, however it was cut
                response += c.recv(65536)
            assert response.startswith(b"HTTP/1.1 200")
            c.sendall(b"GET /api/version HTTP/1.1\r\n")
            assert closed(c, 3)
    finally:
        server.should_exit = True
        thread.join(10)


def test_embeddings_interleave_with_decoding_and_stop_when_cancelled(tiny_loader):
    import asyncio

    from llamaherd.engine.types import EmbedRequest, GenerateRequest

    async def run():
        engine = tiny_engine(tiny_loader)
        await engine.start()
        try:
            await engine.load("a")
            scheduler = engine._models["a"].scheduler
            gen = await engine.generate(GenerateRequest(model="a", prompt="hi", options={"num_predict": 400}))
            events = gen.__aiter__()
            await events.__anext__()  # decoding
            seen, real_call = [], scheduler.call

            def call(fn):
                seen.append(scheduler.steps)
                return real_call(fn)

            scheduler.call = call
            await engine.embed(EmbedRequest(model="a", inputs=["one two three " * 20] * 6))
            assert len(seen) == 6 and all(b > a for a, b in zip(seen, seen[1:]))  # a step between inputs
            seen.clear()
            task = asyncio.create_task(engine.embed(EmbedRequest(model="a", inputs=["x " * 200] * 50)))
            while len(seen) < 2:
                await asyncio.sleep(0.01)
            task.cancel()  # the client left
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.3)
            assert len(seen) <= 3  # the rest never ran
            gen.cancel()
        finally:
            await engine.close()

    asyncio.run(run())


def test_a_read_only_store_still_serves(home, tmp_path, monkeypatch):
    import llamaherd.store.store as store_module

    store = two_models(home, tmp_path)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store_module, "file_lock", read_only)  # the lock file cannot be made
    with client_for(store) as c:  # the start-up clean-up fails, quietly
        assert [m["name"] for m in c.get("/api/tags").json()["models"]] == ["b:latest", "a:latest"]
        r = c.request("DELETE", "/api/delete", json={"model": "a"})
        assert r.status_code == 503 and "read-only" in r.json()["error"]
