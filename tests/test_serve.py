"""`herd serve` end to end: a real server process with the real SmolLM2 model, driven by the
official `ollama` and `openai` Python clients (and raw HTTP for what clients never send).

Model outputs are never written down here: greedy outputs are compared with each other (alone and
in a crowd, streamed and not, one API and the other), log-probabilities and embeddings with the
model's own numbers computed in-process (`llamaherd.load`, the server's default load path), and
structured outputs are parsed and validated against their schemas.

One server (and one model load) serves the whole file. The server's log is
test-artifacts/serve/herd-serve.log.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import torch

from herdserver import serving

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "serve"
MODEL = "smol"
NAME = "smol:latest"  # what the server calls it
ROWS = 8  # HERD_NUM_PARALLEL: requests decoded together; more wait in the queue
GREEDY = {"temperature": 0}
TIMEOUT = 300  # two shared CPU cores


@pytest.fixture(scope="module")
def herd(tmp_path_factory, smollm2_path):
    """`herd serve` over a store holding SmolLM2 as `smol`, loaded once up front."""
    with serving(tmp_path_factory.mktemp("herd-serve-home"), MODEL, smollm2_path, ARTIFACTS / "herd-serve.log",
                 env={"HERD_NUM_PARALLEL": str(ROWS)}) as server:
        yield server


@pytest.fixture(scope="module")
def llm(smollm2_path):
    """The same model in this process, loaded as the server loads it (device and quantization
    defaults), for its own teacher-forced numbers."""
    import llamaherd

    return llamaherd.load(smollm2_path)


@pytest.fixture(scope="module")
def oc(herd) -> ollama.Client:
    return ollama.Client(host=herd.url, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def oai(herd) -> openai.OpenAI:
    # No retries: a retried 5xx or timeout would hide a server failure.
    return openai.OpenAI(base_url=herd.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def loaded(oc: ollama.Client) -> dict[str, ollama.ProcessResponse.Model]:
    return {m.model: m for m in oc.ps().models}


def expires_at(herd) -> str:
    """/api/ps's expires_at of the model: for a model in use it is keep_alive from now (it moves);
    for an idle one, the fixed time of its last release."""
    (model,) = [m for m in herd.api("GET", "/api/ps").json()["models"] if m["name"] == NAME]
    return model["expires_at"]


def assert_serving(herd) -> None:
    """The server answers, and the model still generates."""
    assert httpx.get(herd.url + "/", timeout=30).status_code == 200
    r = httpx.post(herd.url + "/api/generate", timeout=60, json={
        "model": MODEL, "prompt": "Hi", "raw": True, "stream": False, "options": {**GREEDY, "num_predict": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True and r.json()["eval_count"] == 1


def assert_stats(final) -> None:
    """Ollama's statistics on a final object (durations in ns)."""
    assert final.done is True and final.done_reason in ("stop", "length")
    assert final.load_duration is not None and final.load_duration >= 0
    assert final.prompt_eval_count > 0 and final.prompt_eval_duration > 0
    assert final.eval_count > 0 and final.eval_duration > 0
    assert final.total_duration >= final.prompt_eval_duration + final.eval_duration


# -- Ollama: the server and the store --------------------------------------------------------------

def test_root_and_version(oc):
    import llamaherd
    from llamaherd.server.ollama import OLLAMA_API_VERSION

    # The ollama client has no call for these two: use its HTTP client (its headers, its host).
    http = oc._client
    r = http.get("/")
    assert (r.status_code, r.text) == (200, "Ollama is running")
    assert http.head("/").status_code == 200
    # The Ollama release whose API this matches (clients check a minimum), and our own version.
    assert http.get("/api/version").json() == {"version": OLLAMA_API_VERSION, "llamaherd": llamaherd.__version__}
    assert http.head("/api/version").status_code == 200


