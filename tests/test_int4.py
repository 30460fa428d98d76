"""GGUF 4-bit weights kept 4-bit in torch's int4 layers (`Int4Linear`): the CUDA path (tinygemm),
tested here through the kernel's CPU twin with the same codes, scales and zeros."""

import numpy as np
import pytest
import llamaherd  # noqa: F401 — before torch: the OpenMP wait policy (settings.py)
import torch
from gguf import GGMLQuantizationType as Q

from llamaherd.quantize.ggml import dequantize
from llamaherd.quantize.linear import (GROUP, Int4Linear, dequantized_weight, inner_k_tiles, pack_gguf_tensor,
                                       pack_gguf_tensors)
from test_kquant import write_tiny_gguf

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="torch without the int4 CPU kernel")


def blocks(qtype, out_features=64, in_features=512, seed=0) -> np.ndarray:
    """GGUF blocks of a random (out, in) weight: gguf's quantizer, ours for Q4_K."""
    from llamaherd.quantize.blocks import quantize

    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return quantize(w, qtype).numpy()


def int4_layer(raw, qtype, shape) -> Int4Linear:
    kind, buffers = pack_gguf_tensor(raw, qtype, shape, gpu=True)
    assert kind == "int4"
    layer = Int4Linear(shape[1], shape[0])
    for name, tensor in buffers.items():
        setattr(layer, name, tensor)
    layer.pack()
    return layer


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4_weights_are_the_files_blocks(qtype):
    """The kernel's weights are the file's values up to the bf16 rounding of each group's scale and
    zero and of the weight itself: within 2^-7 of the group's largest value (a wrong nibble order,
    zero-point sign or group size is off by whole quantization steps, ~1/8 of it)."""
    raw = blocks(qtype)
    ref = dequantize(raw, qtype, (64, 512))
    got = dequantized_weight(int4_layer(raw, qtype, (64, 512)))
    group_max = ref.view(64, -1, GROUP).abs().amax(-1, keepdim=True).expand(-1, -1, GROUP).reshape(64, 512)
    assert ((got - ref).abs() <= 2 ** -7 * group_max).all()
    assert (got - ref).abs().max() > 0  # bf16 really rounds something: the bound is what is tested


def test_q4_0_with_bf16_scales_is_exact():
    """Where a Q4_0 block's scale is a bf16 number, the kernel's weight is the file's, rounded to
    bf16 once (what tinygemm's bf16 fused multiply-add gives on CUDA)."""
    raw = blocks(Q.Q4_0).copy().reshape(-1, 18)
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)
    d = torch.from_numpy(d).bfloat16().float().numpy().astype(np.float16)  # 8 significant bits: exact in f16 too
    raw[:, :2] = d.view(np.uint8)
    ref = dequantize(raw, Q.Q4_0, (64, 512))
    assert torch.equal(dequantized_weight(int4_layer(raw, Q.Q4_0, (64, 512))), ref.bfloat16().float())


def test_matmul_and_fused_parts():
    """x @ W.T against the file's float weights (bf16 activations), and a fused projection of parts
    of different 4-bit types computes what its parts compute, to the bit."""
    parts = [(blocks(qtype, n, 512, seed), qtype, (n, 512)) for seed, (qtype, n) in
             enumerate([(Q.Q4_K, 64), (Q.Q4_0, 32), (Q.Q4_1, 32)])]
    layers = [int4_layer(*p) for p in parts]
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(1))
    for layer, (raw, qtype, shape) in zip(layers, parts):
        want = x.bfloat16().float() @ dequantize(raw, qtype, shape).T
        torch.testing.assert_close(layer(x), want, rtol=0.02, atol=0.05 * want.abs().max().item())
    kind, buffers = pack_gguf_tensors(parts, gpu=True)
    assert kind == "int4"
    fused = Int4Linear(512, 128)
    for name, tensor in buffers.items():
        setattr(fused, name, tensor)
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], dim=-1))


