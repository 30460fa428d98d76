"""The fast CPU layers against the reference dequantization of the same GGUF blocks."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from llamaherd import settings
from llamaherd.quantize.ggml import dequantize
from llamaherd.quantize import native
from llamaherd.quantize.linear import (BlockLinear, GGMLEmbedding, Int4Linear, Int8Linear, RefinedBlockLinear,
                                       RefinedInt8Linear, dequantized_weight, pack_gguf_tensor, pack_gguf_tensors,
                                       quantize_int8_rows, repack_rows8)


def gguf_blocks(qtype, out_features=96, in_features=128, seed=0):
    w = np.random.default_rng(seed).standard_normal((out_features, in_features), dtype=np.float32)
    return quants.quantize(w, qtype)


def load_module(module, buffers):
    for name, tensor in buffers.items():
        setattr(module, name, tensor)
    return module


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_int4_codes_are_the_files_own(qtype):
    """Q4_0/Q4_1 map onto the int4 kernel without requantizing: only scales round to bf16."""
    raw = gguf_blocks(qtype)
    kind, buffers = pack_gguf_tensor(raw, qtype, (96, 128), native_ok=False)
    assert kind == "int4"
    layer = load_module(Int4Linear(128, 96), buffers)
    ref = dequantize(raw, qtype, (96, 128))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    # bf16 scales (8 significant bits) and bf16 output: relative error ~1e-2 at most
    assert torch.allclose(layer(x), x @ ref.T, rtol=0.02, atol=0.05)
    assert torch.allclose(dequantized_weight(layer), ref, rtol=0.02, atol=0.02)


def test_int8_rows_for_other_types():
    raw = gguf_blocks(Q.Q8_0)
    kind, buffers = pack_gguf_tensor(raw, Q.Q8_0, (96, 128), native_ok=False)
    assert kind == "int8"
    ref = dequantize(raw, Q.Q8_0, (96, 128))
    w = buffers["weight"].float() * buffers["scales"].float()[:, None]
    assert (w - ref).abs().max() <= ref.abs().max() / 127


def test_fused_projection_equals_its_parts():
    """wq, wk, wv stacked before packing (torch's int4 layout is the CPU's own: AVX2 and AVX-512
    interleave rows differently) compute what the three compute apart, to the bit."""
    weights = [(gguf_blocks(Q.Q4_1, n, 128, seed), Q.Q4_1, (n, 128)) for seed, n in ((1, 64), (2, 32), (3, 32))]
    parts = [load_module(Int4Linear(128, n), pack_gguf_tensor(*w, native_ok=False)[1]) for w, n in zip(weights, (64, 32, 32))]
    kind, buffers = pack_gguf_tensors(weights, native_ok=False)
    assert kind == "int4"
    fused = load_module(Int4Linear(128, 128), buffers)
    x = torch.randn(3, 128)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_fused_int8_projection_equals_its_parts_and_mixed_kinds_are_not_fused():
    weights = [(gguf_blocks(qtype, 32, 128, seed), qtype, (32, 128)) for seed, qtype in ((1, Q.Q8_0), (2, Q.Q5_0))]
    parts = [load_module(Int8Linear(128, 32), pack_gguf_tensor(*w, native_ok=False)[1]) for w in weights]
    kind, buffers = pack_gguf_tensors(weights, native_ok=False)
    assert kind == "int8"  # two types, one kind of layer: requantized per row either way
    x = torch.randn(3, 128)
    assert torch.equal(load_module(Int8Linear(128, 64), buffers)(x), torch.cat([p(x) for p in parts], dim=-1))
    q4 = (gguf_blocks(Q.Q4_0, 32, 128, 3), Q.Q4_0, (32, 128))
    assert pack_gguf_tensors([weights[0], q4], native_ok=False) is None  # int8 beside int4: packed apart


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0])
def test_embedding_rows_are_exact(qtype):
    """Lookups read the blocks in place (the native kernel where it runs): a few rows, and more than
    are dequantized on one thread."""
    raw = gguf_blocks(qtype, 50, 64)
    emb = GGMLEmbedding(50, 64, qtype)
    emb.raw = torch.from_numpy(raw)
    ref = dequantize(raw, qtype, (50, 64))
    ids = torch.tensor([[3, 49, 0], [7, 7, 1]])
    assert torch.equal(emb(ids), ref[ids])
    many = torch.randint(0, 50, (600,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(emb(many), ref[many])


def test_refined_output_is_exact_where_it_matters():
    vocab, dim = 500, 64
    raw = gguf_blocks(Q.Q8_0, vocab, dim)
    ref = dequantize(raw, Q.Q8_0, (vocab, dim))
    out = load_module(RefinedInt8Linear(dim, vocab, Q.Q8_0, refine=16), quantize_int8_rows(ref))
    out.exact.raw = torch.from_numpy(raw)
    h = torch.randn(2, 3, dim, generator=torch.Generator().manual_seed(0))  # seeded: the bounds below are for typical inputs
    exact = h @ ref.T
    got = out(h)
    top = exact.topk(8, dim=-1).indices  # well inside the 16 the int8 logits nominate
    assert torch.allclose(got.gather(-1, top), exact.gather(-1, top), atol=1e-5)  # exact best ones
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert (got - exact).abs().max() < 0.2  # the tail is int8-accurate


# -- the native kernel (kernels/blockmm.c) ---------------------------------------------------------

# the tests below run the kernel: not where it is turned off (HERD_NATIVE=0) or cannot build
needs_native = pytest.mark.skipif(not native.available(), reason="needs the native kernels (a C compiler, AVX2)")


@pytest.mark.skipif(not settings.native(), reason="HERD_NATIVE=0 turns the native kernels off")
def test_the_native_kernel_builds_here():
    """This machine has a C compiler and AVX2: the fast path must not silently fall back."""
    assert native.available()


def int16_reference(x: torch.Tensor, raw: np.ndarray, qtype, shape) -> torch.Tensor:
    """What the kernel computes, in float64: activations rounded to int16 blocks (scale
    max|x|/32767, round half to even), times the file's weights. w = d * q + m, so x . w = d * xd * (q . xq) +
    m * xd * sum(xq) per block."""
    M, K = x.shape
    xb = x.double().view(M, K // 32, 32)
    xd = (xb.abs().amax(-1).float() / 32767).double()  # the kernel's scale is a float32
    xq = torch.round((xb.float() * torch.where(xd > 0, 1 / xd.float(), 0.0)[..., None]).double())
    w = dequantize(raw, qtype, shape).double().view(shape[0], K // 32, 32)  # (N, nb, 32)
    return torch.einsum("mb,mbj,nbj->mn", xd, xq, w)


@needs_native
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_block_linear_is_the_files_blocks_times_int16_activations(qtype):
    N, K = 80, 256
    raw = gguf_blocks(qtype, N, K)
    kind, buffers = pack_gguf_tensor(raw, qtype, (N, K))
    assert kind == f"block:{qtype.name}"
    layer = load_module(BlockLinear(K, N, qtype), buffers)
    x = torch.randn(9, K)
    y = layer(x)
    assert torch.allclose(y.double(), int16_reference(x, raw, qtype, (N, K)), rtol=1e-5, atol=1e-4)
    exact = x @ dequantize(raw, qtype, (N, K)).T
    assert (y - exact).abs().max() < 1e-4 * exact.abs().max()  # int16 activations: within ~1e-4
    assert torch.equal(dequantized_weight(layer), dequantize(raw, qtype, (N, K)))


@needs_native
def test_block_linear_rows_do_not_depend_on_the_batch():
    """Continuous batching needs each row computed the same alone or beside others."""
    raw = gguf_blocks(Q.Q4_1, 64, 192)
    layer = load_module(BlockLinear(192, 64, Q.Q4_1), pack_gguf_tensor(raw, Q.Q4_1, (64, 192))[1])
    x = torch.randn(11, 192)
    together = layer(x)
    for i in range(11):
        assert torch.equal(layer(x[i:i + 1]), together[i:i + 1])
    assert torch.equal(layer(x[3:9]), together[3:9])


@needs_native
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_native_dequantization_is_bit_exact(qtype):
    N, K = 48, 256
    raw = gguf_blocks(qtype, N, K, seed=3)
    got = native.block_dequantize(torch.from_numpy(raw).view(N, -1), int(qtype), K)
    assert torch.equal(got, torch.from_numpy(quants.dequantize(raw, qtype)).float())


@needs_native
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_dense_kernel_is_the_float32_product_and_row_independent(qtype):
    """The prompt path: weights expanded exactly, activations not rounded; each row the same in
    any batch (rows 0-5 fill a 6-row tile, 6-12 a tile and a remainder)."""
    N, K = 64, 192
    raw = gguf_blocks(qtype, N, K, seed=4)
    blocks = torch.from_numpy(raw).view(N, -1)
    x = torch.randn(13, K)
    y = native.block_mm_dense(x, blocks, int(qtype))
    exact = x.double() @ dequantize(raw, qtype, (N, K)).double().T
    assert (y.double() - exact).abs().max() < 1e-6 * exact.abs().max()
    for i in range(13):
        assert torch.equal(native.block_mm_dense(x[i:i + 1], blocks, int(qtype)), y[i:i + 1])
    assert torch.equal(native.block_mm_dense(x[4:11], blocks, int(qtype)), y[4:11])


@needs_native
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_rows8_layout_is_the_same_bytes_and_the_same_product(qtype):
    """Layers repacked 8 rows at a time for the kernel: a lossless reordering, the int16 product
    of the same blocks (now summed exactly per block in integers), rows independent of the batch."""
    N, K = 48, 192
    raw = gguf_blocks(qtype, N, K, seed=5)
    blocks = torch.from_numpy(raw).view(N, -1)
    layer = load_module(BlockLinear(K, N, qtype), {"raw": blocks.clone()})
    layer.repack()
    assert layer.rows8 and not torch.equal(layer.raw, blocks)
    assert torch.equal(layer.raw, repack_rows8(blocks, qtype))  # the C repack is the torch reference's
    ids = torch.tensor([0, 47, 8, 8, 13])
    assert torch.equal(layer.rows(ids), dequantize(raw, qtype, (N, K))[ids])  # lookups from the new layout
    x = torch.randn(11, K, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert torch.allclose(y.double(), int16_reference(x, raw, qtype, (N, K)), rtol=1e-5, atol=1e-4)
    for i in range(11):
        assert torch.equal(layer(x[i:i + 1]), y[i:i + 1])
    assert torch.equal(layer(x[2:10]), y[2:10])  # a full 8-row pass
    assert torch.equal(dequantized_weight(layer), dequantize(raw, qtype, (N, K)))
    with pytest.raises(ValueError, match="no float32 path"):
        native.block_mm_dense(x, layer.raw, layer.kernel_type)


@needs_native
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_many_rows_take_the_int16_panel_to_the_bits_of_few(qtype):
    """From 9 rows on (kernels/blockmm.c's PANEL_ROWS: a prompt, a wide batch) the repacked blocks
    go through the int16 panel: other instructions, the numbers of the few-row tiles (decoding's)
    to the bit, for every row of 4-row passes and of the 1-3 rows left over, and a last panel of 8
    features (N = 8 mod 16)."""
    N, K = 56, 192
    raw = gguf_blocks(qtype, N, K, seed=6)
    layer = load_module(BlockLinear(K, N, qtype), {"raw": torch.from_numpy(raw).view(N, -1).clone()})
    layer.repack()
    x = torch.randn(23, K, generator=torch.Generator().manual_seed(2))
    y = layer(x)  # 5 passes of 4 rows and 3 left
    assert torch.allclose(y.double(), int16_reference(x, raw, qtype, (N, K)), rtol=1e-5, atol=1e-4)
    few = torch.cat([layer(x[i:i + 8]) for i in range(0, 23, 8)])  # 8 rows a call: the tiles
    assert torch.equal(y, few)
    for rows in (slice(0, 9), slice(3, 13), slice(1, 17)):  # 1, 2 rows left over; 4-row passes only
        assert torch.equal(layer(x[rows]), y[rows])


@needs_native
def test_qlora_over_repacked_blocks_runs_through_the_panel():
    """QLoRA's frozen base over blocks repacked for inference (as `llamaherd.load` leaves them): no
    float32 path for them, so the forward is the layer's own (the int16 panel), the backward the
    gradient times the exactly dequantized weight."""
    from llamaherd.train.qlora import frozen_quantized_linear
    raw = gguf_blocks(Q.Q4_1, 64, 192, seed=7)
    layer = load_module(BlockLinear(192, 64, Q.Q4_1), {"raw": torch.from_numpy(raw).view(64, -1).clone()})
    layer.repack()
    x = torch.randn(12, 192, requires_grad=True)
    y = frozen_quantized_linear(layer, x)
    assert torch.equal(y, layer(x.detach()))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(12, 64) @ dequantize(raw, Q.Q4_1, (64, 192)), rtol=1e-5, atol=1e-5)


@needs_native
def test_fused_block_projection_equals_its_parts():
    weights = [(gguf_blocks(Q.Q4_0, n, 128, seed), Q.Q4_0, (n, 128)) for seed, n in ((1, 64), (2, 32), (3, 32))]
    parts = [load_module(BlockLinear(128, w[2][0], Q.Q4_0), pack_gguf_tensor(*w)[1]) for w in weights]
    fused = load_module(BlockLinear(128, 128, Q.Q4_0), pack_gguf_tensors(weights)[1])
    x = torch.randn(3, 128)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


@needs_native
def test_refined_block_output_is_exact_where_it_matters():
    vocab, dim = 500, 64
    raw = gguf_blocks(Q.Q8_0, vocab, dim)
    ref = dequantize(raw, Q.Q8_0, (vocab, dim))
    out = RefinedBlockLinear(dim, vocab, Q.Q8_0, refine=16)
    out.raw = torch.from_numpy(raw)
    h = torch.randn(2, 3, dim)
    exact = h @ ref.T
    got = out(h)
    top = exact.topk(8, dim=-1).indices
    assert torch.allclose(got.gather(-1, top), exact.gather(-1, top), atol=1e-5)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert (got - exact).abs().max() < 0.2


@needs_native
def test_the_kernels_follow_torchs_thread_count_on_every_thread():
    """OpenMP's count is per thread: a Python thread (the server's scheduler) would otherwise use
    every core whatever torch.set_num_threads said."""
    import ctypes
    import threading
    from pathlib import Path

    omp = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libgomp.so.1"))
    layer = load_module(BlockLinear(64, 32, Q.Q8_0), pack_gguf_tensor(gguf_blocks(Q.Q8_0, 32, 64), Q.Q8_0, (32, 64))[1])
    seen = []

    def work():
        layer(torch.randn(2, 64))
        seen.append(omp.omp_get_max_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