def test_tags_show_and_ps(oc, herd, llm, smollm2_path):
    (entry,) = [m for m in oc.list().models if m.model == NAME]
    assert entry.size >= smollm2_path.stat().st_size and len(entry.digest) == 64
    assert (entry.details.format, entry.details.family, entry.details.quantization_level) == ("gguf", "llama", "Q4_1")
    assert entry.modified_at.tzinfo is not None

    show = oc.show(MODEL)
    assert show.template.startswith(llm.tokenizer.chat_template) and "tools" in show.template  # as litellm checks
    assert show.details.quantization_level == "Q4_1" and show.details.family == "llama"
    args = llm.args
    assert show.modelinfo["general.architecture"] == "llama"
    assert show.modelinfo["llama.context_length"] == args.max_seq_len
    assert show.modelinfo["llama.embedding_length"] == args.dim
    assert show.modelinfo["llama.block_count"] == args.n_layers
    assert "completion" in show.capabilities
    assert any(line.startswith("FROM ") for line in show.modelfile.splitlines())

    ps = loaded(oc)[NAME]
    assert ps.context_length == min(4096, args.max_seq_len)  # the context in use: HERD_CONTEXT_LENGTH's default
    assert ps.size > 0 and ps.details.family == "llama"
    assert ps.expires_at.year == 2318  # HERD_KEEP_ALIVE=-1: kept forever, shown as Ollama does
    for path in ("/api/tags", "/api/ps"):
        assert httpx.head(herd.url + path).status_code == 200


def test_pull_streams_its_progress(oc, smollm2_path):
    """`smollm2:135m` is the catalog's name for the file the store already holds (as `smol`): the
    pull finds the blob there, verifies it and writes the manifest, offline."""
    assert "smollm2:135m" not in [m.model for m in oc.list().models]
    events = list(oc.pull("smollm2:135m", stream=True))
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    size = smollm2_path.stat().st_size
    files = [e for e in events if e.digest]
    assert files and all(e.digest.startswith("sha256:") and e.status == f"pulling {e.digest[7:19]}" for e in files)
    assert files[-1].completed == files[-1].total == size
    assert "smollm2:135m" in [m.model for m in oc.list().models]
    assert oc.pull("smollm2:135m").status == "success"  # not streamed: the last event only

    with pytest.raises(ollama.ResponseError) as e:  # the error comes in the stream, as Ollama's does
        list(oc.pull("nosuchmodel:1b", stream=True))
    assert "not in the catalog" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        oc.pull("nosuchmodel:1b")
    assert e.value.status_code == 404 and "not in the catalog" in e.value.error
    oc.delete("smollm2:135m")


def test_copy_create_and_delete(oc):
    assert oc.copy(MODEL, "smol-copy").status == "success"
    models = {m.model: m for m in oc.list().models}
    assert models["smol-copy:latest"].digest == models[NAME].digest  # the same manifest

    system = "You answer in one word."
    r = oc.create("smol-brief", from_=MODEL, system=system, parameters={"num_predict": 3, "temperature": 0})
    assert r.status == "success"
    assert list(oc.create("smol-brief2", from_="smol-copy", stream=True))[-1].status == "success"
    show = oc.show("smol-brief")
    assert "\nSYSTEM " in show.modelfile and system in show.modelfile
    assert "num_predict" in show.parameters and "temperature" in show.parameters

    # The stored parameters and system prompt apply to a request that does not set them.
    r = oc.chat("smol-brief", user("Name a color."))
    assert r.eval_count <= 3 and (r.done_reason == "stop" or r.eval_count == 3)
    plain = oc.chat(MODEL, user("Name a color."), options={**GREEDY, "num_predict": 3})
    assert r.prompt_eval_count != plain.prompt_eval_count  # its own system prompt, not the template's default
    assert "smol-brief:latest" in loaded(oc)

    oc.delete("smol-brief")  # unloads it too
    assert "smol-brief:latest" not in loaded(oc) and NAME in loaded(oc)
    for name in ("smol-brief2", "smol-copy"):
        assert oc.delete(name).status == "success"
    names = [m.model for m in oc.list().models]
    assert not {"smol-brief:latest", "smol-brief2:latest", "smol-copy:latest"} & set(names) and NAME in names
    with pytest.raises(ollama.ResponseError) as e:
        oc.delete("smol-copy")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        oc.copy("no-such-model", "other")
    assert e.value.status_code == 404


