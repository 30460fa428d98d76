"""The server's plumbing, in-process, over a fake engine and a fake store: wire formats, streaming,
tool calls, errors, security settings. (tests/test_serve.py runs the real thing.)"""

import asyncio
import json
from types import SimpleNamespace

import pytest
from pathlib import Path

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from llamaherd.chat.tools import could_be_call, parse_tool_calls, prepare_messages  # noqa: E402
from llamaherd.engine.types import (Delta, Done, EmbedResult, ModelNotFound, QueueFull, RunningModel,  # noqa: E402
                                    ScoreResult, TokenLogprob)
from llamaherd.errors import HerdError  # noqa: E402
from llamaherd.server.app import Settings, create_app, parse_host, parse_size  # noqa: E402
from llamaherd.server.handler import parse_keep_alive  # noqa: E402

VOCAB = ["<s>", "Hello", " world", "!", '{"name": "get_weather", ', '"parameters": {"city": "Paris"}}', "x"]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]


class FakeGeneration:
    def __init__(self, model, tokens, logprobs):
        self.model, self.tokens, self.logprobs = model, tokens, logprobs
        self.prompt = [0, 1]
        self.load_duration = 5
        self.cancelled = False

    async def __aiter__(self):
        for t in self.tokens:
            await asyncio.sleep(0)
            lp = [TokenLogprob(t, -0.5, [(t, -0.5), (6, -2.0)])] if self.logprobs is not None else None
            yield Delta(VOCAB[t], (t,), lp)
        yield Done("stop", prompt_eval_count=2, prompt_eval_duration=10, eval_count=len(self.tokens),
                   eval_duration=20, load_duration=self.load_duration, context=[0, 1, *self.tokens])

    def cancel(self):
        self.cancelled = True

    def token_bytes(self, t):
        return VOCAB[t].encode()


class FakeEngine:
    """Replies "Hello world!" — or a get_weather call when the prompt mentions the weather."""

    def __init__(self):
        self.requests, self.generations, self.loaded = [], [], {}

    def _check(self, model):
        if model == "missing":
            raise ModelNotFound(model)
        if model == "busy":
            raise QueueFull("server busy")

    async def generate(self, req):
        self._check(req.model)
        self.requests.append(req)
        text = json.dumps(req.messages or req.prompt)
        tokens = [4, 5] if "weather" in text else [1, 2, 3]
        gen = FakeGeneration(req.model, tokens, req.logprobs)
        self.generations.append(gen)
        return gen

    async def score(self, req):
        self._check(req.model)
        return ScoreResult([1, 2, 3], [None, TokenLogprob(2, -1.0, [(2, -1.0)]), TokenLogprob(3, -2.0, [(3, -2.0)])],
                           0, lambda t: VOCAB[t].encode())

    async def embed(self, req):
        self._check(req.model)
        return EmbedResult([[0.6, 0.8] for _ in req.inputs], 3 * len(req.inputs), 0)

    async def load(self, model, keep_alive=None):
        self._check(model)
        if keep_alive == 0:
            self.loaded.pop(model, None)
        else:
            self.loaded[model] = keep_alive
        return model, 0

    async def unload(self, model):
        self.loaded.pop(model, None)

    def running(self):
        return [RunningModel(m, "sha256:" + "0" * 64, 1000, float("inf"), 8192, {"family": "llama"})
                for m in self.loaded]


