"""16-bit float checkpoints (a Hugging Face directory in bf16 / f16) on the native kernels' float
path: weights kept as stored, widened to float32 as they are multiplied (`float_blocks_state_dict`).
The reference is the same checkpoint loaded as float32 torch modules (`dtype=torch.float32`): the
same weights exactly, so only the order of the float32 sums differs."""

import pytest
import torch

import llamaherd
from llamaherd.engine.runner import NativeRunner, TorchRunner
from llamaherd.quantize import native
from test_kquant import write_tiny_gguf

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the native kernels (a C compiler, AVX2)")
TOKENS = list(range(40, 90))


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def hf16(request, tmp_path_factory):
    """(the 16-bit directory loaded as stored, the same loaded as float32 torch modules)."""
    from llamaherd.export.hf import save_hf
    from llamaherd.weights import load_checkpoint

    tmp = tmp_path_factory.mktemp("f16")
    ckpt = load_checkpoint(write_tiny_gguf(tmp / "tiny-f32.gguf", 192, quant="f32"))
    path = save_hf(ckpt.state_dict, ckpt.args, ckpt.tokenizer, tmp / "hf", dtype=request.param)
    return llamaherd.load(path, device="cpu"), llamaherd.load(path, device="cpu", dtype=torch.float32), request.param


def test_16_bit_weights_are_kept_as_stored_and_run_natively(hf16):
    fast, ref, dtype = hf16
    assert isinstance(fast.runner, NativeRunner) and isinstance(ref.runner, TorchRunner)
    wqkv, ref_attn = fast.model.layers[0].attention.wqkv, ref.model.layers[0].attention
    assert wqkv.raw.dtype == torch.uint8 and wqkv.raw.numel() == 2 * (192 + 2 * 96) * 192
    want = torch.cat([ref_attn.wq.weight, ref_attn.wk.weight, ref_attn.wv.weight])
    assert torch.equal(wqkv.raw.view(dtype).float(), want)  # the file's bits, not rounded again
    assert fast.model.output.raw.data_ptr() == fast.model.tok_embeddings.raw.data_ptr()  # tied: held once
    assert torch.equal(fast.model.tok_embeddings(torch.tensor(TOKENS)), ref.model.tok_embeddings(torch.tensor(TOKENS)))


def test_prompt_and_decode_follow_the_float32_model(hf16):
    fast, ref, _ = hf16
    want = ref.runner.logits(TOKENS)
    for runner in (fast.runner, ref.runner):
        runner.allocate(2, 128)
    got_prefill = fast.runner.prefill([(TOKENS[:40], 0, 0)])[0]
    assert torch.allclose(got_prefill, want[39], atol=1e-4, rtol=1e-4)
    steps = [fast.runner.decode([t], [40 + i], [0])[0] for i, t in enumerate(TOKENS[40:])]
    assert torch.allclose(torch.stack(steps), want[40:], atol=1e-4, rtol=1e-4)
    # batched rows get the numbers they get alone
    fast.runner.prefill([(TOKENS[:40], 0, 1)])
    both = fast.runner.decode([TOKENS[40], TOKENS[40]], [40, 40], [0, 1])
    assert torch.equal(both[0], both[1]) and torch.equal(both[0], steps[0])


def test_greedy_output_is_the_float32_models(hf16):
    fast, ref, _ = hf16
    opts = dict(temperature=0, num_predict=12)
    assert list(fast.generate("abc", raw=True, **opts)) == list(ref.generate("abc", raw=True, **opts))


def test_scalar_path_equals_simd_path(hf16):
    fast, _, _ = hf16
    w = fast.model.layers[1].feed_forward.w13
    x = torch.randn(3, w.in_features)
    simd = w(x)
    native.library().kq_force_scalar(1)
    try:
        scalar = w(x)
    finally:
        native.library().kq_force_scalar(0)
    assert torch.allclose(simd, scalar, atol=1e-5, rtol=1e-5)


def test_float32_request_keeps_the_torch_modules(hf16, tmp_path):
    _, ref, _ = hf16
    assert type(ref.model.layers[0].attention.wqkv).__name__ != "BlockLinear"