# -- Ollama: generation ----------------------------------------------------------------------------

def test_generate_streamed_and_not(oc, llm):
    prompt, options = "Why is the sky blue?", {**GREEDY, "num_predict": 12}
    one = oc.generate(MODEL, prompt, options=options)
    chunks = list(oc.generate(MODEL, prompt, options=options, stream=True))
    *parts, final = chunks
    assert all(not c.done and c.model == NAME for c in parts) and len(parts) >= 2
    assert "".join(c.response for c in chunks) == one.response and one.response
    for r in (one, final):
        assert_stats(r)
        assert r.eval_count <= 12 and (r.done_reason == "stop" or r.eval_count == 12)
    assert (final.eval_count, final.prompt_eval_count, final.context) == (one.eval_count, one.prompt_eval_count,
                                                                          one.context)
    # The prompt is the model's chat template around the prompt; `context` is it and the reply.
    ids = llm.encode_chat(user(prompt))
    assert one.prompt_eval_count == len(ids) and one.context[:len(ids)] == ids
    assert len(one.context) == len(ids) + one.eval_count

    raw = oc.generate(MODEL, prompt, raw=True, options=options)
    assert raw.prompt_eval_count == len(llm.encode(prompt))


def test_chat_streamed_and_not(oc):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, *user("Tell me about llamas.")]
    options = {**GREEDY, "num_predict": 12}
    one = oc.chat(MODEL, messages, options=options)
    chunks = list(oc.chat(MODEL, messages, options=options, stream=True))
    assert one.message.role == "assistant" and one.message.content
    assert "".join(c.message.content for c in chunks) == one.message.content
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    for r in (one, chunks[-1]):
        assert_stats(r)
    assert chunks[-1].eval_count == one.eval_count

    # The reply as history: the conversation goes on.
    more = oc.chat(MODEL, [*messages, one.message, *user("And alpacas?")], options=options)
    assert more.message.content and more.prompt_eval_count > one.prompt_eval_count + one.eval_count


def test_chat_format_json(oc):
    r = oc.chat(MODEL, user('Return a JSON object with keys "name" and "age" for a person.'), format="json",
                options={**GREEDY, "num_predict": 200})
    assert r.done_reason == "stop"  # the grammar ended it: the object is complete
    assert isinstance(json.loads(r.message.content), dict)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


def assert_person(text: str) -> None:
    """`text` is JSON that validates against PERSON."""
    obj = json.loads(text)
    assert isinstance(obj, dict) and set(obj) == {"name", "age", "pet"}, obj
    assert isinstance(obj["name"], str) and 1 <= len(obj["name"]) <= 20
    assert type(obj["age"]) is int and 0 <= obj["age"] <= 120
    assert obj["pet"] in ("cat", "dog", "none")


