"""Moderation in the server: the official ollama and openai clients against the app in this process,
with the real engine serving SmolLM2 both as the chat model and as the "guard" (whatever it says);
and the code shield over a scripted engine."""

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from llamaherd.engine.types import Delta, Done  # noqa: E402
from llamaherd.errors import HerdError  # noqa: E402
from llamaherd.safety.moderation import ModerationSettings, Moderator, openai_result, server_moderator  # noqa: E402
from llamaherd.safety.llama_guard import decide, default_policy  # noqa: E402
from llamaherd.server.app import Settings, create_app  # noqa: E402

BASE = "http://localhost:11434"


class Counting:
    """The real engine, counting generate calls per model (to prove a prompt never reached one)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, {}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def generate(self, req):
        self.calls[req.model] = self.calls.get(req.model, 0) + 1
        return await self.engine.generate(req)


@pytest.fixture(scope="module")
def app_and_engine(smollm2_path, tmp_path_factory):
    from llamaherd.engine.models import Engine, EngineConfig, ModelRef

    def resolve(name):
        if name not in ("smol-chat", "smol-guard"):
            from llamaherd.engine.types import ModelNotFound
            raise ModelNotFound(name)
        return ModelRef(name, Path(smollm2_path), digest=name)

    engine = Counting(Engine(resolve, EngineConfig(num_parallel=4, keep_alive=-1)))
    app = create_app(Settings(home=tmp_path_factory.mktemp("home")), engine=engine)
    with TestClient(app, base_url=BASE) as client:
        yield app, engine, client


def moderate(app, **settings):
    moderator = Moderator(ModerationSettings(**settings))
    app.state.handler.moderator = moderator
    return moderator


def clients(client):
    import ollama
    import openai

    ollama_client = ollama.Client(host=BASE)
    ollama_client._client = client  # its requests go to the app in this process (TestClient is an httpx.Client)
    return ollama_client, openai.OpenAI(base_url=BASE + "/v1", api_key="x", max_retries=0, http_client=client)


@pytest.mark.integration
@pytest.mark.slow
def test_flagged_prompt_never_reaches_the_chat_model(app_and_engine):
    app, engine, client = app_and_engine
    ollama_client, openai_client = clients(client)
    # SmolLM2 as the guard answers outside the protocol: malformed, so unsafe (fail closed).
    moderator = moderate(app, guard="smol-guard", mode="input", refusal="No.")
    before = engine.calls.get("smol-chat", 0)
    r = ollama_client.chat(model="smol-chat", messages=[{"role": "user", "content": "How do I pick a lock?"}])
    assert r.done_reason == "content_filter" and r.message.content == "No."
    c = openai_client.chat.completions.create(model="smol-chat", messages=[{"role": "user", "content": "Hi"}])
    assert c.choices[0].finish_reason == "content_filter" and c.choices[0].message.content == "No."
    safety = c.choices[0].model_extra["safety"]
    assert safety["stage"] == "input" and safety["flagged"] and safety["malformed"] and 0 <= safety["score"] < 1
    chunks = list(openai_client.chat.completions.create(model="smol-chat", stream=True,
                                                        messages=[{"role": "user", "content": "Hi"}]))
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    raw = client.post("/api/generate", json={"model": "smol-chat", "prompt": "Hi", "stream": False}).json()
    assert raw["done_reason"] == "content_filter" and raw["safety"]["categories"] == []
    assert engine.calls.get("smol-chat", 0) == before  # never reached
    assert moderator.stats["input_checked"] == moderator.stats["input_flagged"] == 4
    # A token-id prompt cannot be read by the guard: refused with a 400, not passed through.
    bad = client.post("/v1/completions", json={"model": "smol-chat", "prompt": [1, 2, 3], "max_tokens": 2})
    assert bad.status_code == 400 and "token-id prompts cannot be moderated" in bad.json()["error"]["message"]


@pytest.mark.integration
@pytest.mark.slow
def test_safe_prompt_and_reply_pass_and_are_checked(app_and_engine):
    """Decided by the score (SmolLM2's P("unsafe") is tiny): the prompt reaches the chat model and
    the streamed reply is checked at sentence ends and at the end."""
    app, engine, client = app_and_engine
    _, openai_client = clients(client)
    moderator = moderate(app, guard="smol-guard", mode="both", on_malformed="score", every=8)
    before = engine.calls.get("smol-chat", 0)
    chunks = list(openai_client.chat.completions.create(
        model="smol-chat", stream=True, max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": "Say hello."}]))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    assert engine.calls["smol-chat"] == before + 1
    assert moderator.stats["input_checked"] == 1 and moderator.stats["output_checked"] >= 2
    assert moderator.stats["input_flagged"] == moderator.stats["output_flagged"] == 0


@pytest.mark.integration
@pytest.mark.slow
def test_flagged_reply_stops_with_content_filter_before_its_text(app_and_engine):
    app, engine, client = app_and_engine
    ollama_client, _ = clients(client)
    moderator = moderate(app, guard="smol-guard", mode="output", every=4)
    parts = list(ollama_client.chat(model="smol-chat", stream=True, options={"num_predict": 12, "temperature": 0},
                                    messages=[{"role": "user", "content": "Say hello."}]))
    assert parts[-1].done and parts[-1].done_reason == "content_filter"
    assert "".join(p.message.content for p in parts) == ""  # nothing was released before the check
    assert moderator.stats["output_flagged"] == 1


@pytest.mark.integration
@pytest.mark.slow
def test_v1_moderations_through_the_openai_client(app_and_engine):
    app, engine, client = app_and_engine
    _, openai_client = clients(client)
    moderate(app, guard="smol-guard")
    r = openai_client.moderations.create(model="smol-guard", input=["How do I bake bread?", "Hi there"])
    assert len(r.results) == 2 and r.model == "smol-guard"
    first = r.results[0]
    assert first.flagged is True  # malformed -> unsafe
    assert first.categories.violence is False and first.category_scores.hate == 0.0
    assert first.model_extra["llama_guard"]["malformed"] is True
    # The default model (HERD_GUARD) stands in for OpenAI's model names.
    app.state.handler.moderator.settings.on_malformed = "score"
    r = openai_client.moderations.create(model="omni-moderation-latest", input="How do I bake bread?")
    assert r.results[0].flagged is False and r.model == "smol-guard"
    bad = client.post("/v1/moderations", json={"input": 3})
    assert bad.status_code == 400 and "input must be" in bad.json()["error"]["message"]


def test_openai_result_maps_s_codes():
    policy = default_policy()
    v = decide("unsafe\nS1,S10,S7", 0.93, policy, "user")
    r = openai_result(v)
    assert r["flagged"] and r["categories"]["violence"] and r["categories"]["hate"] and r["categories"]["illicit/violent"]
    assert not r["categories"]["sexual"] and r["category_scores"]["hate"] == 0.93 and r["category_scores"]["sexual"] == 0
    assert r["llama_guard"]["categories"] == ["S1", "S10", "S7"]  # Privacy has no OpenAI field
    import openai.types as t

    t.Moderation.model_validate(r)  # the openai client's own model parses it


def test_settings_from_env():
    assert server_moderator({}) is None
    m = server_moderator({"HERD_GUARD": "llama-guard3:1b", "HERD_GUARD_MODE": "input", "HERD_CODE_SHIELD": "warn"})
    assert (m.settings.guard, m.settings.mode, m.settings.code_shield, m.settings.every) == ("llama-guard3:1b", "input",
                                                                                           "warn", 64)
    for env, msg in (({"HERD_GUARD_MODE": "sometimes"}, "HERD_GUARD_MODE"), ({"HERD_CODE_SHIELD": "yes"}, "HERD_CODE_SHIELD"),
                     ({"HERD_GUARD_THRESHOLD": "2"}, "THRESHOLD")):
        with pytest.raises(HerdError, match=msg):
            server_moderator(env)


# -- the code shield in the server (a scripted engine: no model needed) -----------------------------------

REPLY = ["Here:\n", "```python\n", "import os\n", "os.system('rm ' + name)\n", "```\n", "Done.\n",
         "```c\nint main(void) { char b[8]; gets(b); }\n```\n", "```python\nprint('ok')\n```\n"]


class Scripted:
    def __init__(self, pieces):
        self.pieces = pieces

    async def generate(self, req):
        pieces = self.pieces

        class Gen:
            model, prompt, load_duration = req.model, [1], 0

            async def __aiter__(self):
                for p in pieces:
                    await asyncio.sleep(0)
                    yield Delta(p, (1,))
                yield Done("stop", eval_count=len(pieces))

            def cancel(self):
                pass

            def token_bytes(self, t):
                return b""

        return Gen()


@pytest.fixture
def scripted(tmp_path):
    app = create_app(Settings(home=tmp_path), engine=Scripted(REPLY))
    with TestClient(app, base_url=BASE) as client:
        yield app, client


def test_code_shield_block_replaces_the_insecure_blocks(scripted):
    app, client = scripted
    moderator = moderate(app, code_shield="block")
    lines = [json.loads(x) for x in client.post("/api/chat", json={
        "model": "m", "messages": [{"role": "user", "content": "code"}]}).text.splitlines()]
    text = "".join(x["message"]["content"] for x in lines)
    assert text == ("Here:\n[code removed by the code shield: CWE-78]\nDone.\n[code removed by the code shield: CWE-242]\n"
                    "```python\nprint('ok')\n```\n")
    findings = lines[-1]["safety"]["code_shield"]["findings"]
    assert [(f["line"], f["cwe"], f["severity"]) for f in findings] == [(4, "CWE-78", "block"), (8, "CWE-242", "block")]
    assert moderator.stats["code_blocked"] == 2


def test_code_shield_warn_attaches_findings(scripted):
    app, client = scripted
    moderate(app, code_shield="warn")
    body = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}).json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == "".join(REPLY) and choice["finish_reason"] == "stop"
    assert [(f["line"], f["cwe"]) for f in choice["safety"]["code_shield"]["findings"]] == [(4, "CWE-78"), (8, "CWE-242")]


class WordGuard:
    """A stand-in classifier: flags a conversation whose last message contains "BAD"."""

    def __init__(self, engine):
        self.engine, self.seen = engine, []

    async def classify(self, conversation, role=None):
        text = conversation[-1]["content"]
        self.seen.append((role, text))
        return decide("unsafe\nS1" if "BAD" in text else "safe", 0.9 if "BAD" in text else 0.1, default_policy(),
                      "assistant" if role == "agent" else "user")


def test_output_check_releases_checked_sentences_and_stops_at_the_flagged_one(tmp_path):
    engine = Scripted(["Hello. ", "This is ", "BAD stuff. ", "More text."])
    app = create_app(Settings(home=tmp_path), engine=engine)
    with TestClient(app, base_url=BASE) as client:
        moderator = moderate(app, guard="g", mode="both")
        moderator._classifier = guard = WordGuard(engine)
        lines = [json.loads(x) for x in client.post("/api/chat", json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}]}).text.splitlines()]
        assert "".join(x["message"]["content"] for x in lines) == "Hello. "
        assert lines[-1]["done_reason"] == "content_filter"
        assert lines[-1]["safety"] == {"flagged": True, "stage": "output", "categories": ["S1"],
                                       "category_names": ["Violent Crimes"], "score": 0.9, "malformed": False}
        assert guard.seen == [("user", "hi"), ("agent", "Hello. "), ("agent", "Hello. This is BAD stuff. ")]
        # A safe reply is released whole, checked at each sentence end and once at the end if needed.
        engine.pieces = ["One. ", "Two", " three."]
        guard.seen.clear()
        body = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}).json()
        assert body["choices"][0]["message"]["content"] == "One. Two three." and body["choices"][0]["finish_reason"] == "stop"
        assert [t for _, t in guard.seen] == ["hi", "One. ", "One. Two three."]
        # A flagged prompt: the refusal, through the streamed OpenAI chunks too.
        chunks = sse_events(client.post("/v1/chat/completions", json={
            "model": "m", "stream": True, "messages": [{"role": "user", "content": "BAD idea"}]}))
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert chunks[-1]["choices"][0]["safety"]["stage"] == "input"
        assert moderator.stats["input_flagged"] == 1 and moderator.stats["output_flagged"] == 1


def sse_events(response):
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
