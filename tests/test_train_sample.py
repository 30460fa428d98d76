"""Rejection sampling (`herd train sample`): K samples per prompt through the batch loop with the
prompt's prefill shared (counted), each sample what it would be alone; K = 1 at temperature 0 is
plain greedy; the kept rows are the argmax (or top quartile) of the scores; the CLI and its errors.
Tiny random Llama models with SmolLM2's real tokenizer and chat template; one run of the real
SmolLM2 GGUF (the native runner) at the end. The scorers are plain Python functions: the reward
model is tested where it is made."""

import json
import queue
import random
import sys
import types

import pytest
import torch

from llamaherd.cli import main
from llamaherd.engine.scheduler import PREFILL_CHUNK, Job, Scheduler
from llamaherd.engine.types import Done
from llamaherd.errors import HerdError
from llamaherd.export.hf import save_tokenizer
from llamaherd.llm import Llama
from llamaherd.train.sample import generate_samples, rejection_sample

transformers = pytest.importorskip("transformers")

PROMPTS = ["Name a color.", "What is 2+2?", "Say hello in French."]
PLAIN = {"top_k": 0, "repeat_penalty": 1.0}  # rejection_sample's sampling: the policy's own distribution


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2):
    """A tiny random Llama as a HF directory, with SmolLM2's tokenizer and chat template."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=smollm2.n_words, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the init's, so that replies vary with the prompt
            p.normal_(0, 0.3 if p.ndim == 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    save_tokenizer(smollm2, path)
    return path


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return Llama.load(tiny_dir, device="cpu")


class Counted:
    """Counts what a runner computes: prompt tokens prefilled (per prompt) and the forks made."""

    def __init__(self, runner, monkeypatch):
        self.prefilled: dict[tuple, int] = {}
        self.forks: list[tuple[int, list[int], int]] = []
        prefill, fork = runner.prefill, runner.fork

        def counted_prefill(prompts):
            for tokens, start, row in prompts:
                self.prefilled[row] = self.prefilled.get(row, 0) + len(tokens)
            return prefill(prompts)

        def counted_fork(src, dsts, n):
            self.forks.append((src, list(dsts), n))
            return fork(src, dsts, n)

        monkeypatch.setattr(runner, "prefill", counted_prefill)
        monkeypatch.setattr(runner, "fork", counted_fork)

    @property
    def tokens(self) -> int:
        return sum(self.prefilled.values())


def alone(policy, messages, seed, **options):
    """One sample through `Llama.stream` (its own one-row loop): what a sample must equal."""
    opts = policy.options({**PLAIN, **options, "seed": seed})
    return [t for chunk in policy.stream(policy.encode_chat(messages), opts) for t in chunk.tokens]


def length_scorer(calls):
    def score(conversations):
        calls.append(conversations)
        return [len(c[-1]["content"]) + 0.001 * i for i, c in enumerate(conversations)]
    return score


# -- sampling ---------------------------------------------------------------------------------

def test_k_samples_share_one_prefill_and_each_is_what_it_is_alone(policy, monkeypatch):
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    k, options = 4, {**PLAIN, "temperature": 1.0, "top_p": 0.95, "num_predict": 8}
    counted = Counted(policy.runner, monkeypatch)
    got = dict(generate_samples(policy, prompts, k, options, seed=7, parallel=6))
    lengths = [len(policy.encode_chat(p)) for p in prompts]
    assert counted.tokens == sum(lengths)  # each prompt computed once, not k times
    assert sorted(n for _, _, n in counted.forks) == sorted(lengths)
    assert all(len(dsts) == k - 1 and src not in dsts for src, dsts, _ in counted.forks)
    monkeypatch.undo()
    seeds = random.Random(7)
    for i, messages in enumerate(prompts):
        samples = got[i]
        assert len(samples) == k and len({tuple(s.tokens) for s in samples}) > 1  # they differ
        for s in samples:  # a forked row gives the very tokens a prefill of its own gives
            assert s.tokens == alone(policy, messages, seeds.getrandbits(63), **options)
            assert s.text == policy.tokenizer.decode(s.tokens)


def test_k1_at_temperature_0_is_plain_greedy(policy):
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    rows = rejection_sample(policy, PROMPTS, lambda cs: [0.0] * len(cs), k=1, temperature=0, max_tokens=10,
                            parallel=4)
    assert [r["prompt"] for r in rows] == [0, 1, 2]
    for row, m in zip(rows, messages):
        greedy = "".join(policy.chat(m, temperature=0, repeat_penalty=1.0, num_predict=10))
        assert row["messages"] == m + [{"role": "assistant", "content": greedy}]
    # a round's system prompt steers the replies but is not written out
    rows = rejection_sample(policy, PROMPTS[:1], lambda cs: [0.0] * len(cs), k=1, temperature=0, max_tokens=10,
                            system="You are a pirate.")
    steered = "".join(policy.chat([{"role": "system", "content": "You are a pirate."}, *messages[0]],
                                  temperature=0, repeat_penalty=1.0, num_predict=10))
    assert rows[0]["messages"] == messages[0] + [{"role": "assistant", "content": steered}]


def test_kept_rows_are_the_argmax_or_the_top_quartile_of_the_scores(policy):
    calls = []
    rows = rejection_sample(policy, PROMPTS, length_scorer(calls), k=4, temperature=1.0, max_tokens=6, seed=3)
    assert len(calls) == 3 and all(len(c) == 4 for c in calls)
    assert len(rows) == 3 and [r["prompt"] for r in rows] == [0, 1, 2]
    for row in rows:
        scored = next(c for c in calls if c[0][:-1] == row["messages"][:-1])
        scores = length_scorer([])(scored)
        best = max(range(4), key=lambda j: scores[j])
        assert row["sample"] == best and row["score"] == scores[best]
        assert row["messages"] == scored[best] and row["done_reason"] in ("stop", "length")
    calls = []
    rows = rejection_sample(policy, PROMPTS[:1], length_scorer(calls), k=8, temperature=1.0, max_tokens=6, seed=3,
                            keep="top_quartile")
    scores = length_scorer([])(calls[0])
    assert [r["sample"] for r in rows] == sorted(range(8), key=lambda j: -scores[j])[:2]


def test_a_cancelled_jobs_forks_still_share_its_prefill(policy, monkeypatch):
    """The job that prefills for its forks is cancelled halfway through a long prompt: the first
    fork takes over its row and its progress; the prompt is still computed once."""
    ids = policy.encode_chat([{"role": "user", "content": "word " * (PREFILL_CHUNK + 50)}])
    assert len(ids) > PREFILL_CHUNK  # two prefill chunks
    events = queue.SimpleQueue()
    jobs = [Job(ids, policy.options({**PLAIN, "temperature": 1.0, "num_predict": 4, "seed": s}),
                policy.tokenizer.stop_ids, policy.tokenizer, lambda e, s=s: events.put((s, e))) for s in range(3)]
    counted = Counted(policy.runner, monkeypatch)
    prefill = policy.runner.prefill
    monkeypatch.setattr(policy.runner, "prefill", lambda prompts: (jobs[0].cancel(), prefill(prompts))[1])
    policy.close()
    loop = Scheduler(policy.runner, n_rows=3, max_ctx=1024)
    try:
        loop.submit(jobs[0], forks=jobs[1:])
        tokens, done = {1: [], 2: []}, set()
        while len(done) < 2:
            s, e = events.get(timeout=60)
            if isinstance(e, Exception):
                raise e
            if isinstance(e, Done):
                done.add(s)
            else:
                tokens[s] += e.tokens
    finally:
        loop.close()
    monkeypatch.undo()
    assert counted.tokens == len(ids) and len(counted.forks) == 1
    for s in (1, 2):
        assert tokens[s] == alone(policy, [{"role": "user", "content": "word " * (PREFILL_CHUNK + 50)}], s,
                                  temperature=1.0, num_predict=4)


def test_bad_scorers_and_arguments_are_one_clear_error(policy):
    with pytest.raises(HerdError, match="k must be at least 1"):
        rejection_sample(policy, PROMPTS, lambda cs: [0.0] * len(cs), k=0)
    with pytest.raises(HerdError, match="keep must be one of"):
        rejection_sample(policy, PROMPTS, lambda cs: [0.0] * len(cs), k=2, keep="worst")
    with pytest.raises(HerdError, match="no prompts"):
        rejection_sample(policy, [], lambda cs: [], k=2)
    with pytest.raises(HerdError, match="gave 1 scores for 2 replies"):
        rejection_sample(policy, PROMPTS[:1], lambda cs: [1.0], k=2, max_tokens=2)
    with pytest.raises(HerdError, match="not a finite number"):
        rejection_sample(policy, PROMPTS[:1], lambda cs: [float("nan")] * len(cs), k=2, max_tokens=2)
    with pytest.raises(HerdError, match="must end with a user message"):
        rejection_sample(policy, [[{"role": "system", "content": "hi"}]], lambda cs: [0.0] * len(cs), k=2)
    assert "".join(policy.chat([{"role": "user", "content": "Hi"}], num_predict=2, temperature=0))  # still usable


# -- the command ------------------------------------------------------------------------------

@pytest.fixture
def fake_reward(monkeypatch):
    """`llamaherd.train.reward` as the CLI sees it: a reward model that likes long replies."""
    seen = []

    class Model:
        def score(self, conversations):
            seen.append(conversations)
            return [float(len(c[-1]["content"])) for c in conversations]

    def load_reward_model(path):
        seen.append(path)
        return Model()

    monkeypatch.setitem(sys.modules, "llamaherd.train.reward",
                        types.SimpleNamespace(load_reward_model=load_reward_model))
    return seen


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_command_writes_the_best_reply_per_prompt_with_its_score(tiny_dir, tmp_path, fake_reward, capsys):
    data = write(tmp_path / "prompts.jsonl", [json.dumps({"prompt": PROMPTS[0]}), "",
                                              json.dumps({"messages": [{"role": "user", "content": PROMPTS[1]},
                                                                       {"role": "assistant", "content": "4"}]})])
    out = tmp_path / "out" / "best.jsonl"
    assert main(["train", "sample", "--policy", str(tiny_dir), "--reward", "rm-dir", "--data", str(data), "-k", "3",
                 "--max-tokens", "5", "--temperature", "1", "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert fake_reward[0] == "rm-dir" and len(fake_reward) == 3  # loaded, then one call per prompt
    assert [r["prompt"] for r in rows] == [0, 1]
    assert [r["messages"][0]["content"] for r in rows] == PROMPTS[:2]
    for row in rows:
        scored = next(c for c in fake_reward[1:] if c[0][0] == row["messages"][0])
        assert row["score"] == max(len(c[-1]["content"]) for c in scored) and len(row["messages"]) == 2
    assert "samples/s" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing_field", "prompts.jsonl:2: expected a 'messages' list or a 'prompt' string (keys found: text)"),
    ("bad_json", "prompts.jsonl:1: not valid JSON"),
    ("ends_with_assistant_only", "prompts.jsonl:1: the prompt must end with a user message"),
    ("empty", "prompts.jsonl holds no prompts"),
    ("missing", "prompts file"),
    ("k0", "-k must be at least 1 (got 0)"),
    ("top_p", "top_p"),
])
def test_bad_inputs_are_one_line_and_exit_1(tiny_dir, tmp_path, fake_reward, capsys, case, message):
    lines = {"missing_field": ['{"prompt": "hi"}', '{"text": "hi"}'], "bad_json": ["{oops"],
             "ends_with_assistant_only": ['{"messages": [{"role": "assistant", "content": "x"}]}'],
             "empty": ["", "  "]}.get(case, ['{"prompt": "hi"}'])
    data = write(tmp_path / "prompts.jsonl", lines)
    if case == "missing":
        data = tmp_path / "nope.jsonl"
    argv = ["train", "sample", "--policy", str(tiny_dir), "--reward", "rm", "--data", str(data),
            "--out", str(tmp_path / "o.jsonl"), "-k", "0" if case == "k0" else "2",
            "--top-p", "2" if case == "top_p" else "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and message in err and "\n" not in err, err
    assert fake_reward == [] and not (tmp_path / "o.jsonl").exists()  # nothing loaded, nothing written


# -- the real model ---------------------------------------------------------------------------

@pytest.mark.integration
def test_smollm2_native_runner_shares_the_prefill_and_k1_greedy_is_chat(smollm2_fast, monkeypatch):
    policy = smollm2_fast  # its Q4_1 blocks: the native runner (the sampler takes over its runner, then gives it back)
    assert type(policy.runner).__name__ == "NativeRunner"
    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Name a fruit."}]]
    rows = rejection_sample(policy, prompts, lambda cs: [0.0] * len(cs), k=1, temperature=0, max_tokens=12)
    for row, m in zip(rows, prompts):
        assert row["messages"][-1]["content"] == "".join(
            policy.chat(m, temperature=0, repeat_penalty=1.0, num_predict=12))
    assert "Paris" in rows[0]["messages"][-1]["content"]
    options = {**PLAIN, "temperature": 1.0, "top_p": 0.9, "num_predict": 5}
    counted = Counted(policy.runner, monkeypatch)
    got = dict(generate_samples(policy, prompts, 3, options, seed=1, parallel=8))
    assert counted.tokens == sum(len(policy.encode_chat(p)) for p in prompts) and len(counted.forks) == 2
    monkeypatch.undo()
    seeds = random.Random(1)
    for i, m in enumerate(prompts):
        for s in got[i]:
            assert s.tokens == alone(policy, m, seeds.getrandbits(63), **options)
