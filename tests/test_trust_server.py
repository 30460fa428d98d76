"""Trust (issue 14) against a real `herd serve` process with the real SmolLM2: lm-evaluation-harness's
own `local-completions` backend, hostile requests (huge prompts, slow clients, bursts over the
queue limit, options that break sampling), with the server alive and the store intact after each.

One server serves the file; its log is test-artifacts/trust/herd-serve.log.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest

from herdserver import serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "trust"
MODEL = "smol"
# A chat whose reply ends where SmolLM2 ends its turn: the token after the continuation is the
# stop token <|im_end|>, the case lm-eval scored wrongly.
CONTEXT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
CONTINUATIONS = ["The capital of France is Paris.", "Paris", "The capital of France is Berlin."]


@pytest.fixture(scope="module")
def herd(tmp_path_factory, smollm2_path):
    with serving(tmp_path_factory.mktemp("herd-trust-home"), MODEL, smollm2_path, ARTIFACTS / "herd-serve.log",
                 env={"HERD_NUM_PARALLEL": "2", "HERD_MAX_QUEUE": "3",
                      "HERD_HEADER_TIMEOUT": "2", "HERD_MAX_CONNECTIONS": "64"}) as server:
        yield server


def alive_and_intact(herd) -> None:
    """The server answers, and `herd doctor` finds the store whole."""
    import subprocess
    import sys

    assert herd.api("GET", "/api/tags").json()["models"][0]["name"] == "smol:latest"
    done = subprocess.run([sys.executable, "-m", "llamaherd", "doctor"], env={**__import__("os").environ,
                          "HERD_HOME": str(herd.home)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_lm_eval_local_completions_scores_as_its_hf_backend(herd, tmp_path, hf_smollm2, hf_smollm2_model):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    # The premise: after the first continuation, the model's next token is its stop token.
    r = herd.api("POST", "/v1/completions", json={"model": MODEL, "prompt": CONTEXT + CONTINUATIONS[0],
                                                  "max_tokens": 1, "temperature": 0})
    assert r.json()["choices"][0]["finish_reason"] == "stop" and r.json()["choices"][0]["text"] == ""
    # What lm-eval sends: every prompt token's entry, then the generated (stop) token's.
    ids = hf_smollm2(CONTEXT + CONTINUATIONS[0])["input_ids"]
    r = herd.api("POST", "/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1, "echo": True,
                                                  "logprobs": 1, "temperature": 0}).json()
    assert len(r["choices"][0]["logprobs"]["token_logprobs"]) == len(ids) + 1

    hf_smollm2.save_pretrained(tmp_path / "tokenizer")
    requests = [Instance("loglikelihood", {}, (CONTEXT, c), i) for i, c in enumerate(CONTINUATIONS)]
    api = LocalCompletionsAPI(model=MODEL, base_url=herd.url + "/v1/completions",
                              tokenizer=str(tmp_path / "tokenizer"), tokenizer_backend="huggingface",
                              max_retries=1, num_concurrent=1, timeout=300)
    served = api.loglikelihood(requests)
    hf = HFLM(pretrained=hf_smollm2_model, tokenizer=hf_smollm2, batch_size=1, device="cpu")
    expected = hf.loglikelihood(requests)
    assert lm_eval.__version__
    for (got, got_greedy), (want, want_greedy), c in zip(served, expected, CONTINUATIONS):
        # Q4_1 kernels against float32 weights dequantized from them: measured within 4e-4 of each
        # other, while the stop token's bug lost the continuation's last token (-0.19 and -0.23 here).
        assert got == pytest.approx(want, abs=0.01), c
        assert got_greedy == want_greedy, c
    alive_and_intact(herd)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_hostile_requests_get_clean_answers(herd):
    """Each case a 4xx (or a clean result), the server alive and the store intact after each, and
    the peak RSS written to test-artifacts/trust/hostile.json."""
    import json

    before = peak_rss_mb(herd.proc.pid)
    huge = "word " * 2_000_000  # 10 MB
    cases = {
        "template bomb (refused)": ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False,
                                                       "template": "{{ 'x' * 200000000 }}"}, 400),
        "template loop (refused)": ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False,
                                                       "template": "{% for i in range(100000) %}{% for j in "
                                                                   "range(100000) %}{% endfor %}{% endfor %}"}, 400),
        "stored template bomb": ("/api/create", {"model": "bomb", "from": MODEL, "stream": False,
                                                 "template": "{{ 'x' * 200000000 }}"}, 200),
        "10 MB prompt": ("/api/generate", {"model": MODEL, "prompt": huge, "stream": False}, 400),
        "10 MB chat": ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": huge}],
                                     "stream": False}, 400),
        "10 MB embed": ("/api/embed", {"model": MODEL, "input": huge, "truncate": False}, 400),
        "10 MB score": ("/v1/completions", {"model": MODEL, "prompt": huge, "echo": True, "logprobs": 1,
                                            "max_tokens": 0}, 400),
        "temperature 1e-300": ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": True,
                                                 "options": {"temperature": 1e-300}}, 400),
        "repeat_penalty 0": ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                           "options": {"repeat_penalty": 0}}, 400),
        "frequency_penalty -1e300": ("/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -1e300}, 400),
        "min_p 5": ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                  "options": {"min_p": 5}}, 400),
        "num_ctx 10^12": ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_ctx": 10 ** 12}}, 400),
        "create temperature nan": ("/api/create", {"model": "nan", "from": MODEL,
                                                   "parameters": {"temperature": "nan"}}, 400),
        "pull ../x": ("/api/pull", {"model": "../x"}, 400),
        "tool_choice bogus": ("/v1/chat/completions", {"model": MODEL, "tool_choice": "sometimes",
                                                       "messages": [{"role": "user", "content": "hi"}],
                                                       "tools": [{"type": "function",
                                                                  "function": {"name": "f"}}]}, 400),
    }
    results = {}
    for name, (path, body, status) in cases.items():
        start = time.monotonic()
        r = herd.api("POST", path, json=body)
        results[name] = {"status": r.status_code, "seconds": round(time.monotonic() - start, 2),
                         "peak_rss_mb": round(peak_rss_mb(herd.proc.pid))}
        assert r.status_code == status, (name, r.text[:300])
        assert str(herd.home) not in r.text
        if status == 400:
            assert "error" in r.json()
    # The stored bomb fails cleanly when used, and does not stop the others.
    r = herd.api("POST", "/api/chat", json={"model": "bomb", "messages": [{"role": "user", "content": "hi"}],
                                            "stream": False})
    assert r.status_code == 400 and "template" in r.json()["error"]
    results["stored template bomb, used"] = {"status": r.status_code, "peak_rss_mb": round(peak_rss_mb(herd.proc.pid))}
    herd.api("DELETE", "/api/delete", json={"model": "bomb"}).raise_for_status()

    # A burst over HERD_MAX_QUEUE (2 rows + 3 waiting): exactly 5 accepted.
    async def burst():
        async with httpx.AsyncClient(base_url=herd.url, timeout=300) as client:
            body = {"model": MODEL, "prompt": "Count to fifty:", "stream": False,
                    "options": {"num_predict": 24, "temperature": 0}}
            return await asyncio.gather(*(client.post("/api/generate", json=body) for _ in range(12)))

    statuses = sorted(r.status_code for r in asyncio.run(burst()))
    results["burst of 12 over 2 rows + queue 3"] = {"statuses": statuses}
    assert statuses.count(200) == 5 and statuses.count(503) == 7

    # Slow clients: 200 connections that never finish their headers are closed within the timeout.
    slow = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", herd.port))
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n")
        slow.append(s)
    time.sleep(3)
    assert herd.api("GET", "/api/version").status_code == 200
    open_after = 0
    for s in slow:
        s.settimeout(0.01)
        try:
            open_after += s.recv(1) != b""
        except socket.timeout:
            open_after += 1
        except ConnectionError:
            pass
        s.close()
    results["200 slow connections, open after 3 s"] = {"open": open_after}
    assert open_after == 0

    results["peak_rss_mb"] = {"before": round(before), "after": round(peak_rss_mb(herd.proc.pid))}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "hostile.json").write_text(json.dumps(results, indent=2))
    assert peak_rss_mb(herd.proc.pid) < before + 1500  # no request took gigabytes
    alive_and_intact(herd)
