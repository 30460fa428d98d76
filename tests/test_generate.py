"""Generation on the real SmolLM2-135M-Instruct GGUF, against HF transformers on the same file."""

import math

import pytest
import torch

from llamaherd.errors import HerdError
from llamaherd.generate import SamplingOptions, apply_penalties, logits_to_probs, make_generator, sample
from llamaherd.chat.text import stop_prefix_len as _stop_prefix_len

RAW_PROMPTS = [
    "The history of the Roman Empire",
    "def quicksort(arr):\n",
    "Once upon a time, in a small village by the sea,",
]
CHAT_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works, step by step.",
]
GREEDY = dict(temperature=0, repeat_penalty=1.0, num_predict=40)


def assert_hf_greedy(model, ids, ours, n, eos_ids):
    """transformers' greedy choice at every step of `ours` is `ours`: one teacher-forced forward over
    prompt + reply (the argmax after each prefix), which is what `generate(do_sample=False)` would pick
    step by step, without its n sequential steps. A reply shorter than n must end where HF picks an
    end-of-turn token."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + ours])).logits[0, len(ids) - 1:]
    picks = logits.argmax(-1).tolist()
    assert picks[:len(ours)] == ours
    if len(ours) < n:
        assert picks[len(ours)] in eos_ids


def our_tokens(llm, ids, **options):
    return [t for c in llm.stream(ids, llm.options(**options)) for t in c.tokens]


@pytest.fixture(scope="module")
def reference_greedy(smollm2_ref):
    """The float32 reference's greedy tokens for a prompt, computed once per module (two tests
    compare against them: one with transformers, one with the quantized path)."""
    memo = {}

    def tokens(ids: list[int]) -> list[int]:
        if tuple(ids) not in memo:
            memo[tuple(ids)] = our_tokens(smollm2_ref, ids, **GREEDY)
        return memo[tuple(ids)]
    return tokens


@pytest.mark.parametrize("prompt", RAW_PROMPTS)
def test_greedy_raw_matches_hf(smollm2_ref, hf_smollm2_model, reference_greedy, prompt):
    ids = smollm2_ref.encode(prompt)
    ours = reference_greedy(ids)
    assert len(ours) >= 32
    assert_hf_greedy(hf_smollm2_model, ids, ours, GREEDY["num_predict"], smollm2_ref.tokenizer.stop_ids)


@pytest.mark.parametrize("prompt", CHAT_PROMPTS)
def test_greedy_chat_matches_hf(smollm2_ref, hf_smollm2_model, hf_smollm2, reference_greedy, prompt):
    messages = [{"role": "user", "content": prompt}]
    ids = smollm2_ref.encode_chat(messages)
    assert ids == hf_smollm2.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
    ours = reference_greedy(ids)
    assert len(ours) >= 32
    assert_hf_greedy(hf_smollm2_model, ids, ours, GREEDY["num_predict"], smollm2_ref.tokenizer.stop_ids)


def test_capital_of_france(smollm2_fast):
    reply = "".join(smollm2_fast.chat([{"role": "user", "content": "What is the capital of France?"}],
                                      temperature=0))
    assert "Paris" in reply


def test_logits_match_hf(smollm2_ref, hf_smollm2_model):
    ids = smollm2_ref.encode("A logit test: every number counts, 1 2 3.")
    with torch.no_grad():
        theirs = hf_smollm2_model(torch.tensor([ids])).logits[0]
    assert (smollm2_ref.logits(ids) - theirs).abs().max() <= 1e-3


def test_fast_path_accuracy(smollm2_ref, smollm2_fast, heldout_text):
    """The 4-bit path feeds bf16 to its matmuls: teacher-forced top-1 agreement >= 99% and
    perplexity within 1% of the float32 reference, on text neither was tuned on."""
    ids = smollm2_ref.encode(heldout_text)
    ref, fast = smollm2_ref.logits(ids), smollm2_fast.logits(ids)
    agree = (ref.argmax(-1) == fast.argmax(-1)).float().mean().item()
    target = torch.tensor(ids[1:])

    def ppl(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1], target).item())

    assert agree >= 0.99, agree
    assert abs(ppl(fast) / ppl(ref) - 1) <= 0.01, (ppl(fast), ppl(ref))


@pytest.mark.parametrize("prompt", RAW_PROMPTS + CHAT_PROMPTS)
def test_fast_path_greedy_equals_the_reference(smollm2_fast, reference_greedy, prompt):
    """The quantized CPU path (native kernel, exact top-logit refinement) picks the same greedy
    tokens as the float32 reference on the test prompts."""
    ids = (smollm2_fast.encode(prompt) if prompt in RAW_PROMPTS
           else smollm2_fast.encode_chat([{"role": "user", "content": prompt}]))
    assert our_tokens(smollm2_fast, ids, **GREEDY) == reference_greedy(ids)


def test_same_seed_same_output(smollm2_fast):
    ids = smollm2_fast.encode("My favourite colour is")
    opts = dict(temperature=1.0, top_k=50, top_p=0.95, seed=1234, num_predict=24)
    first = our_tokens(smollm2_fast, ids, **opts)
    assert first == our_tokens(smollm2_fast, ids, **opts)
    others = [our_tokens(smollm2_fast, ids, **{**opts, "seed": s}) for s in (1, 2, 3)]
    assert any(o != first for o in others)


def test_num_predict_and_done_reason(smollm2_fast):
    ids = smollm2_fast.encode(RAW_PROMPTS[2])
    chunks = list(smollm2_fast.stream(ids, smollm2_fast.options(temperature=0, num_predict=5)))
    done = chunks[-1]
    assert done.done and done.done_reason == "length" and done.eval_count == 5
    assert done.prompt_eval_count == len(ids) or done.prompt_eval_count < len(ids)  # prefix reuse
    assert sum(len(c.tokens) for c in chunks) == 5


def test_stop_string_is_cut_and_ends_generation(smollm2_fast):
    ids = smollm2_fast.encode(RAW_PROMPTS[2])
    full = "".join(c.text for c in smollm2_fast.stream(ids, smollm2_fast.options(temperature=0, num_predict=12)))
    word = full.split()[1]  # a word the model will produce
    chunks = list(smollm2_fast.stream(ids, smollm2_fast.options(temperature=0, num_predict=12, stop=[word])))
    text = "".join(c.text for c in chunks)
    assert word not in text and full.startswith(text)
    assert chunks[-1].done_reason == "stop"


@pytest.mark.parametrize("which", ["smollm2_ref", "smollm2_fast"])
def test_prefix_reuse_gives_identical_output(request, which):
    """A chat's earlier turns are not recomputed, and reusing them changes nothing, bit for bit."""
    llm = request.getfixturevalue(which)
    a = [{"role": "system", "content": "You are a helpful assistant who knows a great deal about fruit, "
                                       "vegetables, gardens, markets and cooking. " * 6},
         {"role": "user", "content": "Name a fruit."}]
    first = "".join(llm.chat(a, temperature=0, num_predict=10))
    b = a + [{"role": "assistant", "content": first}, {"role": "user", "content": "Another one?"}]
    ids = llm.encode_chat(b)
    opts = llm.options(temperature=0, num_predict=10)
    warm = list(llm.stream(ids, opts))
    assert len(ids) > 2 * 64 and warm[-1].prompt_eval_count < len(ids)  # the shared prefix was reused
    llm.runner.release()  # a cold cache
    cold = list(llm.stream(ids, opts))
    assert cold[-1].prompt_eval_count == len(ids)
    assert [t for c in warm for t in c.tokens] == [t for c in cold for t in c.tokens]


