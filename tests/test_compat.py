"""Drop-in compatibility, in-process over the fake engine of tests/test_server_api.py: the Host,
Origin and content-type checks (as Ollama's, Docker Desktop's host.docker.internal included),
Ollama's field names and values, OpenAI's error shapes, and the Responses API driven by the
official `openai` client. (tests/test_compat_serve.py runs the real clients against `herd serve`.)"""

import json
import socket

import openai
import pytest
from fastapi.testclient import TestClient

from llamaherd.server.access import host_allowed
from llamaherd.server.app import Settings, create_app
from test_server_api import WEATHER, FakeEngine, FakeStore


@pytest.fixture
def engine():
    return FakeEngine()


def make_client(engine, tmp_path, **settings):
    # A client on this machine: model management (blobs, create...) is refused to other machines.
    return TestClient(create_app(Settings(**settings), engine=engine, store=FakeStore(tmp_path)),
                      base_url="http://localhost:11434", client=("127.0.0.1", 50000))


@pytest.fixture
def client(engine, tmp_path):
    with make_client(engine, tmp_path) as c:
        yield c


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}


# -- Host (DNS rebinding) -----------------------------------------------------------------------

@pytest.mark.parametrize("host", [
    "host.docker.internal:11434",  # Docker Desktop: Open WebUI in a container
    "gateway.docker.internal", "mybox.local:11434", "app.localhost", "localhost", "127.0.0.1:11434",
    "[::1]:11434", "192.168.1.20:11434", "10.0.0.7", "172.17.0.1:11434", "169.254.10.1", "[fd00::1]:11434",
    "0.0.0.0:11434", socket.gethostname()])
def test_local_names_and_private_addresses_are_accepted_on_loopback(client, host):
    assert host_allowed(host)
    assert client.get("/api/tags", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:11434", "localhost.evil.example",
                                  "8.8.8.8:11434", "internal.evil.com"])
def test_public_names_are_refused_on_loopback(client, engine, host):
    r = client.post("/api/chat", json=CHAT, headers={"Host": host})
    assert r.status_code == 403 and "forbidden host" in r.json()["error"]
    assert engine.requests == []  # nothing ran


# -- Origin (cross-site requests) and content type ----------------------------------------------

@pytest.mark.parametrize("origin", ["app://obsidian.md", "tauri://localhost", "vscode-webview://1a2b3c",
                                    "vscode-file://vscode-app", "chrome-extension://abcdefghijklmnop",
                                    "moz-extension://0a1b-2c3d", "file://", "http://localhost:3000",
                                    "https://127.0.0.1", "http://0.0.0.0:8080"])