def test_chat_json_schema(oc, oai):
    prompt = user("Describe a person.")
    r = oc.chat(MODEL, prompt, format=PERSON, options={**GREEDY, "num_predict": 120})
    assert r.done_reason == "stop"
    assert_person(r.message.content)
    streamed = "".join(c.message.content for c in oc.chat(MODEL, prompt, format=PERSON, stream=True,
                                                           options={**GREEDY, "num_predict": 120}))
    assert streamed == r.message.content

    c = oai.chat.completions.create(model=MODEL, messages=prompt, temperature=0, max_tokens=120,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "person", "schema": PERSON}})
    assert c.choices[0].finish_reason == "stop"
    assert_person(c.choices[0].message.content)
    assert c.choices[0].message.content == r.message.content  # the same request through the other API


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
      a: the first number
      b: the second number
    """
    return a + b


# A reply that can only be a call of `add` (Llama 3.1's JSON tool-call form): with it as the format,
# the model makes the call, whatever it would have said.
ADD_CALL = {
    "type": "object",
    "properties": {"name": {"const": "add"},
                   "parameters": {"type": "object",
                                  "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                 "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                                  "required": ["a", "b"], "additionalProperties": False}},
    "required": ["name", "parameters"],
    "additionalProperties": False,
}


def test_chat_tools(oc):
    question = user("What is 3 plus 4?")
    options = {**GREEDY, "num_predict": 40}
    # Whether SmolLM2 calls the tool on its own is its business: the answer is a call of `add`,
    # or text.
    r = oc.chat(MODEL, question, tools=[add], options={**GREEDY, "num_predict": 16})
    assert r.done is True
    for call in r.message.tool_calls or []:
        assert call.function.name == "add" and isinstance(call.function.arguments, dict)
    if not r.message.tool_calls:
        assert r.message.content

    # A call it is made to make is parsed out of the reply into message.tool_calls.
    # Streamed, the calls come on a `done: false` chunk before the last one, as Ollama sends them.
    chunks = list(oc.chat(MODEL, question, tools=[add], format=ADD_CALL, options=options, stream=True))
    streamed = [c for chunk in chunks for c in chunk.message.tool_calls or []]
    assert not chunks[-1].message.tool_calls and all(not c.done for c in chunks if c.message.tool_calls)
    for r, calls in ((chunks[-1], streamed),
                     (oc.chat(MODEL, question, tools=[add], format=ADD_CALL, options=options), None)):
        assert r.done_reason == "stop" and r.message.content == ""
        (call,) = calls if calls is not None else r.message.tool_calls
        assert call.function.name == "add" and set(call.function.arguments) == {"a", "b"}
        assert all(type(v) is int for v in call.function.arguments.values())

    # The call and its result as history.
    result = {"role": "tool", "content": str(add(**call.function.arguments)), "tool_name": "add"}
    after = oc.chat(MODEL, [*question, r.message, result], tools=[add], options={**GREEDY, "num_predict": 8})
    assert after.done is True and after.prompt_eval_count > r.prompt_eval_count


def test_embed_and_embeddings(oc, oai, llm, herd):
    texts = ["The sky is blue.", "I like pizza."]
    r = oc.embed(MODEL, texts)
    assert r.model in (MODEL, NAME) and len(r.embeddings) == 2
    ids = [llm.encode(t) for t in texts]
    assert r.prompt_eval_count == sum(map(len, ids))
    for vector, tokens in zip(r.embeddings, ids):
        assert len(vector) == llm.args.dim and math.isclose(sum(x * x for x in vector), 1, rel_tol=1e-4)
        # The mean of the final normalised hidden states, L2-normalised, as the model computes it.
        with torch.inference_mode():
            h = llm.model.hidden_states(torch.tensor([tokens], device=llm.device))[0].float().mean(0)
        expected = torch.nn.functional.normalize(h, dim=0).cpu()
        assert torch.allclose(torch.tensor(vector), expected, atol=1e-4)
    assert r.embeddings[0] != r.embeddings[1]

    legacy = oc.embeddings(MODEL, texts[0]).embedding
    assert torch.allclose(torch.tensor(legacy), torch.tensor(r.embeddings[0]), atol=1e-6)
    short = oc.embed(MODEL, texts[0], dimensions=64).embeddings[0]
    assert torch.allclose(torch.tensor(short), torch.nn.functional.normalize(torch.tensor(r.embeddings[0][:64]), dim=0),
                          atol=1e-5)

    e = oai.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in e.data] == [0, 1] and e.usage.prompt_tokens == r.prompt_eval_count
    for d, vector in zip(e.data, r.embeddings):
        assert torch.allclose(torch.tensor(d.embedding), torch.tensor(vector), atol=1e-6)
    # base64: little-endian float32 (what the openai client asks for by default, and decodes)
    raw = httpx.post(herd.url + "/v1/embeddings", timeout=TIMEOUT,
                     json={"model": MODEL, "input": texts[0], "encoding_format": "base64"}).json()
    data = base64.b64decode(raw["data"][0]["embedding"])
    assert torch.allclose(torch.tensor(struct.unpack(f"<{len(data) // 4}f", data)), torch.tensor(r.embeddings[0]),
                          atol=1e-6)


def test_keep_alive_zero_unloads_and_an_empty_request_loads(oc, herd):
    assert NAME in loaded(oc)
    r = oc.generate(MODEL, keep_alive=0)
    assert (r.done, r.done_reason) == (True, "unload") and NAME not in loaded(oc)
    r = oc.generate(MODEL, "")  # an empty prompt loads
    assert (r.done, r.done_reason, r.response) == (True, "load", "") and NAME in loaded(oc)

    assert oc.chat(MODEL, keep_alive=0).done_reason == "unload" and NAME not in loaded(oc)
    first = oc.chat(MODEL, user("Hi"), options={**GREEDY, "num_predict": 2})
    assert first.load_duration > 0 and NAME in loaded(oc)  # it loaded for this request
    r = oc.chat(MODEL)  # no messages: the client sends "messages": [], which loads
    assert (r.done, r.done_reason, r.message.content) == (True, "load", "")
    assert oc.chat(MODEL, user("Hi"), options={**GREEDY, "num_predict": 2}).load_duration == 0

    # keep_alive sets when the idle model goes; -1 (the server's setting here) is forever.
    oc.generate(MODEL, keep_alive="10m")
    left = loaded(oc)[NAME].expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=9) < left <= timedelta(minutes=10)
    oc.generate(MODEL, keep_alive=1e300)  # beyond any date: forever (it used to break /api/ps)
    assert loaded(oc)[NAME].expires_at.year == 2318
    oc.generate(MODEL, keep_alive=-1)
    assert loaded(oc)[NAME].expires_at.year == 2318


# -- OpenAI ----------------------------------------------------------------------------------------

def test_openai_chat_completions(oai, oc):
    messages = user("What is a llama?")
    r = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    (choice,) = r.choices
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 10 and (choice.finish_reason == "stop" or r.usage.completion_tokens == 10)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # The same request through Ollama's API gives the same reply.
    same = oc.chat(MODEL, messages, options={**GREEDY, "num_predict": 10})
    assert same.message.content == choice.message.content
    assert (same.prompt_eval_count, same.eval_count) == (r.usage.prompt_tokens, r.usage.completion_tokens)

    r2 = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_completion_tokens=10)
    assert r2.choices[0].message.content == choice.message.content and r2.usage == r.usage


def test_openai_chat_streams_with_usage_last(oai):
    messages, options = user("What is a llama?"), dict(temperature=0, max_tokens=10)
    one = oai.chat.completions.create(model=MODEL, messages=messages, **options)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                              stream_options={"include_usage": True}, **options))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == [] and last.usage == one.usage  # usage: only in the last chunk
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == one.choices[0].message.content
    assert [c.choices[0].finish_reason for c in body][-1] == one.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1])

    plain = list(oai.chat.completions.create(model=MODEL, messages=messages, stream=True, **options))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason

    # A tool call, streamed: one delta with the whole call, then finish_reason "tool_calls".
    tool = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                              "parameters": ADD_CALL["properties"]["parameters"]}}
    fmt = {"type": "json_schema", "json_schema": {"name": "call", "schema": ADD_CALL}}
    r = oai.chat.completions.create(model=MODEL, messages=user("What is 3 plus 4?"), tools=[tool], temperature=0,
                                    max_tokens=40, response_format=fmt)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
    assert set(json.loads(call.function.arguments)) == {"a", "b"}
    chunks = list(oai.chat.completions.create(model=MODEL, messages=user("What is 3 plus 4?"), tools=[tool],
                                              temperature=0, max_tokens=40, response_format=fmt, stream=True))
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.index, tc.function.name, tc.function.arguments) for tc in calls] == [
        (0, "add", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_seed(oai):
    def sample(seed: int) -> str:
        r = oai.chat.completions.create(model=MODEL, messages=user("Write a short poem about the moon."),
                                        temperature=1.5, seed=seed, max_tokens=8)
        return r.choices[0].message.content

    first = sample(7)
    assert sample(7) == first  # the same seed, the same sample
    assert len({first, sample(8), sample(9)}) >= 2  # other seeds, other samples


def test_openai_stop(oai):
    messages = user("Describe the ocean.")
    text = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       max_tokens=24).choices[0].message.content
    assert len(text) >= 12, text
    stop = text[len(text) // 2:len(text) // 2 + 3]  # a piece of what the model would say
    expected = text[:text.find(stop)]
    for stops in (stop, ["\u2603never", stop]):
        r = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24, stop=stops)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == expected


def test_openai_logprobs(oai):
    r = oai.chat.completions.create(model=MODEL, messages=user("Name a fruit."), temperature=0, max_tokens=8,
                                    logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert b"".join(bytes(t.bytes) for t in content).decode() == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True) and t.logprob <= values[0] + 1e-6
        if t.token in [a.token for a in t.top_logprobs]:
            assert t.logprob == pytest.approx(next(a.logprob for a in t.top_logprobs if a.token == t.token))
    plain = oai.chat.completions.create(model=MODEL, messages=user("Name a fruit."), temperature=0, max_tokens=8)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def teacher_forced(llm, ids: list[int]) -> torch.Tensor:
    """log-probabilities (T, V): row i is the model's distribution of token i + 1 given ids[:i + 1]."""
    return torch.log_softmax(llm.logits(ids), dim=-1)