class FakeStore:
    root = None

    def __init__(self, tmp_path):
        self.root = tmp_path
        self.models = {"smol:latest": {"family": "llama", "format": "gguf", "parameter_size": "135M",
                                       "quantization": "Q4_1"}}

    def list(self):
        return [SimpleNamespace(name=n, digest="sha256:" + "a" * 64, size=10, modified=0.0, details=d)
                for n, d in self.models.items()]

    def show(self, name):
        if name not in self.models:
            raise ModelNotFound(name)
        return {"details": self.models[name], "parameters": {"temperature": 0.5, "stop": ["a", "b"]},
                "template": "{{ messages }}", "system": None, "license": None, "modelfile": "FROM x\n"}

    def resolve(self, name):
        if name not in self.models:
            raise ModelNotFound(name)

    def remove(self, name):
        del self.models[name]

    def copy(self, src, dst):
        self.models[dst] = self.models[src]

    def pull(self, name, progress):
        if name == "nope":
            raise HerdError("model 'nope' is not in the catalog")
        progress({"status": "pulling manifest"})
        for done in (0, 5, 10):
            progress({"status": "pulling abc", "digest": "sha256:abc", "total": 10, "completed": done})
        self.models[name] = {}
        progress({"status": "success"})

    def upload_file(self):
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        return fd, Path(tmp)

    def commit_upload(self, tmp, digest):
        self.uploaded = digest

    def create(self, name, modelfile, base_dir, progress):
        self.modelfile = modelfile
        self.models[name] = {}
        progress({"status": "success"})


@pytest.fixture
def engine():
    return FakeEngine()


def make_client(engine, tmp_path, client_host="127.0.0.1", **settings):
    app = create_app(Settings(**settings), engine=engine, store=FakeStore(tmp_path))
    return TestClient(app, base_url="http://localhost:11434", client=(client_host, 50000))


@pytest.fixture
def client(engine, tmp_path):
    with make_client(engine, tmp_path) as c:
        yield c


def ndjson(response):
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def sse(response):
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# -- Ollama ----------------------------------------------------------------------------------------

def test_root_and_version(client):
    assert client.get("/").text == "Ollama is running"
    assert client.head("/").status_code == 200
    assert client.get("/api/version").json()["version"]


def test_generate_streams_ndjson_then_one_object(client, engine):
    r = client.post("/api/generate", json={"model": "m", "prompt": "hi", "options": {"temperature": 0, "stop": "x"}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson(r)
    assert "".join(line["response"] for line in lines) == "Hello world!"
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["context"] == [0, 1, 1, 2, 3]
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration"):
        assert isinstance(final[key], int)
    assert all(line["done"] is False for line in lines[:-1])
    assert engine.requests[-1].options == {"temperature": 0.0, "stop": "x"}

    one = client.post("/api/generate", json={"model": "m", "prompt": "hi", "stream": False}).json()
    assert one["response"] == "Hello world!" and one["done"] is True and one["eval_count"] == 3


def test_generate_empty_prompt_loads_and_keep_alive_zero_unloads(client, engine):
    r = client.post("/api/generate", json={"model": "m"}).json()
    assert r["done"] is True and r["done_reason"] == "load" and engine.loaded == {"m": None}
    assert [m["name"] for m in client.get("/api/ps").json()["models"]] == ["m"]
    assert client.get("/api/ps").json()["models"][0]["expires_at"].startswith("2318")
    r = client.post("/api/chat", json={"model": "m", "keep_alive": 0}).json()
    assert r["done_reason"] == "unload" and engine.loaded == {}
    r = client.post("/api/chat", json={"model": "m", "messages": []}).json()  # what ollama's chat(model) sends
    assert r["done_reason"] == "load" and engine.loaded == {"m": None}


def test_chat_and_logprobs(client):
    r = client.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                       "stream": False, "logprobs": True, "top_logprobs": 2}).json()
    assert r["message"] == {"role": "assistant", "content": "Hello world!"}
    assert [lp["token"] for lp in r["logprobs"]] == ["Hello", " world", "!"]
    assert r["logprobs"][0]["top_logprobs"][1] == {"token": "x", "logprob": -2.0, "bytes": [120]}


