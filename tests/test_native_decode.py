"""The native decode step (kernels/decode.c) against the model's torch modules, on real SmolLM2."""

import pytest
import torch

import llamaherd
from llamaherd.engine.runner import NativeRunner, TorchRunner, make_runner
from llamaherd.quantize import native

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the native kernels (a C compiler, AVX2)")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]


@pytest.fixture(scope="module")
def model(smollm2_path):
    """A model of its own: these tests write its KV cache behind the `Llama` object's back."""
    return llamaherd.load(smollm2_path, device="cpu", quantized=True).model


@pytest.fixture(scope="module")
def rows_filled(model, smollm2):
    """Three prompts prefilled into cache rows 2, 0, 1 by the torch modules; (tokens, positions, rows)
    of the step that follows each."""
    model.setup_cache(3, 256)
    tokens, positions, rows = [], [], []
    for row, prompt in zip([2, 0, 1], PROMPTS):
        ids = smollm2.encode(prompt)
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], rows=torch.tensor([row]))
        tokens.append(int(logits[0, -1].argmax()))
        positions.append(len(ids))
        rows.append(row)
    return tokens, positions, rows


def test_it_applies_to_gguf_block_models(model, rows_filled):
    """The SmolLM2 GGUF on this machine must take the native runner, not silently fall back."""
    assert isinstance(make_runner(model), NativeRunner)


def test_it_equals_the_torch_modules(model, rows_filled):
    tokens, positions, rows = rows_filled
    got = native.decode(model, tokens, positions, rows)
    for i, (token, pos, row) in enumerate(zip(tokens, positions, rows)):
        want = model(torch.tensor([[token]]), torch.tensor([[pos]]), rows=torch.tensor([row]))[0, -1]
        # the same weights and activation blocks; only float summation orders differ
        assert (got[i] - want).abs().max() < 1e-2 * want.abs().max()
        assert got[i].argmax() == want.argmax()
        assert torch.equal(got[i].topk(5).indices, want.topk(5).indices)


def test_rows_do_not_depend_on_the_batch(model, rows_filled):
    """Continuous batching: a sequence's logits are the same alone or beside others, to the bit."""
    tokens, positions, rows = rows_filled
    together = native.decode(model, tokens, positions, rows)
    for i in range(3):
        assert torch.equal(native.decode(model, tokens[i:i + 1], positions[i:i + 1], rows[i:i + 1])[0], together[i])
    assert torch.equal(native.decode(model, tokens[1:], positions[1:], rows[1:]), together[1:])


def test_positions_outside_the_cache_are_refused(model, rows_filled):
    with pytest.raises(IndexError):
        native.decode(model, [1], [256], [0])
    with pytest.raises(IndexError):
        native.decode(model, [1], [5], [3])
    with pytest.raises(IndexError):
        native.decode(model, [1], [5], [-1])


def test_a_new_cache_gets_a_new_description(model, rows_filled):
    first = native.decoder(model)
    model.setup_cache(1, 64)
    try:
        assert native.decoder(model) is not first and native.decoder(model).max_seq == 64
    finally:
        model.setup_cache(3, 256)  # as rows_filled left it (for tests run after this one)


def test_float_models_take_the_torch_modules(smollm2_ref):
    assert isinstance(make_runner(smollm2_ref.model), TorchRunner)


@pytest.mark.parametrize("repeat", [1, 27])  # 11 tokens: decoding's path; ~300: prompt-path blocks, then a tail
def test_prefill_equals_the_torch_modules_and_resumes_exactly(model, smollm2, repeat):
    """The native prompt path against the torch modules; and a prompt resumed after a cached prefix
    that ends on a block boundary (as `Llama` resumes) gets the same keys, values and logits, to the
    bit. Short prompts (all int16) can be split anywhere."""
    ids = smollm2.encode("The river that ran past the old mill carried boats. " * repeat)
    assert (len(ids) < native.DENSE_ROWS) == (repeat == 1) and (len(ids) > native.PROMPT_ROWS) == (repeat > 1)
    model.setup_cache(1, 512)
    want = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1]
    model.setup_cache(1, 512)
    whole = native.prefill(model, ids, 0)
    keys = model.layers[-1].attention.cache.k[0, :, :len(ids)].clone()
    assert (whole - want).abs().max() < 1e-2 * want.abs().max()
    assert torch.equal(whole.topk(5).indices, want.topk(5).indices)
    blocks = [n for n in (64, 128, 256) if n < len(ids)]
    for split in blocks or [1, 5, len(ids) - 1]:
        model.setup_cache(1, 512)
        native.prefill(model, ids[:split], 0)
        assert torch.equal(native.prefill(model, ids[split:], split), whole)
        assert torch.equal(model.layers[-1].attention.cache.k[0, :, :len(ids)], keys)