def test_ollamas_default_origins_get_cors_headers(client, origin):
    pre = client.options("/api/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
    r = client.post("/api/chat", json=CHAT, headers={"Origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin


def test_a_disallowed_origin_is_refused_before_anything_runs(client, engine, tmp_path):
    for method, path, body in [("POST", "/api/chat", CHAT), ("POST", "/api/copy", {"source": "smol", "destination": "x"}),
                               ("POST", "/api/pull", {"model": "smol"}), ("DELETE", "/api/delete", {"model": "smol"}),
                               ("GET", "/api/tags", None)]:
        r = client.request(method, path, json=body, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and "not allowed" in r.json()["error"], path
        assert "access-control-allow-origin" not in r.headers
    assert engine.requests == [] and engine.loaded == {}
    pre = client.options("/api/chat", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403
    # the same origin as the Host (the chat page, on whatever address it was opened) is not cross-site
    with make_client(engine, tmp_path, host="0.0.0.0") as c:
        r = c.post("/api/chat", json=CHAT, headers={"Host": "192.168.1.20:11434", "Origin": "http://192.168.1.20:11434"})
        assert r.status_code == 200
    with make_client(engine, tmp_path, origins=["https://*.example.com"]) as c:
        assert c.post("/api/chat", json=CHAT, headers={"Origin": "https://app.example.com"}).status_code == 200
    with make_client(engine, tmp_path, origins=["*"]) as c:
        assert c.post("/api/chat", json=CHAT, headers={"Origin": "https://anything.net"}).status_code == 200


def test_json_endpoints_take_json_bodies_only(client, engine):
    body = json.dumps(CHAT)
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "multipart/form-data; boundary=x"):
        r = client.post("/api/chat", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 415 and "application/json" in r.json()["error"]
        r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"  # OpenAI's shape
    # a form a web page posts (it carries an Origin, even an allowed one) is not JSON either
    r = client.post("/api/chat", content=body, headers={"Content-Type": "application/x-www-form-urlencoded",
                                                        "Origin": "http://localhost:3000"})
    assert r.status_code == 415
    assert engine.requests == []
    # JSON, curl -d (form-encoded, no Origin) and a body without a type from a non-browser client run
    for headers in ({"Content-Type": "application/json; charset=utf-8"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
        assert client.post("/api/chat", content=body, headers=headers).status_code == 200
    assert client.post("/api/blobs/sha256:" + "0" * 64, content=b"x",
                       headers={"Content-Type": "application/octet-stream"}).status_code == 400  # digest, not type


# -- Ollama's fields ------------------------------------------------------------------------------

def test_whole_number_floats_are_integers(client, engine):
    r = client.post("/api/chat", json={**CHAT, "options": {"num_ctx": 2048.0, "num_predict": 100.0, "seed": 7.0,
                                                           "top_k": 40.0}})
    assert r.status_code == 200
    opts = engine.requests[-1].options
    assert opts["num_ctx"] == 2048 and type(opts["num_ctx"]) is int and type(opts["num_predict"]) is int
    r = client.post("/api/chat", json={**CHAT, "options": {"num_ctx": 2048.5}})
    assert r.status_code == 400 and "num_ctx" in r.json()["error"]


def test_version_is_one_clients_accept(client):
    from llamaherd import __version__

    v = client.get("/api/version").json()
    assert tuple(int(x) for x in v["version"].split(".")) >= (0, 13, 3)  # /v1/responses came in 0.13.3
    assert v["llamaherd"] == __version__


def test_not_found_wording_and_statistics(client, engine):
    r = client.post("/api/chat", json={**CHAT, "model": "missing"})
    assert r.status_code == 404 and r.json()["error"] == 'model "missing" not found, try pulling it first'


def test_show_capabilities_and_modified_at(client):
    show = client.post("/api/show", json={"model": "smol:latest"}).json()
    assert "embedding" not in show["capabilities"] and show["capabilities"][:2] == ["completion", "tools"]
    assert show["modified_at"].startswith("1970-01-01T00:00:00")
    assert "tools" in show["template"].lower()  # what litellm looks for


def test_keep_alive_reaches_the_engine_per_request(client, engine):
    client.post("/api/chat", json={**CHAT, "keep_alive": "1h"})
    client.post("/api/chat", json=CHAT)
    assert [r.keep_alive for r in engine.requests] == [3600.0, None]  # None: the server's default


# -- OpenAI's error shapes ----------------------------------------------------------------------

def test_openai_errors_have_openai_types_and_codes(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "missing"})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/chat/completions", json={**CHAT, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    for method, path in [("POST", "/v1/no-such-thing"), ("GET", "/v1/assistants")]:
        r = client.request(method, path, json={})
        err = r.json()["error"]
        assert r.status_code == 404 and err["type"] == "invalid_request_error" and err["code"] == "unknown_url"
        assert err["message"] == f"Invalid URL ({method} {path})"
    oai = openai.OpenAI(base_url="http://localhost:11434/v1", api_key="x", http_client=client, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


# -- the Responses API, through the official client ------------------------------------------------

@pytest.fixture
def oai(client):
    return openai.OpenAI(base_url="http://localhost:11434/v1", api_key="x", http_client=client, max_retries=0)


def test_responses_text_instructions_and_previous_response(oai, engine):
    r = oai.responses.create(model="m", input="hi", instructions="Be brief.")
    assert r.status == "completed" and r.output_text == "Hello world!" and r.id.startswith("resp_")
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens == 2 and r.usage.output_tokens == 3 and r.usage.total_tokens == 5
    assert engine.requests[-1].messages == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "hi"}]
    follow = oai.responses.create(model="m", previous_response_id=r.id,
                                  input=[{"role": "user", "content": [{"type": "input_text", "text": "again"}]}])
    assert follow.previous_response_id == r.id
    assert engine.requests[-1].messages == [  # the instructions belong to the first response only
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello world!"},
        {"role": "user", "content": "again"}]
    assert oai.responses.retrieve(r.id).output_text == "Hello world!"
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="m", input="hi", previous_response_id="resp_nope")
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="missing", input="hi")


def test_responses_streaming_events(oai):
    events = list(oai.responses.create(model="m", input="hi", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello world!"
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta") < \
        kinds.index("response.output_text.done") < kinds.index("response.output_item.done")
    assert events[-1].response.output_text == "Hello world!"


def test_responses_tools_and_function_call_outputs(oai, engine):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
              "parameters": WEATHER[0]["function"]["parameters"]}]
    r = oai.responses.create(model="m", input="weather in Paris?", tools=tools)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert engine.requests[-1].tools[0]["function"]["name"] == "get_weather"
    follow = oai.responses.create(model="m", previous_response_id=r.id, tools=tools, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}])
    assert engine.requests[-1].messages[-2:] == [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18C"}]
    assert follow.status == "completed"
    streamed = list(oai.responses.create(model="m", input="weather in Paris?", tools=tools, stream=True))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}
    assert streamed[-1].response.output[0].type == "function_call"
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model="m", input="hi", tools=[{"type": "web_search"}])


# -- the context policy and the KV cache's memory, on a tiny model --------------------------------

@pytest.fixture(scope="module")
def tiny_loader(smollm2):
    """path -> a Llama: a 2-layer random float model trained (so to speak) for 512 positions."""
    import torch

    from llamaherd.config import ModelArgs
    from llamaherd.llm import Llama
    from llamaherd.model import Transformer

    def load(path):
        torch.manual_seed(0)
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=smollm2.n_words, hidden_dim=128,
                         max_seq_len=512, tie_embeddings=True)
        model = Transformer(args)
        model.init_weights()
        return Llama(model.eval(), smollm2, path=path)

    return load