def test_chat_tool_call_is_parsed_not_streamed(client, engine):
    body = {"model": "m", "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": WEATHER}
    lines = ndjson(client.post("/api/chat", json=body))
    assert all(line["message"]["content"] == "" for line in lines)  # the JSON was held back
    # as Ollama: the calls on a `done: false` chunk, then the final one with the statistics
    assert lines[-2]["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}, "index": 0}}]
    assert lines[-2]["done"] is False and lines[-1]["done"] is True and "tool_calls" not in lines[-1]["message"]
    assert engine.requests[-1].tools[0]["function"]["name"] == "get_weather"
    # a reply that is not a call streams as content
    lines = ndjson(client.post("/api/chat", json={**body, "messages": [{"role": "user", "content": "hi"}]}))
    assert "".join(line["message"]["content"] for line in lines) == "Hello world!"
    assert "tool_calls" not in lines[-1]["message"]


def test_embed_and_embeddings(client):
    r = client.post("/api/embed", json={"model": "m", "input": ["a", "b"]}).json()
    assert r["embeddings"] == [[0.6, 0.8], [0.6, 0.8]] and r["prompt_eval_count"] == 6
    assert client.post("/api/embeddings", json={"model": "m", "prompt": "a"}).json() == {"embedding": [0.6, 0.8]}


def test_model_management(client):
    tags = client.get("/api/tags").json()["models"]
    assert tags[0]["name"] == "smol:latest" and tags[0]["details"]["quantization_level"] == "Q4_1"
    show = client.post("/api/show", json={"model": "smol:latest"}).json()
    assert show["template"].startswith("{{ messages }}") and "stop" in show["parameters"]
    assert "tools" in show["template"] and "tools" in show["capabilities"]  # as litellm checks
    assert show["details"]["family"] == "llama" and "completion" in show["capabilities"]
    assert client.post("/api/copy", json={"source": "smol:latest", "destination": "b"}).status_code == 200
    assert client.request("DELETE", "/api/delete", json={"model": "b"}).status_code == 200
    assert client.request("DELETE", "/api/delete", json={"model": "b"}).status_code == 404
    lines = ndjson(client.post("/api/pull", json={"model": "new"}))
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    assert lines[2]["completed"] == 5 and lines[2]["total"] == 10
    assert client.post("/api/pull", json={"model": "new", "stream": False}).json() == {"status": "success"}
    assert ndjson(client.post("/api/pull", json={"model": "nope"}))[-1] == {
        "error": "model 'nope' is not in the catalog"}


def test_create_from_a_name(client, tmp_path):
    r = client.post("/api/create", json={"model": "pirate", "from": "smol", "system": "Arr.", "stream": False})
    assert r.json() == {"status": "success"}
    definition = client.app.state.handler.store.modelfile
    assert (definition.from_, definition.system) == ("smol", "Arr.")
    # paths on the server are not accepted: only model names and uploaded blobs
    # (uploads and create from them, with a real store: tests/test_trust.py)
    assert client.post("/api/create", json={"model": "x", "from": "/etc/passwd"}).status_code == 400


# -- OpenAI ----------------------------------------------------------------------------------------

def test_openai_chat(client, engine):
    body = {"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                       {"role": "user", "content": "hi"}],
            "max_completion_tokens": 7, "stop": "x", "seed": 3, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    r = client.post("/v1/chat/completions", json=body).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["content"] == "Hello world!"
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert r["choices"][0]["logprobs"]["content"][1]["token"] == " world"
    req = engine.requests[-1]
    assert req.options == {"temperature": 0.0, "seed": 3, "stop": ["x"], "num_predict": 7} and req.logprobs == 1
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True,
                                                           "stream_options": {"include_usage": True}}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello world!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5


def test_openai_tool_calls(client):
    body = {"model": "m", "messages": [{"role": "user", "content": "weather?"}], "tools": WEATHER}
    r = client.post("/v1/chat/completions", json=body).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    calls = [c for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert calls[0]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # a tool result fed back, with the assistant's call (arguments as a JSON string)
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "18C"}]
    assert client.post("/v1/chat/completions", json={**body, "messages": history}).status_code == 200