def test_completions_echo_gives_the_models_own_prompt_logprobs(oai, llm):
    prompt = "The quick brown fox jumps over the lazy dog. Then it"
    r = oai.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=3, max_tokens=0)
    (choice,) = r.choices
    lp = choice.logprobs
    ids = llm.encode(prompt)
    assert choice.text == prompt and "".join(lp.tokens) == prompt
    assert lp.tokens == [llm.tokenizer.token_bytes(t).decode() for t in ids]
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    logp = teacher_forced(llm, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(logp[i - 1, ids[i]]), abs=1e-3)
        values, best = logp[i - 1].topk(3)
        expected = {llm.tokenizer.token_bytes(t).decode("utf-8", "replace"): float(v)
                    for t, v in zip(best.tolist(), values.tolist())}
        assert lp.top_logprobs[i].keys() == expected.keys()
        for token, value in expected.items():
            assert lp.top_logprobs[i][token] == pytest.approx(value, abs=1e-3)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0


def test_completions(oai, oc, llm):
    prompt = "The capital of France is"
    r = oai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    (choice,) = r.choices
    assert r.object == "text_completion" and choice.text and choice.logprobs is None
    assert r.usage.prompt_tokens == len(llm.encode(prompt)) and r.usage.completion_tokens <= 8
    # A completion is Ollama's raw generate.
    assert oc.generate(MODEL, prompt, raw=True, options={**GREEDY, "num_predict": 8}).response == choice.text

    echoed = oai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, echo=True, logprobs=1)
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text == prompt + choice.text
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]

    streamed = list(oai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, stream=True,
                                           stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    assert streamed[-1].choices == [] and streamed[-1].usage == r.usage


def test_generated_logprobs_are_the_models(oc, llm):
    """The log-probability reported for each generated token is the model's (raw logits, before any
    penalty), as teacher forcing the whole sequence computes it."""
    r = oc.generate(MODEL, "The quick brown fox jumps over the lazy dog. Then it", raw=True, logprobs=True,
                    top_logprobs=2, options={**GREEDY, "num_predict": 12})
    n = r.prompt_eval_count
    ids = r.context
    assert len(ids) == n + r.eval_count == n + len(r.logprobs)
    logp = teacher_forced(llm, ids)
    for i, entry in enumerate(r.logprobs):
        # Generation decodes token by token (KV cache, batched rows), teacher forcing runs one forward
        # pass: the same numbers up to float rounding.
        assert entry.logprob == pytest.approx(float(logp[n + i - 1, ids[n + i]]), abs=0.02)
        assert len(entry.top_logprobs) == 2


def test_openai_models(oai):
    ids = [m.id for m in oai.models.list().data]
    assert NAME in ids
    model = oai.models.retrieve(MODEL)
    assert model.id == NAME and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


# -- many clients at once --------------------------------------------------------------------------

PROMPTS = ["Name three colors.", "What is 2+2?", "Write a haiku about the sea.", "Tell me a joke.",
           "What is the capital of France?", "List some fruits.", "Describe a cat.", "Say hello in Spanish."]
CROWD_TOKENS = 24


def ollama_stream(url: str, prompt: str) -> tuple[str, int]:
    client = ollama.Client(host=url, timeout=TIMEOUT)
    parts, final = [], None
    for chunk in client.chat(MODEL, user(prompt), stream=True, options={**GREEDY, "num_predict": CROWD_TOKENS}):
        parts.append(chunk.message.content)
        final = chunk
    assert final.done
    return "".join(parts), final.eval_count


def openai_stream(url: str, prompt: str) -> tuple[str, int]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
    parts, usage = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=user(prompt), temperature=0,
                                                max_tokens=CROWD_TOKENS, stream=True,
                                                stream_options={"include_usage": True}):
        parts.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    return "".join(parts), usage.completion_tokens


