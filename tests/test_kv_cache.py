"""KV-cache element types (f32 / f16 / q8_0, as llama.cpp's --cache-type-k/v) and the native
attention over them: GQA tiles read once for a group of query heads, online softmax, key spans
merged at the end (kernels/decode.c)."""

import logging

import pytest
import torch

import llamaherd
from llamaherd import settings
from llamaherd.config import ModelArgs
from llamaherd.engine import kvcache
from llamaherd.engine.runner import NativeRunner, TorchRunner, make_runner
from llamaherd.errors import HerdError
from llamaherd.model import Transformer
from llamaherd.quantize import native

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]
N_GREEDY = 10


@pytest.fixture(scope="module")
def model(smollm2_path):
    """SmolLM2's GGUF blocks (the native runner), a model of its own: the runners here swap its cache."""
    return llamaherd.load(smollm2_path, device="cpu", quantized=True).model


def greedy(runner, ids: list[int], n: int, forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens after `ids` in row 0 (or the `forced` ones: teacher forcing), and the logits
    (n, V) each was chosen from."""
    runner.allocate(1, 2048)
    logits = runner.prefill([(ids, 0, 0)])[0]
    tokens, seen = [], []
    for i in range(n):
        seen.append(logits)
        tokens.append(int(logits.argmax()) if forced is None else forced[i])
        logits = runner.decode([tokens[-1]], [len(ids) + i], [0])[0]
    return tokens, torch.stack(seen)


@pytest.fixture(scope="module")
def runs(model, smollm2):
    """Greedy tokens and logits of every prompt with each cache type (q8_0: fed f32's tokens)."""
    out = {}
    for kv in ("f32", "f16", "q8_0"):
        runner = make_runner(model, kv)
        assert isinstance(runner, NativeRunner) and runner.kv_cache_type == kv
        forced = [tokens for tokens, _ in out["f32"]] if kv == "q8_0" else [None] * len(PROMPTS)
        out[kv] = [greedy(runner, smollm2.encode(p), N_GREEDY, f) for p, f in zip(PROMPTS, forced)]
        assert model.layers[0].attention.cache.k.dtype == kvcache.cache_dtype(model, kv)
    return out


def test_an_f16_cache_gives_the_f32_cache_greedy_tokens(runs):
    """Logits within 1e-2 of their largest magnitude (measured: <= 6e-4), the same greedy tokens on
    every test prompt."""
    for (want_tokens, want), (got_tokens, got) in zip(runs["f32"], runs["f16"]):
        assert got_tokens == want_tokens
        assert (got - want).abs().max() < 1e-2 * want.abs().max()


def test_a_q8_0_cache_stays_close(runs):
    """Q8_0 rounds keys and values to 8 bits (as llama.cpp's q8_0 cache): logits within 3% of their
    largest magnitude (measured: <= 2%, ~0.4 logits), so a near tie may flip — teacher-forced, the
    top token equals f32's wherever f32's first two are 1 logit apart or more."""
    for (_, want), (_, got) in zip(runs["f32"], runs["q8_0"]):
        assert (got - want).abs().max() < 0.03 * want.abs().max()
        top2 = want.topk(2).values
        clear = top2[:, 0] - top2[:, 1] >= 1.0
        assert clear.sum() >= N_GREEDY // 2
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_q8_0_blocks_are_ggmls(model, smollm2):
    """The cache's bytes are ggml's Q8_0 quantization of the keys (`gguf.quants.quantize`)."""
    gguf = pytest.importorskip("gguf")
    ids = smollm2.encode(PROMPTS[2])
    keys = {}
    for kv in ("f32", "q8_0"):
        runner = make_runner(model, kv)
        runner.allocate(1, 64)
        runner.prefill([(ids, 0, 0)])
        # layer 0: its keys do not depend on the cache type of the layers before
        keys[kv] = model.layers[0].attention.cache.k[0, :, :len(ids)].clone()
    keys_f32, keys = keys["f32"], keys["q8_0"]
    want = gguf.quants.quantize(keys_f32.numpy().reshape(-1, model.args.head_dim), gguf.GGMLQuantizationType.Q8_0)
    assert (want.reshape(-1) == keys.numpy().reshape(-1)).all()


def test_the_default_is_f32(model, monkeypatch):
    """Not f16 (yet): with it the native path left the f32 reference's greedy tokens at one of
    test_generate's prompts."""
    monkeypatch.delenv("HERD_KV_CACHE_TYPE", raising=False)
    assert make_runner(model).kv_cache_type == "f32"


def test_the_cache_costs_what_its_type_says(model):
    n_layers, K, Dh = model.args.n_layers, model.args.n_kv_heads, model.args.head_dim
    sizes = {kv: make_runner(model, kv).bytes_per_position for kv in ("f32", "f16", "q8_0")}
    assert sizes == {"f32": n_layers * 2 * K * Dh * 4, "f16": n_layers * 2 * K * Dh * 2,
                     "q8_0": n_layers * 2 * K * Dh // 32 * 34}


@pytest.mark.slow
def test_long_prompts_equal_sdpa(model, smollm2):
    """A prompt past several key tiles (KV_TILE, 64 positions) and two key spans (KV_SPAN, 512) of
    kernels/decode.c: the native prefill and a decode step after it equal the torch modules (SDPA
    over the whole f32 cache)."""
    text = (" ".join(PROMPTS) + " ") * 50
    ids = smollm2.encode(text)[:700]
    assert len(ids) == 700
    runner = make_runner(model, "f32")
    runner.allocate(1, 1200)
    got = runner.prefill([(ids, 0, 0)])[0]
    got_next = runner.decode([ids[-1]], [len(ids)], [0])[0]
    model.setup_cache(1, 1200)  # the torch modules' own f32 cache
    with torch.inference_mode():
        want = model(torch.tensor([ids]), torch.arange(len(ids))[None], last_only=True)[0, -1]
        want_next = model(torch.tensor([[ids[-1]]]), torch.tensor([[len(ids)]]))[0, -1]
    for g, w in ((got, want), (got_next, want_next)):
        # prompt blocks: float32 matmuls on both sides; the step: int16 activations (as test_native_decode)
        assert (g - w).abs().max() < 1e-2 * w.abs().max()
        assert torch.equal(g.topk(5).indices, w.topk(5).indices)


def test_q8_0_rows_do_not_depend_on_the_batch(model, smollm2):
    """Continuous batching with a quantized cache: a row's logits alone and beside others, to the bit."""
    runner = make_runner(model, "q8_0")
    runner.allocate(3, 256)
    ids = [smollm2.encode(p) for p in PROMPTS]
    runner.prefill([(x, 0, row) for row, x in enumerate(ids)])
    tokens, positions, rows = [x[-1] for x in ids], [len(x) for x in ids], [0, 1, 2]
    together = runner.decode(tokens, positions, rows)
    alone = runner.decode(tokens[1:2], positions[1:2], rows[1:2])[0]
    assert torch.equal(alone, together[1])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=128, max_seq_len=128)
    m = Transformer(args)
    m.init_weights(std=0.1)
    return m.eval()


def test_float_models_keep_a_16_bit_cache_and_refuse_q8_0(tiny, caplog):
    ids = [3, 14, 15, 92, 65, 35]
    f32 = make_runner(tiny, "f32")
    want_tokens, want = greedy(f32, ids, 8)
    f16 = make_runner(tiny, "f16")
    assert isinstance(f16, TorchRunner)
    got_tokens, got = greedy(f16, ids, 8)
    assert tiny.layers[0].attention.cache.k.dtype == torch.float16
    assert got_tokens == want_tokens and (got - want).abs().max() < 1e-2 * want.abs().max()
    with caplog.at_level(logging.WARNING, logger="llamaherd.engine"):
        assert make_runner(tiny, "q8_0").kv_cache_type == "f16"
    assert "q8_0 KV cache needs the native CPU kernels" in caplog.text


def test_the_setting(monkeypatch, tiny):
    assert settings.kv_cache_type({}) == "f32" and settings.kv_cache_type({"HERD_KV_CACHE_TYPE": "Q8_0"}) == "q8_0"
    with pytest.raises(HerdError, match="HERD_KV_CACHE_TYPE must be one of f32, f16, q8_0"):
        settings.kv_cache_type({"HERD_KV_CACHE_TYPE": "q4"})
    monkeypatch.delenv("HERD_KV_CACHE_TYPE", raising=False)
    assert make_runner(tiny).kv_cache_type == "f32"
    assert make_runner(tiny.to(torch.bfloat16)).kv_cache_type == "f16"  # a 16-bit model: its own dtype, as before
    tiny.float()
    monkeypatch.setenv("HERD_KV_CACHE_TYPE", "f16")
    assert make_runner(tiny).kv_cache_type == "f16"
    with pytest.raises(ValueError, match="kv_cache_type must be one of"):
        make_runner(tiny, "bf16")