def run_engine(tiny_loader, work, **config):
    """Run `work(engine)` on an Engine over the tiny model (every name resolves to it)."""
    import asyncio

    from llamaherd.engine.models import Engine, EngineConfig, ModelRef

    async def main():
        engine = Engine(lambda name: ModelRef(name, f"/models/{name}", digest=name), EngineConfig(**config),
                        loader=tiny_loader)
        await engine.start()
        try:
            return await work(engine)
        finally:
            await engine.close()

    return asyncio.run(main())


async def finish(gen):
    return [e async for e in gen][-1]


def chat(text, **options):
    from llamaherd.engine.types import GenerateRequest

    return GenerateRequest(model="t", messages=[{"role": "user", "content": text}],
                           options={"temperature": 0, "num_predict": 2, **options})


def test_num_ctx_is_clamped_and_a_long_prompt_grows_the_context(tiny_loader, caplog):
    long = "word " * 300  # ~300 tokens: more than 3/4 of the default 256 below, less than 512

    async def work(engine):
        clamped = await engine.generate(chat("hi", num_ctx=32768, num_predict=100000))  # accepted
        clamped.cancel()  # (a random model would go on to the end of the context)
        grown = await engine.generate(chat(long))
        done = await finish(grown)
        capped = await engine.generate(chat("hi", num_ctx=100000))
        await finish(capped)
        return clamped.num_ctx, grown.num_ctx, len(grown.prompt), done.prompt_eval_count, engine.running()[0]

    with caplog.at_level("WARNING", logger="llamaherd.engine"):
        clamped, grown, n_prompt, evaluated, running = run_engine(tiny_loader, work, context_length=256)
    assert clamped == 512 and "num_ctx 32768 clamped to 512" in caplog.text
    assert 256 < grown <= 512 and n_prompt + 256 // 4 <= grown and evaluated == n_prompt  # nothing cut
    assert running.context_length == 512  # the context in use: the latest request's

    async def limited(engine):
        gen = await engine.generate(chat("hi", num_ctx=100000))
        await finish(gen)
        with pytest.raises(Exception, match="does not fit"):
            await engine.generate(chat("word " * 600))  # longer than any context allowed
        return gen.num_ctx

    assert run_engine(tiny_loader, limited, max_context=384) == 384  # HERD_MAX_CONTEXT caps it


def test_kv_memory_follows_rows_and_is_reserved_against_max_memory(tiny_loader):
    from llamaherd.engine import kvcache
    from llamaherd.engine.types import QueueFull
    from llamaherd.errors import HerdError

    async def work(engine):
        first = await engine.generate(chat("word " * 100, num_predict=1))
        await finish(first)
        loaded = engine._models["t"]
        s, bpp = loaded.scheduler, kvcache.bytes_per_position(loaded.llm.model)
        assert kvcache.is_lazy(loaded.llm.model) and s.capacity >= 128
        # memory held: the positions rows hold (the kept prompt prefix), not 16 rows × the capacity
        assert s.kv_bytes() == sum(len(k) for k in s._kept) * bpp < s.capacity * bpp
        # the context is clamped to what the memory holds; a prompt longer than that cannot run: 400
        engine.config.max_memory = loaded.size + 100 * bpp
        small = await engine.generate(chat("hi", num_ctx=512))
        await finish(small)
        assert small.num_ctx == 100
        with pytest.raises(HerdError, match="does not fit") as e:
            await engine.generate(chat("word " * 150))
        assert not isinstance(e.value, QueueFull)
        # a request's context (prompt + num_predict, at most num_ctx) is reserved while it runs: one
        # that fits alone but not beside it gets 503, and runs once that one is gone
        engine.config.max_memory = loaded.size + 300 * bpp
        running = await engine.generate(chat("hi", num_ctx=512, num_predict=250))
        assert loaded.kv_reserved >= 250 * bpp
        with pytest.raises(QueueFull, match="memory"):
            await engine.generate(chat("word " * 150))
        running.cancel()
        await finish(await engine.generate(chat("word " * 150)))
        assert loaded.kv_reserved == 0

    run_engine(tiny_loader, work, num_parallel=16)


def test_lazy_cache_commits_and_releases_pages():
    import psutil
    import torch

    from llamaherd.engine.kvcache import lazy_zeros

    proc = psutil.Process()
    before = proc.memory_info().rss
    t, buf = lazy_zeros((16, 4, 8192, 64), torch.float32)  # 128 MiB of address space
    assert proc.memory_info().rss - before < 16 << 20 and float(t.abs().sum()) == 0
    t[3, :, :4096] = 1.0  # one row's first half: 4 MiB
    assert proc.memory_info().rss - before < 24 << 20
    assert float(t[3].sum()) == 4 * 4096 * 64 and float(t[4].sum()) == 0