def test_32_concurrent_streams_each_get_their_greedy_reply(herd):
    """32 streaming clients at once (four times the server's rows: most wait in the queue), half
    through each API: each gets exactly the reply its request gets alone."""
    alone = {p: ollama_stream(herd.url, p) for p in PROMPTS}
    jobs = [(ollama_stream if i // len(PROMPTS) % 2 else openai_stream, PROMPTS[i % len(PROMPTS)]) for i in range(32)]
    start = threading.Barrier(len(jobs))

    def run(job):
        stream, prompt = job
        start.wait(60)
        return stream(herd.url, prompt)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (stream, prompt), result in zip(jobs, results):
        assert result == alone[prompt], (stream.__name__, prompt)
    assert_serving(herd)


# -- bad input ---------------------------------------------------------------------------------------

CHAT = user("Hi")
BAD = [
    # (path, body (bytes: sent as they are), status, a piece of the message)
    ("/api/chat", b'{"model": "smol", "messages": [', 400, "invalid JSON"),
    ("/v1/chat/completions", b'{"model": ', 400, "invalid JSON"),
    ("/api/generate", b'["smol"]', 400, "object"),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "stream": "no"}, 400, "stream"),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"num_predict": "5"}}, 400, "options.num_predict"),
    ("/api/chat", {"model": MODEL, "messages": CHAT, "options": {"temperature": "hot"}}, 400, "options.temperature"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "temperature": "0"}, 400, "temperature"),
    ("/api/generate", b'{"model": "smol", "prompt": "Hi", "options": {"temperature": NaN}}', 400, "finite"),
    ("/v1/chat/completions", b'{"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "top_p": Infinity}',
     400, "finite"),
    ("/api/chat", {"model": "no-such-model", "messages": CHAT}, 404, "not found"),
    ("/api/generate", {"model": "no-such-model", "prompt": "Hi"}, 404, "not found"),
    ("/api/embed", {"model": "no-such-model", "input": "Hi"}, 404, "not found"),
    ("/api/show", {"model": "no-such-model"}, 404, "not found"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": CHAT}, 404, "not found"),
    ("/v1/embeddings", {"model": "no-such-model", "input": "Hi"}, 404, "not found"),
    ("/api/chat", {"model": "../../etc/passwd", "messages": CHAT}, 400, "invalid model name"),
    ("/api/chat", {"messages": CHAT}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "unknown role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "unknown role"),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"num_predict": -5}}, 400, "num_predict"),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"num_predict": 10**12}}, 400, "num_predict"),
    ("/api/chat", {"model": MODEL, "messages": CHAT, "options": {"num_predict": 10**30}}, 400, "num_predict"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 10**9}, 400, "num_predict"),
    ("/api/chat", {"model": MODEL, "messages": CHAT, "options": {"num_ctx": 0}}, 400, "num_ctx"),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"seed": 2**70}}, 400, "seed"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "seed": 2**64}, 400, "seed"),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "keep_alive": "nan"}, 400, "keep_alive"),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "keep_alive": "someday"}, 400, "keep_alive"),
    ("/api/chat", {"model": MODEL, "messages": CHAT, "format": {"type": "nonsense"}}, 400, "invalid JSON schema"),
    ("/api/chat", {"model": MODEL, "messages": CHAT, "format": {"$ref": "#/nowhere"}}, 400, "invalid JSON schema"),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "format": "yaml"}, 400, "format"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400, "invalid JSON schema"),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("/api/embed", {"model": MODEL, "input": []}, 400, "input"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**10]}, 400, "token"),
]


