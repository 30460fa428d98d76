"""Per-request moderation: the X-Herd-Moderation header, through the real app (scripted engine,
stand-in guard: no model needed). It may make the checks stricter; weaker only where the server
allows it (HERD_MODERATION_OVERRIDE=any)."""

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from llamaherd.engine.types import Delta, Done  # noqa: E402
from llamaherd.errors import HerdError  # noqa: E402
from llamaherd.safety.llama_guard import decide, default_policy  # noqa: E402
from llamaherd.safety.moderation import ModerationSettings, Moderator, parse_override  # noqa: E402
from llamaherd.server.app import Settings, create_app  # noqa: E402

BASE = "http://localhost:11434"
HEADER = "X-Herd-Moderation"
REPLY = ["Sure.\n", "```python\nimport os\nos.system('rm ' + name)\n```\n", "Done."]


class Scripted:
    """An engine that answers every request with the same pieces, counting its calls."""

    def __init__(self, pieces):
        self.pieces, self.calls = pieces, 0

    async def generate(self, req):
        self.calls += 1
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


class ScoreGuard:
    """A stand-in classifier: answers "safe" with score 0.3, or "unsafe\\nS1" with 0.9 when the last
    message says BAD; decided with its `threshold` as the real one is."""

    threshold = 0.5

    def __init__(self):
        self.seen = []

    async def classify(self, conversation, role=None):
        text = conversation[-1]["content"]
        self.seen.append(role)
        bad = "BAD" in text
        return decide("unsafe\nS1" if bad else "safe", 0.9 if bad else 0.3, default_policy(),
                      "assistant" if role == "agent" else "user", self.threshold)


@pytest.fixture
def served(tmp_path):
    engine = Scripted(REPLY)
    app = create_app(Settings(home=tmp_path), engine=engine)
    with TestClient(app, base_url=BASE) as client:
        yield app, engine, client


def guard_on(app, **settings):
    moderator = Moderator(ModerationSettings(guard="g", **settings))
    moderator._classifier = guard = ScoreGuard()
    guard.engine = app.state.handler.engine  # made for this engine (else the moderator makes a real one)
    app.state.handler.moderator = moderator
    return moderator, guard


def chat(client, content="hi", header=None, path="/api/chat"):
    headers = {HEADER: header} if header is not None else {}
    if path == "/api/chat":
        body = {"model": "m", "stream": False, "messages": [{"role": "user", "content": content}]}
    else:
        body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return client.post(path, json=body, headers=headers)


def test_parse_override():
    assert parse_override("mode=both; threshold=0.2, code-shield=block") == {
        "mode": "both", "threshold": 0.2, "code_shield": "block"}
    assert parse_override(" Code-Shield = off ") == {"code_shield": None}
    for bad, msg in (("mode=sometimes", "mode must be one of"), ("threshold=2", "threshold must be"),
                     ("threshold=x", "threshold must be"), ("strict", "key=value"), ("level=9", "unknown key 'level'")):
        with pytest.raises(HerdError, match=msg):
            parse_override(bad)


def test_stricter_mode_adds_the_input_check(served):
    app, engine, client = served
    moderator, guard = guard_on(app, mode="output")
    r = chat(client, "BAD idea").json()  # the server checks replies only: the prompt goes through
    assert r["done_reason"] == "stop" and engine.calls == 1 and set(guard.seen) == {"agent"}
    guard.seen.clear()
    r = chat(client, "BAD idea", header="mode=both").json()
    assert r["done_reason"] == "content_filter" and r["safety"]["stage"] == "input"
    assert engine.calls == 1 and guard.seen == ["user"]  # refused before the chat model
    assert moderator.stats["input_flagged"] == 1  # counted with the server's moderator
    assert app.state.handler.moderator is moderator and moderator.settings.mode == "output"  # server unchanged


def test_stricter_threshold_and_code_shield(served):
    app, engine, client = served
    guard_on(app, mode="input")
    assert chat(client).json()["done_reason"] == "stop"  # score 0.3 < 0.5
    r = chat(client, header="threshold=0.25").json()  # 0.3 >= 0.25: flagged for this request only
    assert r["done_reason"] == "content_filter" and r["safety"]["score"] == 0.3
    assert chat(client).json()["done_reason"] == "stop"
    r = chat(client, header="code-shield=block").json()
    assert "[code removed by the code shield: CWE-78]" in r["message"]["content"]
    assert "os.system" not in r["message"]["content"]


def test_weaker_is_refused_unless_the_server_allows_it(served):
    app, engine, client = served
    moderator, guard = guard_on(app, mode="both", code_shield="warn")
    for header, what in (("mode=input", "mode=input"), ("mode=off", "mode=off"), ("threshold=0.9", "threshold=0.9"),
                         ("code-shield=off", "code-shield=off")):
        r = chat(client, "BAD", header=header)
        assert r.status_code == 400, header
        error = r.json()["error"]
        assert "only make moderation stricter" in error and what in error and "\n" not in error
    assert engine.calls == 0 and guard.seen == []
    # OpenAI's error shape, through the official client's extra_headers.
    import openai

    oc = openai.OpenAI(base_url=BASE + "/v1", api_key="x", max_retries=0, http_client=client)
    with pytest.raises(openai.BadRequestError, match="stricter"):
        oc.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                   extra_headers={HEADER: "mode=off"})
    c = oc.chat.completions.create(model="m", messages=[{"role": "user", "content": "BAD"}],
                                   extra_headers={HEADER: "threshold=0.1; code-shield=block"})
    assert c.choices[0].finish_reason == "content_filter"
    # The server allows weaker: mode=off skips the guard for this request.
    moderator.settings.allow_weaker = True
    r = chat(client, "BAD", header="mode=off; code-shield=off").json()
    assert r["done_reason"] == "stop" and r["message"]["content"] == "".join(REPLY) and "safety" not in r
    assert engine.calls == 1 and guard.seen == ["user"]  # only the earlier openai request's prompt


def test_without_server_moderation(served):
    app, engine, client = served
    assert app.state.handler.moderator is None
    r = client.post("/api/generate", json={"model": "m", "prompt": "code", "stream": False},
                    headers={HEADER: "code-shield=warn"}).json()
    assert [f["cwe"] for f in r["safety"]["code_shield"]["findings"]] == ["CWE-78"]
    lines = [json.loads(x) for x in chat(client, header="code-shield=block", path="/api/chat").text.splitlines()]
    assert "os.system" not in "".join(x["message"]["content"] for x in lines)
    r = chat(client, header="mode=input")
    assert r.status_code == 400 and "needs a guard model" in r.json()["error"]
    r = chat(client, header="mode=both; bogus=1", path="/v1/chat/completions")
    assert r.status_code == 400 and "unknown key 'bogus'" in r.json()["error"]["message"]
    assert chat(client, header="mode=off").json()["done_reason"] == "stop"  # as strict as the server: fine
    assert engine.calls == 3


def test_settings_from_env():
    assert ModerationSettings.from_env({}).allow_weaker is False
    assert ModerationSettings.from_env({"HERD_MODERATION_OVERRIDE": "any"}).allow_weaker is True
    with pytest.raises(HerdError, match="HERD_MODERATION_OVERRIDE"):
        ModerationSettings.from_env({"HERD_MODERATION_OVERRIDE": "weaker"})