def test_openai_completions_echo_scores_the_prompt(client):
    r = client.post("/v1/completions", json={"model": "m", "prompt": "Hello world!", "echo": True, "logprobs": 1,
                                             "max_tokens": 0}).json()
    choice = r["choices"][0]
    assert choice["text"] == "Hello world!" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["Hello", " world", "!"] and lp["token_logprobs"] == [None, -1.0, -2.0]
    assert lp["top_logprobs"] == [None, {" world": -1.0}, {"!": -2.0}] and lp["text_offset"] == [0, 5, 11]
    r = client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"], "max_tokens": 3}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1] and r["choices"][1]["text"] == "Hello world!"
    chunks = sse(client.post("/v1/completions", json={"model": "m", "prompt": "a", "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello world!"


def test_openai_models_and_embeddings(client):
    import base64
    import struct

    assert client.get("/v1/models").json()["data"][0]["id"] == "smol:latest"
    assert client.get("/v1/models/smol").json()["id"] == "smol:latest"
    assert client.get("/v1/models/nothing").status_code == 404
    r = client.post("/v1/embeddings", json={"model": "m", "input": ["a", "b"]}).json()
    assert r["data"][1] == {"object": "embedding", "embedding": [0.6, 0.8], "index": 1}
    r = client.post("/v1/embeddings", json={"model": "m", "input": "a", "encoding_format": "base64"}).json()
    assert struct.unpack("<2f", base64.b64decode(r["data"][0]["embedding"])) == pytest.approx((0.6, 0.8))


# -- bad input and errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, status, message", [
    ("/api/generate", b"{not json", 400, "invalid JSON"),
    ("/api/generate", {"model": "m", "prompt": 3}, 400, "prompt"),
    ("/api/generate", {"model": "m", "prompt": "hi", "options": {"temperature": "hot"}}, 400, "options.temperature"),
    ("/api/generate", {"model": "m", "prompt": "hi", "options": {"num_predict": "8"}}, 400, "options.num_predict"),
    ("/api/generate", {"model": "m", "prompt": "hi", "keep_alive": "soon"}, 400, "keep_alive"),
    ("/api/generate", {"model": "missing", "prompt": "hi"}, 404, 'model "missing" not found, try pulling it first'),
    ("/api/generate", {"model": "busy", "prompt": "hi"}, 503, "busy"),
    ("/api/generate", {"prompt": "hi"}, 400, "model"),
    ("/api/chat", {"model": "m", "messages": "hi"}, 400, "messages"),
    ("/api/chat", {"model": "m", "messages": [{"content": "hi"}]}, 400, "role"),
    ("/api/chat", {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role 'wizard'"),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400,
     "images"),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50,
                   "logprobs": True}, 400, "top_logprobs"),
    ("/api/embed", {"model": "m", "input": 5}, 400, "input"),
    ("/api/show", {}, 400, "model is required"),
    ("/api/generate", b"", 400, "missing request body"),
])
def test_bad_input_is_a_4xx_with_an_error(client, path, body, status, message):
    r = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
    assert r.status_code == status
    assert message in r.json()["error"]
    assert client.get("/").status_code == 200  # still serving


@pytest.mark.parametrize("body, status, message", [
    ({"model": "m", "messages": []}, 400, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n = 1"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema"}}, 400, "schema"),
    ({"model": "missing", "messages": [{"role": "user", "content": "hi"}]}, 404, 'model "missing" not found'),
])
def test_openai_errors_use_openai_error_objects(client, body, status, message):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status
    assert message in r.json()["error"]["message"] and r.json()["error"]["type"]


def test_unknown_route_is_a_json_404(client):
    r = client.get("/api/nothing")
    assert r.status_code == 404 and "error" in r.json()


# -- security -------------------------------------------------------------------------------------