@pytest.mark.parametrize("path, body, status, message", BAD,
                         ids=[f"{i}-{p}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input_is_a_4xx_with_an_error_and_the_server_goes_on(herd, path, body, status, message):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    r = httpx.post(herd.url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if path.startswith("/v1/"):  # OpenAI's error object
        assert error["type"] and message in error["message"], error
    else:
        assert isinstance(error, str) and message in error, error
    assert_serving(herd)


def test_clients_see_errors_as_their_exceptions(oc, oai):
    with pytest.raises(ollama.ResponseError) as e:
        oc.chat("no-such-model", CHAT)
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        oc.generate(MODEL, "Hi", options={"num_ctx": 0})
    assert e.value.status_code == 400 and "num_ctx" in e.value.error
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[])
    assert "messages" in e.value.body["message"]


# -- clients that leave ------------------------------------------------------------------------------

def in_use(herd) -> bool:
    """Whether a request holds the model now (its expiry moves with the clock while one does)."""
    before = expires_at(herd)
    time.sleep(0.05)
    return expires_at(herd) != before


def wait_idle(herd, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while in_use(herd):
        assert time.monotonic() < deadline, "the model is still in use after its clients left"
        time.sleep(0.2)


def test_clients_that_disconnect_free_their_rows(herd):
    """Fill every row (and the queue) with endless streams, read a little, hang up: the generations
    stop, the rows are free again, and a crowd of new requests is served at once."""
    long = {"model": MODEL, "keep_alive": "10m", "options": {**GREEDY, "num_predict": 4000}}
    streams = []
    try:
        for i in range(ROWS + 2):
            client = httpx.Client(timeout=TIMEOUT)
            context = client.stream("POST", herd.url + "/api/generate",
                                    json={**long, "prompt": f"Write a very long story, number {i}."})
            response = context.__enter__()
            assert response.status_code == 200
            streams.append((client, context, response, response.iter_lines()))
        for _, _, _, lines in streams[:ROWS]:  # those with a row stream; the others wait for one
            assert json.loads(next(lines))["done"] is False
        assert in_use(herd)
    finally:
        for client, context, _, _ in streams:
            context.__exit__(None, None, None)  # hang up mid-stream
            client.close()
    wait_idle(herd)

    # Rows still held by abandoned 4000-token streams would keep these waiting for minutes.
    start = time.monotonic()
    body = {"model": MODEL, "stream": False, "options": {**GREEDY, "num_predict": 4}}
    with ThreadPoolExecutor(ROWS) as pool:
        replies = list(pool.map(lambda i: httpx.post(herd.url + "/api/chat", timeout=120,
                                                      json={**body, "messages": user(f"Count to {i}.")}),
                                range(ROWS)))
    assert all(r.status_code == 200 and r.json()["eval_count"] <= 4 for r in replies)
    assert time.monotonic() - start < 90

    # A client that gives up on a reply that is not streamed: it is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(herd.url + "/api/generate", timeout=3,
                   json={**long, "stream": False, "prompt": "Write a very long story."})
    wait_idle(herd)
    assert_serving(herd)
    httpx.post(herd.url + "/api/generate", json={"model": MODEL, "keep_alive": -1}).raise_for_status()