def test_prompt_longer_than_context(smollm2_fast):
    long = "word " * 300
    with pytest.raises(HerdError, match="does not fit the context"):
        list(smollm2_fast.generate(long, raw=True, num_ctx=64))
    # chat keeps the newest messages that fit
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(20):
        messages += [{"role": "user", "content": f"Message number {i} is about topic {i}."},
                     {"role": "assistant", "content": f"Noted {i}."}]
    messages.append({"role": "user", "content": "Which number came last?"})
    ids = smollm2_fast.fit_chat(messages, num_ctx=256)
    text = smollm2_fast.tokenizer.decode(ids)
    assert len(ids) <= 192 and "Be brief." in text and "Which number came last?" in text
    assert "Message number 0 " not in text and "Message number 19 " in text
    with pytest.raises(HerdError, match="does not fit"):
        smollm2_fast.fit_chat([{"role": "user", "content": long}], num_ctx=64)
    with pytest.raises(HerdError, match="exceeds the model's context"):
        smollm2_fast.options(num_ctx=10 ** 6)


def test_bad_options_are_clear_errors(smollm2_fast):
    with pytest.raises(HerdError, match="temperature must be a finite number"):
        smollm2_fast.options(temperature="hot")
    with pytest.raises(HerdError, match="top_k must be an integer"):
        smollm2_fast.options(top_k=2.5)
    with pytest.raises(HerdError, match="num_predict must be between -2 and"):
        smollm2_fast.options(num_predict=-7)


