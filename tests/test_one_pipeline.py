"""One pipeline: `herd run`, `llamaherd.load().chat`, Ollama's /api/chat and OpenAI's
/v1/chat/completions all run the server's batch loop (`engine.scheduler`), so one greedy request
gives the same reply through each; and speculation (prompt lookup) works in the batched loop,
beside other streams, without changing a token."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys

import httpx
import pytest

from herdserver import HerdServer

PROMPT = "List the first ten prime numbers, separated by commas."
OPTIONS = {"temperature": 0, "num_predict": 32, "seed": 7}


@pytest.fixture(scope="module")
def llm(smollm2_path):
    import llamaherd

    return llamaherd.load(smollm2_path)


@pytest.mark.slow
@pytest.mark.integration
def test_the_same_request_gives_the_same_reply_everywhere(tmp_path, smollm2_path, llm):
    from llamaherd.store import Store

    ours = "".join(llm.chat([{"role": "user", "content": PROMPT}], **OPTIONS))
    assert len(ours) > 10

    cli = subprocess.run([sys.executable, "-m", "llamaherd", "run", "--local", str(smollm2_path), PROMPT,
                          "--temperature", "0", "--num-predict", "32", "--seed", "7"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HERD_HOME": str(tmp_path)})
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == ours.strip()

    Store(tmp_path / "home").create("smol", f"FROM {smollm2_path}")
    server = HerdServer(tmp_path / "home", tmp_path / "serve.log")
    try:
        server.start()
        messages = [{"role": "user", "content": PROMPT}]
        r = httpx.post(server.url + "/api/chat", timeout=600, json={
            "model": "smol", "messages": messages, "stream": False, "options": OPTIONS})
        assert r.status_code == 200, r.text
        assert r.json()["message"]["content"] == ours
        r = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
            "model": "smol", "messages": messages, "temperature": 0, "max_tokens": 32, "seed": 7})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == ours
        # speculation and a JSON schema through the API, as through Python
        spec = httpx.post(server.url + "/api/chat", timeout=600, json={
            "model": "smol", "messages": messages, "stream": False, "options": {**OPTIONS, "speculate": 4}})
        assert spec.json()["message"]["content"] == ours
    finally:
        server.stop()


@pytest.mark.integration
def test_format_logprobs_and_speculation_from_python(llm):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    reply = "".join(llm.chat([{"role": "user", "content": "Describe a person."}], format=schema,
                             temperature=0, num_predict=60))
    person = json.loads(reply)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    ids = llm.encode_chat([{"role": "user", "content": "Write the numbers from 1 to 30 separated by commas."}])
    chunks = list(llm.stream(ids, llm.options(temperature=0, num_predict=8), logprobs=3))
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert len(logprobs) == 8 and all(len(lp.top) == 3 for lp in logprobs)
    steps = llm.scheduler.steps
    plain = [t for c in llm.stream(ids, llm.options(temperature=0, num_predict=48)) for t in c.tokens]
    plain_steps, steps = llm.scheduler.steps - steps, llm.scheduler.steps
    fast = [t for c in llm.stream(ids, llm.options(temperature=0, num_predict=48, speculate=6)) for t in c.tokens]
    assert fast == plain and llm.scheduler.steps - steps < plain_steps


@pytest.mark.integration
def test_speculation_in_the_batched_loop_beside_other_streams(llm):
    """A speculating job and plain ones decoded together: every reply is the one it gets alone."""
    from llamaherd.engine.scheduler import Job, Scheduler
    from llamaherd.engine.types import Done

    prompts = ["Write the numbers from 1 to 30 separated by commas.", "Name a color.", "What is 2+2?"]
    ids = [llm.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    loop = Scheduler(llm.runner, n_rows=4, max_ctx=llm.args.max_seq_len, name="test")
    try:
        def run(jobs_opts):
            queues = []
            for prompt, opts in jobs_opts:
                q = queue.SimpleQueue()
                loop.submit(Job(prompt, llm.options(**opts), llm.tokenizer.stop_ids, llm.tokenizer, q.put))
                queues.append(q)
            out = []
            for q in queues:
                tokens = []
                while not isinstance(event := q.get(timeout=300), Done):
                    assert not isinstance(event, BaseException), event
                    tokens += event.tokens
                out.append(tokens)
            return out

        opts = [{"temperature": 0, "num_predict": 40}] + [{"temperature": 0, "num_predict": 8}] * 2
        alone = [run([(p, o)])[0] for p, o in zip(ids, opts)]
        assert len(alone[0]) == 40
        steps = loop.steps
        together = run([(ids[0], {**opts[0], "speculate": 6}), (ids[1], opts[1]), (ids[2], opts[2])])
        assert together == alone
        assert loop.steps - steps < 40  # the guesses saved steps
    finally:
        loop.close()
        llm.runner.release()