def test_gpu_kinds_and_tile_choice():
    """On the GPU path a type without an int4 form is a float weight, never requantized."""
    kind, buffers = pack_gguf_tensor(blocks(Q.Q8_0, 32, 512), Q.Q8_0, (32, 512), gpu=True)
    assert kind == "float" and buffers["weight"].dtype == torch.bfloat16
    assert pack_gguf_tensors([(blocks(Q.Q4_K, 32, 512), Q.Q4_K, (32, 512)),
                              (blocks(Q.Q6_K, 32, 512), Q.Q6_K, (32, 512))], gpu=True) is None
    assert [inner_k_tiles(k) for k in (2048, 576, 1536, 14336, 96)] == [8, 4, 8, 8, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tinygemm)")
def test_cuda_kernel_equals_its_cpu_twin():
    """The same buffers packed on CUDA (tinygemm's layout) give the CPU twin's weights (each the
    bf16 rounding of (q - 8) * scale + zero; the CPU rounds a float32 sum first: 1 ulp at most)
    and its products: both take bf16 activations and the CUDA kernel returns bf16, so they agree
    to a bf16 rounding of the largest output, not to float32's (measured on an H200: 0.094 of 75)."""
    raw = blocks(Q.Q4_K, 64, 512)
    cpu = int4_layer(raw, Q.Q4_K, (64, 512))
    _, buffers = pack_gguf_tensor(raw, Q.Q4_K, (64, 512), gpu=True)
    cuda = Int4Linear(512, 64)
    for name, tensor in buffers.items():
        setattr(cuda, name, tensor.cuda())
    cuda.pack()
    assert cuda.weight.dtype == torch.int32 and cuda.weight.dim() == 4  # tinygemm's layout
    w_cpu, w_cuda = dequantized_weight(cpu), dequantized_weight(cuda).cpu()
    torch.testing.assert_close(w_cuda, w_cpu, rtol=2 ** -8, atol=0)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(2))
    want = cpu(x)
    torch.testing.assert_close(cuda(x.cuda()).float().cpu(), want, rtol=2 ** -7, atol=2 ** -8 * want.abs().max().item())