def test_api_key(engine, tmp_path):
    with make_client(engine, tmp_path, api_key="s3cret") as c:
        assert c.get("/").status_code == 200  # the health check stays open
        assert c.get("/api/tags").status_code == 401
        assert c.get("/api/tags", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/tags", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_dns_rebinding_is_refused_on_loopback(engine, tmp_path):
    with make_client(engine, tmp_path) as c:
        assert c.get("/api/tags", headers={"Host": "evil.example:11434"}).status_code == 403
        assert c.get("/api/tags", headers={"Host": "127.0.0.1:11434"}).status_code == 200
        assert c.get("/api/tags", headers={"Host": "[::1]:11434"}).status_code == 200
    with make_client(engine, tmp_path, host="0.0.0.0") as c:  # bound to the network: any Host
        assert c.get("/api/tags", headers={"Host": "server.lan"}).status_code == 200


def test_cors_allows_localhost_and_configured_origins(engine, tmp_path):
    with make_client(engine, tmp_path, origins=["https://*.example.com"]) as c:
        def allowed(origin):
            r = c.options("/api/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
            return r.headers.get("access-control-allow-origin") == origin

        assert allowed("http://localhost:3000") and allowed("http://127.0.0.1")
        assert allowed("https://app.example.com")
        assert not allowed("https://evil.com")


def test_body_size_limit(engine, tmp_path):
    with make_client(engine, tmp_path, max_body=1000) as c:
        r = c.post("/api/generate", json={"model": "m", "prompt": "x" * 2000})
        assert r.status_code == 413 and "too large" in r.json()["error"]
        assert c.post("/api/generate", json={"model": "m", "prompt": "hi", "stream": False}).status_code == 200


def test_settings_from_env():
    assert parse_host(None) == ("127.0.0.1", 11434)
    assert parse_host("0.0.0.0") == ("0.0.0.0", 11434)
    assert parse_host(":8080") == ("127.0.0.1", 8080)
    assert parse_host("http://[::1]:9000") == ("::1", 9000)
    assert parse_size("2M", None) == 2 << 20 and parse_size(None, 5) == 5
    s = Settings.from_env({"HERD_HOST": "127.0.0.1:1234", "HERD_ORIGINS": "a,b", "HERD_KEEP_ALIVE": "10m",
                           "HERD_MAX_QUEUE": "7", "HERD_API_KEY": "k"})
    assert (s.port, s.origins, s.keep_alive, s.max_queue, s.api_key) == (1234, ["a", "b"], 600.0, 7, "k")
    assert s.loopback and not Settings(host="0.0.0.0").loopback
    with pytest.raises(HerdError):
        Settings.from_env({"HERD_MAX_QUEUE": "lots"})


def test_keep_alive_durations():
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(0) == 0 and parse_keep_alive("0") == 0
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("-1") == -1 and parse_keep_alive("-1s") == -1
    assert parse_keep_alive("250ms") == 0.25 and parse_keep_alive(12.5) == 12.5
    for bad in ("soon", "5 minutes", True, "m"):
        with pytest.raises(HerdError):
            parse_keep_alive(bad)


# -- tool calls: the formats -------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '```json\n{"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}\n```',
    '[{"name": "get_weather", "parameters": {"city": "Paris"}}]',
])
def test_parse_tool_calls(text):
    assert parse_tool_calls(text, WEATHER) == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def test_parse_tool_calls_rejects_what_is_not_only_calls():
    two = '{"name": "get_weather", "parameters": {"city": "A"}}; {"name": "get_weather", "parameters": {"city": "B"}}'
    assert [c["function"]["arguments"]["city"] for c in parse_tool_calls(two, WEATHER)] == ["A", "B"]
    for text in ('{"name": "other", "parameters": {}}', 'Sure! {"name": "get_weather", "parameters": {}}',
                 '{"name": "get_weather", "parameters": {"city": "Paris"}} and more', '{"a": 1', "Hello"):
        assert parse_tool_calls(text, WEATHER) is None
    assert could_be_call("  {\"na") and could_be_call("<|python") and not could_be_call("Hello")


def test_tools_go_into_the_prompt_when_the_template_does_not_know_them():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                                  "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "18C"}]
    out, tools = prepare_messages(messages, WEATHER, "{{ messages }}")
    assert tools is None and out[1]["content"].startswith("Given the following functions")
    assert '"get_weather"' in out[1]["content"] and out[1]["content"].endswith("Weather?")
    assert out[2]["content"] == '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    out, tools = prepare_messages(messages, WEATHER, "{% for t in tools %}{% endfor %}{{ m.tool_calls }}")
    assert tools == WEATHER and out[1]["content"] == "Weather?" and "tool_calls" in out[2]