def test_sampling_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    probs = logits_to_probs(logits, SamplingOptions(temperature=1.0, top_k=2, top_p=1.0))
    assert (probs[2:] == 0).all() and probs[:2].sum().item() == pytest.approx(1.0)
    probs = logits_to_probs(logits, SamplingOptions(temperature=1.0, top_k=0, top_p=0.5))
    assert (probs > 0).tolist() == [True, False, False, False, False]  # p(top) = 0.64 >= 0.5
    probs = logits_to_probs(logits, SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3))
    assert (probs > 0).tolist() == [True, True, False, False, False]  # e^-1 >= 0.3 > e^-2
    penalised = apply_penalties(torch.tensor([2.0, -2.0, 1.0]), [0, 1], SamplingOptions(repeat_penalty=2.0))
    assert penalised.tolist() == [1.0, -4.0, 1.0]
    opts = SamplingOptions(repeat_penalty=1.0, frequency_penalty=0.5, presence_penalty=0.25)
    assert apply_penalties(torch.tensor([2.0, -2.0, 1.0]), [0, 1, 0], opts).tolist() == [0.75, -2.75, 1.0]


def test_sample_draws_from_the_top_k_in_proportion():
    # sample() softmaxes only the k best; the draws must still follow softmax over them, never another id
    logits = torch.full((1000,), -5.0)
    logits[[7, 300, 999]] = torch.tensor([2.0, 1.0, 0.0])
    opts = SamplingOptions(temperature=1.0, top_k=3, top_p=1.0, repeat_penalty=1.0)
    g = make_generator(0)
    draws = [sample(logits, [], opts, g) for _ in range(3000)]
    assert set(draws) <= {7, 300, 999}
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    for token, p in zip([7, 300, 999], expected.tolist()):
        assert draws.count(token) / len(draws) == pytest.approx(p, abs=0.03)


def test_stop_prefix_holdback():
    assert _stop_prefix_len("Hello wor", ["world"]) == 3
    assert _stop_prefix_len("Hello", ["world"]) == 0
    assert _stop_prefix_len("ab<|", ["<|end|>", "x"]) == 2


@pytest.fixture(scope="session")
def heldout_text():
    from pathlib import Path
    return (Path(__file__).parent / "data" / "heldout.txt").read_text()


SPECULATION_PROMPTS = [  # replies that repeat themselves or their prompt, where guesses hold
    "Write the numbers from 1 to 40 separated by commas.",
    "Convert this to JSON: name Alice, age 30, city Paris; name Bob, age 25, city Rome.",
]


@pytest.mark.parametrize("prompt", SPECULATION_PROMPTS)
def test_speculation_changes_nothing_but_the_number_of_steps(smollm2_fast, prompt, monkeypatch):
    """Prompt-lookup guesses checked in one native step: the greedy output is the same token for
    token, with or without penalties, and guesses were really taken (fewer steps than tokens)."""
    from llamaherd.quantize import native

    steps = []
    decode = native.decode
    monkeypatch.setattr(native, "decode", lambda m, t, *a: steps.append(len(t)) or decode(m, t, *a))
    ids = smollm2_fast.encode_chat([{"role": "user", "content": prompt}])
    for penalty in (1.0, 1.1):
        steps.clear()
        plain = our_tokens(smollm2_fast, ids, temperature=0, repeat_penalty=penalty, num_predict=64)
        plain_steps = len(steps)
        steps.clear()
        fast = our_tokens(smollm2_fast, ids, temperature=0, repeat_penalty=penalty, num_predict=64, speculate=6)
        assert fast == plain
        assert max(steps) > 1 and len(steps) < plain_steps
