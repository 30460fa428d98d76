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

from herdserver import HerdServer

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
    from llamaherd.store import Store

    home = tmp_path_factory.mktemp("herd-trust-home")
    Store(home).create(MODEL, f"FROM {smollm2_path}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = ARTIFACTS / "herd-serve.log"
    log.unlink(missing_ok=True)
    server = HerdServer(home, log, env={"HERD_NUM_PARALLEL": "2", "HERD_MAX_QUEUE": "3",
                                        "HERD_HEADER_TIMEOUT": "2", "HERD_MAX_CONNECTIONS": "64"})
    try:
        server.start()
        server.api("POST", "/api/generate", json={"model": MODEL}).raise_for_status()
        yield server
    finally:
        server.stop()


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
        # Q4_1 kernels against float32 weights dequantized from them: close, not bitwise.
        assert got == pytest.approx(want, abs=0.05 + 0.02 * abs(want)), c
        assert got_greedy == want_greedy, c
    alive_and_intact(herd)