def test_prompts_prefilled_together_get_what_they_get_alone(model, smollm2):
    """The server prefills waiting prompts in one call: each must come out as if alone, to the bit,
    whether short (decoding's path) or long (prompt-path blocks and a tail)."""
    prompts = [smollm2.encode(p) for p in PROMPTS] + [smollm2.encode("Rivers carry boats past mills. " * 20)]
    assert max(map(len, prompts)) > native.DENSE_ROWS
    model.setup_cache(len(prompts), 256)
    alone = [native.prefill(model, ids, 0, row) for row, ids in enumerate(prompts)]
    keys = model.layers[3].attention.cache.k.clone()
    model.setup_cache(len(prompts), 256)
    together = native.prefill_many(model, [(ids, 0, row) for row, ids in enumerate(prompts)])
    for row, ids in enumerate(prompts):
        assert torch.equal(together[row], alone[row])
        assert torch.equal(model.layers[3].attention.cache.k[row, :, :len(ids)], keys[row, :, :len(ids)])


@pytest.mark.parametrize("dense, start", [(False, 0), (True, 0), (True, 600)])  # decoding's, prompt path; keys in 2 spans
def test_the_last_block_for_the_kept_rows_alone_gives_their_bits(model, smollm2, dense, start):
    """A prompt's call wants its last row's state only (`prefill_many`): with `keep` the last block
    computes the kept rows alone, after storing every row's keys and values; each kept row must
    come out as it does when all rows are computed, to the bit (its logits too), and the cache be
    the same. `start`: the prompts resume at that position (past the first span of keys)."""
    prompts = [smollm2.encode(p) for p in PROMPTS]
    tokens = [t for ids in prompts for t in ids]
    positions = [start + p for ids in prompts for p in range(len(ids))]
    rows = [row for row, ids in enumerate(prompts) for _ in ids]
    ends = [sum(map(len, prompts[:i + 1])) - 1 for i in range(len(prompts))]
    keep = sorted({1, *ends})  # each prompt's last row, and one from the middle of the first
    vocab = model.output.out_features

    def run(keep=None):
        model.setup_cache(3, start + 64)
        for layer in model.layers:  # what the earlier positions hold: the same in both runs
            layer.attention.cache.k[:, :, :start].normal_(generator=torch.Generator().manual_seed(1))
            layer.attention.cache.v[:, :, :start].normal_(generator=torch.Generator().manual_seed(2))
        logits = torch.empty(len(tokens) if keep is None else len(keep), vocab)
        x = native._run(model, tokens, positions, rows, dense=dense, keep=keep,
                        logits=logits if native.decoder(model).output else None)
        return x, logits, [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers]

    every, every_logits, cache = run()
    kept, kept_logits, kept_cache = run(keep)
    assert kept.shape == (len(keep), every.shape[1]) and torch.equal(kept, every[keep])
    assert torch.equal(kept_logits, every_logits[keep])
    for (k, v), (k2, v2) in zip(cache, kept_cache):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    for bad in ([3, 1], [len(tokens)], []):
        with pytest.raises(ValueError):
            native._run(model, tokens, positions, rows, dense=dense, keep=bad)


def test_a_prompt_gets_the_numbers_decoding_gives_it(model, smollm2, prompt_is_decoding):
    """SmolLM2's Q4_1 / Q8_0 layers: a prompt's many rows (the int16 panel of kernels/blockmm.c) and
    the same tokens decoded one at a time (its few-row tiles) are the same integer products scaled in
    the same order: the same keys, values and logits, to the bit."""
    ids = smollm2.encode(PROMPTS[2])
    assert len(ids) >= 9  # panel.h's PANEL_ROWS
    prompt_is_decoding(model, ids)