@pytest.fixture(scope="module")
def tiny_q4_k_m(tmp_path_factory):
    """A tiny Q4_K_M file (Q4_K projections, Q6_K in some, Q6_K tied output/embedding)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("int4") / "tiny-q4_k_m.gguf", 256)


def test_a_q4_k_m_file_on_the_gpu_path(tiny_q4_k_m):
    """What `llamaherd.load(path, device="cuda")` builds, built on the CPU: Q4_K projections in int4
    layers, the Q6_K ones in bf16, run by the torch runner; its logits follow the file's float32
    reference (bf16 activations through 4 random layers: a few % of the range) and pick the same
    tokens."""
    from llamaherd.engine.runner import TorchRunner, make_runner
    from llamaherd.weights import build_model, load_checkpoint

    ckpt = load_checkpoint(tiny_q4_k_m, torch.bfloat16, quantized=True, gpu=True)
    model = build_model(ckpt.args, ckpt.state_dict, "cpu", ckpt.quantized)
    assert set(ckpt.quantized.values()) == {"int4"}
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    floats = [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert int4 and floats and all(m.weight.dtype == torch.int32 or m.weight.dtype == torch.uint8 for m in int4)
    assert all(m.weight.dtype == torch.bfloat16 for m in floats)
    ref_ckpt = load_checkpoint(tiny_q4_k_m)
    ref = build_model(ref_ckpt.args, ref_ckpt.state_dict, "cpu")
    tokens = torch.arange(40, 72)[None]
    with torch.no_grad():
        got, want = model(tokens)[0].float(), ref(tokens)[0]
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    runner = make_runner(model)  # the server's path: prompt, then row-exact decode steps
    assert isinstance(runner, TorchRunner)
    runner.allocate(1, 64)
    steps = [runner.prefill([(tokens[0, :28].tolist(), 0, 0)])[0]]
    steps += [runner.decode([int(tokens[0, i])], [i], [0])[0] for i in range(28, 31)]
    torch.testing.assert_close(torch.stack(steps), got[27:31], rtol=0.02, atol=0.02 * got.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tinygemm)")
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_q4_k_m_file_on_cuda(tiny_q4_k_m, compile, monkeypatch):
    """`llamaherd.load(path, device="cuda")` end to end: the Q4_K projections stay 4-bit on the GPU
    (tinygemm), and the runner the server uses (eager, or the compiled static step with CUDA
    graphs: HERD_COMPILE=1) gives the logits of the same model built on the CPU (the test above),
    within bf16 rounding; a greedy generation through the batch loop runs to its token budget."""
    import llamaherd
    from llamaherd.weights import build_model, load_checkpoint

    monkeypatch.setenv("HERD_COMPILE", "1" if compile else "0")
    llm = llamaherd.load(tiny_q4_k_m, device="cuda")
    int4 = [m for m in llm.model.modules() if isinstance(m, Int4Linear)]
    assert int4 and all(m.weight.is_cuda and m.weight.dim() == 4 for m in int4)
    ckpt = load_checkpoint(tiny_q4_k_m, torch.bfloat16, quantized=True, gpu=True)
    twin = build_model(ckpt.args, ckpt.state_dict, "cpu", ckpt.quantized)
    tokens = torch.arange(40, 72)[None]
    with torch.no_grad():
        want = twin(tokens)[0].float()
    scale = want.abs().max().item()
    runner = llm.runner
    runner.allocate(2, 64)
    try:  # two rows at different positions, as the server batches them
        first = runner.prefill([(tokens[0, :28].tolist(), 0, 0), (tokens[0, :20].tolist(), 0, 1)])
        steps = [first] + [runner.decode([int(tokens[0, i]), int(tokens[0, i - 8])], [i, i - 8], [0, 1])
                           for i in range(28, 31)]
    finally:
        runner.release()
    got = torch.stack([step.float().cpu() for step in steps])  # (4 steps, 2 rows, V); prefill's stay on the device
    torch.testing.assert_close(got[:, 0], want[27:31], rtol=0.03, atol=0.03 * scale)  # row 0: positions 27-30
    torch.testing.assert_close(got[:, 1], want[19:23], rtol=0.03, atol=0.03 * scale)  # row 1: 19-22
    chunks = list(llm.stream(tokens[0, :8].tolist(), llm.options(temperature=0, num_predict=6)))
    assert chunks[-1].done and chunks[-1].eval_count == 6
    llm.close()


def test_qlora_over_int4_layers(tiny_q4_k_m):
    """QLoRA as it runs on CUDA (`load_for_training(..., int4=True)`, the default there): the file's
    4-bit projections stay in int4 layers under the adapters (here through the kernel's CPU twin),
    the other projections in float32. The adapters' gradients follow those over the file's
    dequantized float32 weights (the int4 matmuls take bf16 activations: within a few %)."""
    from llamaherd.train.finetune import CausalLMLoss, load_for_training
    from llamaherd.train.lora import lora_llama3, lora_modules

    grads = []
    for method, int4 in (("qlora", True), ("full", False)):
        model, _ = load_for_training(tiny_q4_k_m, method, "cpu", int4=int4)
        assert any(isinstance(m, Int4Linear) for m in model.modules()) == int4
        lora_llama3(model, "q,k,v,o,gate,up,down", rank=4, alpha=8)
        g = torch.Generator().manual_seed(0)
        for lora in lora_modules(model).values():  # the same nonzero adapters on both (B = 0 gives A no gradient)
            lora.lora_a.weight.data = torch.randn(lora.lora_a.weight.shape, generator=g) * 0.05
            lora.lora_b.weight.data = torch.randn(lora.lora_b.weight.shape, generator=g) * 0.05
        tokens = torch.arange(1, 41)[None]
        CausalLMLoss(model, 8192)(tokens, (tokens + 1) % 256).backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    quantized, reference = grads
    assert quantized.keys() == reference.keys() and len(quantized) == 4 * 7 * 2
    for name, want in reference.items():
        torch.testing.assert_close(quantized[name], want, rtol=0.05, atol=0.05 * want.abs().max().item(), msg=name)
