"""K-quants (and Q5_0 / Q5_1) in their own blocks: kernels/kquant.c against gguf's dequantization,
our quantizer against gguf's reader, and a tiny Q4_K_M model through the native runner."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants

from llamaherd.config import ModelArgs
from llamaherd.errors import HerdError
from llamaherd.quantize import native
from llamaherd.quantize.blocks import check_scheme, quantize, scheme_type
from llamaherd.quantize.ggml import dequantize
from llamaherd.quantize.linear import BlockLinear, dequantized_weight, pack_gguf_tensor, pack_gguf_tensors

KQ = [Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Where each type keeps its f16 scales: random bytes everywhere else are valid blocks.
F16_AT = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2],
          Q.Q6_K: [208]}

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the native kernels (a C compiler, AVX2)")


def random_blocks(qtype, n, k, seed=0) -> np.ndarray:
    """n rows of k weights as random blocks of `qtype`: every code and scale bit pattern, f16
    scales of a sane size (some negative, as files have)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for at in F16_AT[qtype]:
        raw[..., at:at + 2] = (rng.standard_normal((n, k // block, 1)) * 0.02).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def reference(raw, qtype, shape) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(raw, qtype)).float().view(shape)


def int16_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T in float64 with x rounded as the kernel rounds it: int16 codes per block of 32, scale
    max|x| / 32767 (a float32), round half to even."""
    M, K = x.shape
    xb = x.view(M, K // 32, 32)
    xd = xb.abs().amax(-1) / 32767
    xq = torch.round(xb * torch.where(xd > 0, 1 / xd, 0.0)[..., None])
    return (xq * xd[..., None]).double().view(M, K) @ w.double().T


@pytest.mark.parametrize("qtype", KQ)
def test_dequantization_is_bit_exact_with_gguf(qtype):
    raw = random_blocks(qtype, 24, 512, seed=int(qtype))
    ids = torch.tensor([5, 0, 23, 5])
    layer = BlockLinear(512, 24, qtype)
    layer.raw = torch.from_numpy(raw)
    ref = reference(raw, qtype, (24, 512))
    assert torch.equal(native.block_dequantize(layer.raw, int(qtype), 512), ref)
    assert torch.equal(layer.rows(ids), ref[ids])  # embedding lookups
    assert torch.equal(dequantize(raw, qtype, (24, 512)), ref)  # and the torch reader agrees


@pytest.mark.parametrize("qtype", KQ)
def test_decode_matmul_is_the_blocks_times_int16_activations(qtype):
    N, K = 40, 512
    raw = random_blocks(qtype, N, K, seed=10 + int(qtype))
    kind, buffers = pack_gguf_tensor(raw, qtype, (N, K))
    assert kind == f"block:{qtype.name}"  # the file's blocks, no requantization
    layer = BlockLinear(K, N, qtype)
    layer.raw = buffers["raw"]
    w = reference(raw, qtype, (N, K))
    x = torch.randn(9, K, generator=torch.Generator().manual_seed(int(qtype)))
    y = layer(x)
    want = int16_product(x, w)
    assert (y.double() - want).abs().max() < 1e-5 * want.abs().max()  # float summation order only
    exact = x.double() @ w.double().T
    assert (y.double() - exact).abs().max() < 2e-4 * exact.abs().max()  # int16 activations
    for i in (0, 4, 8):  # each row the same alone as in a batch (continuous batching)
        assert torch.equal(layer(x[i:i + 1]), y[i:i + 1])
    assert torch.equal(layer(x[1:7]), y[1:7])


@pytest.mark.parametrize("qtype", KQ)
def test_prompt_matmul_is_the_float32_product_and_row_independent(qtype):
    N, K = 40, 256  # N not a multiple of 16: a padded last panel
    raw = random_blocks(qtype, N, K, seed=20 + int(qtype))
    blocks = torch.from_numpy(raw)
    x = torch.randn(13, K)
    y = native.block_mm_dense(x, blocks, int(qtype))
    exact = x.double() @ reference(raw, qtype, (N, K)).double().T
    assert (y.double() - exact).abs().max() < 1e-6 * exact.abs().max()
    for i in range(0, 13, 3):
        assert torch.equal(native.block_mm_dense(x[i:i + 1], blocks, int(qtype)), y[i:i + 1])
    assert torch.equal(native.block_mm_dense(x[2:10], blocks, int(qtype)), y[2:10])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0] + KQ)
def test_rows_repacked_eight_at_a_time_compute_the_same_bits(qtype):
    """kquant.c's 8-row layout (`BlockLinear.repack`, at load): the same bytes reordered in place; its
    decode paths (one row, a few, the panel from 9) give the same bits for every row count (a row's
    numbers never depend on its batch), the plain-C path's too, within float rounding of the file
    layout's (which sums a block in eight lanes apart); the float32 and lookup paths the unrepacked
    ones' bits. Q4_0 / Q4_1 / Q8_0 take this layout as a part of a mixed projection (a plain one
    has blockmm.c's own)."""
    N, K = 24, 512
    raw = torch.from_numpy(random_blocks(qtype, N, K, seed=40 + int(qtype)))
    parts = [(8, qtype, 0), (16, qtype, 8 * raw.shape[1])]  # two parts where a file would hold them
    layers = [BlockLinear(K, N, qtype, parts=parts) for _ in range(2)]
    for layer in layers:
        layer.raw = raw.clone().view(-1)
    plain, packed = layers
    packed.repack()
    assert packed.rows8 and packed.raw.numel() == raw.numel() and not torch.equal(packed.raw, plain.raw)
    x = torch.randn(11, K, generator=torch.Generator().manual_seed(int(qtype)))
    y = packed(x)
    assert (y - plain(x)).abs().max() < 1e-6 * y.abs().max()
    for rows in (slice(0, 1), slice(3, 5), slice(1, 9), slice(2, 11), slice(10, 11)):  # 1, 2, 8 and 9 rows
        assert torch.equal(packed(x[rows]), y[rows])
    assert torch.equal(native.block_mm_dense(x, packed.raw, packed.kernel_type, N),
                       native.block_mm_dense(x, plain.raw, plain.kernel_type, N))
    assert torch.equal(dequantized_weight(packed), reference(raw.numpy(), qtype, (N, K)))
    native.library().kq_force_scalar(1)
    try:
        assert torch.equal(packed(x[:3]), y[:3]) and torch.equal(plain(x[:3]), y[:3])
    finally:
        native.library().kq_force_scalar(0)
    if qtype in KQ:  # a plain projection of the type
        layer = BlockLinear(K, N, qtype)
        layer.raw = raw.clone()
        layer.repack()
        assert layer.kernel_type == native.KQ_R8 + int(qtype) and torch.equal(layer(x), y)


@pytest.mark.parametrize("qtype", KQ)
def test_many_rows_take_the_int16_panel_to_the_bits_of_few(qtype):
    """From 9 rows on (a prompt, a wide decode step) rows repacked eight at a time go through
    kquant.c's int16 panel: each block's exact integer dot product scaled once (Q6_K: once a half),
    as the few-row kernels sum, so a row's numbers are the same alone as among any others."""
    N, K = 40, 512  # five groups of eight rows: a last panel of one group
    raw = random_blocks(qtype, N, K, seed=50 + int(qtype))
    layer = BlockLinear(K, N, qtype)
    layer.raw = torch.from_numpy(raw.copy())  # repacked in place
    layer.repack()
    assert native.kq_has_panel(layer.kernel_type) and not native.kq_has_panel(int(qtype))  # the file's layout: no
    x = torch.randn(23, K, generator=torch.Generator().manual_seed(int(qtype)))  # five passes of four, and 3
    y = layer(x)
    want = int16_product(x, reference(raw, qtype, (N, K)))
    assert (y.double() - want).abs().max() < 1e-6 * want.abs().max()
    for i in range(23):
        assert torch.equal(layer(x[i:i + 1]), y[i:i + 1])
    for rows in (slice(1, 10), slice(2, 14), slice(0, 8)):  # 9 and 12 rows (the panel), 8 (r8_rows)
        assert torch.equal(layer(x[rows]), y[rows])


@pytest.mark.parametrize("parts", [
    [(Q.Q4_K, 24), (Q.Q4_K, 16), (Q.Q6_K, 16)],  # Q4_K_M's wqkv: a panel half Q4_K, half Q6_K; a last Q6_K alone
    [(Q.Q6_K, 8), (Q.Q5_0, 8), (Q.Q8_0, 16)],  # Q6_K beside one scale a block
    [(Q.Q5_1, 8), (Q.Q6_K, 8), (Q.Q4_0, 8)],  # an offset beside Q6_K; a last group alone
], ids=["q4k-q6k", "q6k-q5_0-q8_0", "q5_1-q6k-q4_0"])
def test_a_mixed_projection_takes_one_panel_over_its_parts(parts):
    """A fused projection of mixed types repacked: panels over all the parts' groups, some of them
    across two types, each group scaled as its type is (a Q6_K one by halves) as decoding does."""
    K = 256
    weights = [(random_blocks(t, n, K, seed=60 + s), t, (n, K)) for s, (t, n) in enumerate(parts)]
    kind, buffers = pack_gguf_tensors(weights)
    N = sum(n for _, n in parts)
    fused = BlockLinear(K, N, parts[0][0], parts=[(n, t) for t, n in parts])
    fused.raw = buffers["raw"]
    fused.repack()
    assert fused.rows8 and native.kq_has_panel(fused.kernel_type)
    x = torch.randn(10, K, generator=torch.Generator().manual_seed(1))
    y = fused(x)
    want = int16_product(x, torch.cat([reference(*w) for w in weights]))
    assert (y.double() - want).abs().max() < 1e-6 * want.abs().max()
    for i in range(10):
        assert torch.equal(fused(x[i:i + 1]), y[i:i + 1])


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_0])
def test_the_plain_c_path_computes_the_same(qtype):
    """The scalar loops (used without AVX2) against the same products: the int16 ones to the bits of
    the repacked rows (`row_dot` is the order their kernels sum in), within rounding of the file
    layout's; the float32 ones within rounding."""
    N, K = 16, 256
    raw = torch.from_numpy(random_blocks(qtype, N, K, seed=30))
    x = torch.randn(11, K)
    simd, simd_dense = native.block_mm(x, raw, int(qtype)), native.block_mm_dense(x, raw, int(qtype))
    native.library().kq_force_scalar(1)
    try:
        scalar, scalar_dense = native.block_mm(x, raw, int(qtype)), native.block_mm_dense(x, raw, int(qtype))
    finally:
        native.library().kq_force_scalar(0)
    assert torch.allclose(scalar, simd, rtol=1e-5, atol=1e-5 * simd.abs().max().item())
    assert torch.allclose(scalar_dense, simd_dense, rtol=1e-5, atol=1e-5 * simd.abs().max().item())
    layer = BlockLinear(K, N, qtype)
    layer.raw = raw.clone()
    layer.repack()
    assert torch.equal(layer(x), scalar)


def test_a_fused_projection_of_mixed_types_is_its_parts():
    """Q4_K_M's wqkv: wq, wk in Q4_K and wv in Q6_K, each kept in its own blocks in one layer."""
    K = 256
    weights = [(random_blocks(t, n, K, seed=s), t, (n, K)) for s, (t, n) in enumerate([(Q.Q4_K, 32), (Q.Q4_K, 16),
                                                                                       (Q.Q6_K, 16)])]
    kind, buffers = pack_gguf_tensors(weights)
    assert kind == "block:Q4_K+Q4_K+Q6_K"
    fused = BlockLinear(K, 64, Q.Q4_K, parts=[(32, Q.Q4_K), (16, Q.Q4_K), (16, Q.Q6_K)])
    fused.raw = buffers["raw"]
    assert fused.raw.numel() == sum(w[0].size for w in weights)  # the files' bytes, nothing added
    x = torch.randn(5, K)
    parts = []
    for raw, t, shape in weights:
        layer = BlockLinear(K, shape[0], t)
        layer.raw = torch.from_numpy(raw)
        parts.append(layer)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    dense = native.block_mm_dense(x, fused.raw, fused.kernel_type, 64)
    assert torch.equal(dense, torch.cat([native.block_mm_dense(x, p.raw, p.kernel_type) for p in parts], dim=-1))
    want = torch.cat([reference(*w) for w in weights])
    assert torch.equal(dequantized_weight(fused), want)


# -- the quantizer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype, bound", [(Q.Q8_0, 0.01), (Q.Q4_0, 0.12), (Q.Q5_0, 0.06), (Q.Q4_K, 0.1),
                                          (Q.Q5_K, 0.05), (Q.Q6_K, 0.03)])
def test_quantized_blocks_read_back_through_gguf(qtype, bound):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    w[7] = 0  # an all-zero row: zero scales, no NaN
    w[9, :256] *= 40  # an outlier super-block
    raw = quantize(w, qtype)
    assert raw.shape == (48, 512 // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1])
    back = reference(raw.numpy(), qtype, (48, 512))
    assert torch.equal(back[7], torch.zeros(512))
    rel = ((back - w).norm(dim=1) / w.norm(dim=1).clamp(min=1e-12))
    assert rel.max() < bound, rel.max()


def test_q8_0_and_q4_0_are_ggmls_own_rounding():
    w = torch.randn(8, 64)
    for qtype in (Q.Q8_0, Q.Q4_0):
        assert np.array_equal(quantize(w, qtype).numpy(), quants.quantize(w.numpy(), qtype))


def test_the_q4_k_m_mix_follows_llama_cpp():
    n = 8  # layers 0, 3, 6, 7 get more bits in wv and w2
    assert scheme_type("q4_k", "layers.0.attention.wv", 256, n) == Q.Q6_K
    assert scheme_type("q4_k", "layers.1.attention.wv", 256, n) == Q.Q4_K
    assert [scheme_type("q4_k", f"layers.{i}.feed_forward.w2", 512, n) for i in range(n)].count(Q.Q6_K) == 4
    assert scheme_type("q4_k", "layers.1.attention.wq", 256, n) == Q.Q4_K
    assert scheme_type("q4_k", "output", 256, n) == Q.Q6_K
    assert scheme_type("q4_k", "layers.1.attention.wq", 576, n) == Q.Q5_0  # rows not of 256: llama.cpp's fallbacks
    assert scheme_type("q4_k", "output", 576, n) == Q.Q8_0
    assert scheme_type("q4_0", "layers.1.attention.wq", 576, n) == Q.Q4_0
    assert scheme_type("Q8_0", "output", 576, n) == Q.Q8_0
    assert check_scheme("Q4_K_M") == "q4_k"
    with pytest.raises(HerdError, match="unknown quantization 'q3_k'"):
        check_scheme("q3_k")


# -- a tiny Q4_K_M model through the native runner ------------------------------------------------

def tiny_args(dim: int, tie: bool = True) -> ModelArgs:
    return ModelArgs(dim=dim, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=512, max_seq_len=256,
                     rope_theta=10000.0, tie_embeddings=tie)


def tiny_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float weights in Meta's names, scaled so that activations stay of order one."""
    from llamaherd.weights import expected_shapes

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(args).items():
        sd[name] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return sd


BYTE_TOKENIZER = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
                  "tokenizer.ggml.tokens": [bytes([b]).decode("latin-1") for b in range(255)] + ["ab"],
                  "tokenizer.ggml.token_type": [1] * 256, "tokenizer.ggml.merges": ["a b"]}


def write_tiny_gguf(path, dim: int, quant: str = "q4_k", tie: bool = True):
    from llamaherd.export.gguf import save_gguf

    args = tiny_args(dim, tie)
    return save_gguf(tiny_state_dict(args), args, SimpleNamespace(chat_template=None), path, quant=quant,
                     base_metadata=BYTE_TOKENIZER)


@pytest.fixture(scope="module", params=[256, 192], ids=["k-quants", "fallbacks"])
def tiny_q4_k_m(request, tmp_path_factory):
    """(quantized model, its file's dequantized float32 model, the file's tensor types). dim 256:
    real K-quants (wqkv of Q4_K and Q6_K in layers 2, 3); dim 192: llama.cpp's fallbacks for rows
    not of 256 (Q5_0, Q8_0), as in SmolLM2's Q4_K_M."""
    import gguf

    from llamaherd.weights import build_model, load_checkpoint

    path = write_tiny_gguf(tmp_path_factory.mktemp("kq") / "tiny-q4_k_m.gguf", request.param)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    models = []
    for quantized in (True, False):
        ckpt = load_checkpoint(path, quantized=quantized)
        models.append(build_model(ckpt.args, ckpt.state_dict, "cpu", ckpt.quantized))
    return *models, types


def test_the_tiny_file_is_a_q4_k_m_mix(tiny_q4_k_m):
    _, _, types = tiny_q4_k_m
    if types["blk.0.attn_q.weight"] == Q.Q4_K:
        assert types["blk.2.attn_v.weight"] == types["blk.3.ffn_down.weight"] == Q.Q6_K
        assert types["blk.1.attn_v.weight"] == Q.Q4_K and types["token_embd.weight"] == Q.Q6_K
    else:
        assert types["blk.0.attn_q.weight"] == Q.Q5_0 and types["blk.2.attn_v.weight"] == Q.Q8_0
        assert types["blk.0.ffn_down.weight"] == Q.Q4_K  # its rows (hidden 512) are whole super-blocks


def test_the_tiny_q4_k_m_runs_natively_and_matches_its_reference(tiny_q4_k_m):
    from llamaherd.engine.runner import NativeRunner, make_runner

    fast, ref, types = tiny_q4_k_m
    assert isinstance(make_runner(fast), NativeRunner)  # every block of the file in its own blocks
    out, emb = fast.output, fast.tok_embeddings
    if types["token_embd.weight"] == Q.Q6_K:  # a K-quant output is repacked too; the tied embedding reads it so
        assert "output.weight" not in types and out.raw.data_ptr() == emb.raw.data_ptr()
        assert out.rows8 and emb.rows8 and emb.kernel_type == out.kernel_type == native.KQ_R8 + int(Q.Q6_K)
    else:  # a Q8_0 one stays in the file's layout
        assert not out.rows8 and not emb.rows8
    assert all(type(layer.attention.wqkv).__name__ == "BlockLinear" for layer in fast.layers)
    assert all(m.rows8 for layer in fast.layers for m in (layer.attention.wqkv, layer.attention.wo,
                                                          layer.feed_forward.w13, layer.feed_forward.w2))
    tokens = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens, torch.arange(80)[None])[0]  # (80, V) teacher-forced, float32 reference
    fast.setup_cache(2, 128)
    prompt = tokens[0, :70].tolist()  # one block of 64 positions through the int16 panel, the rest as decoding
    logits = native.prefill(fast, prompt[:64], 0, row=1)
    assert (logits - want[63]).abs().max() < 1e-3 * want[63].abs().max()  # int16 activations
    keys = fast.layers[-1].attention.cache.k[1, :, :64].clone()
    for p, t in enumerate(prompt[:64]):  # the same tokens decoded one at a time (cache row 0)
        step = native.decode(fast, [t], [p], [0])[0]
    assert torch.equal(step, logits)  # the panel sums a row as decoding does, every type of the mix
    assert torch.equal(fast.layers[-1].attention.cache.k[0, :, :64], keys)
    logits = native.prefill(fast, prompt[64:], 64, row=1)
    assert (logits - want[69]).abs().max() < 3e-3 * want[69].abs().max()  # int16 activations
    got = [native.decode(fast, [t], [p], [1])[0] for p, t in enumerate(tokens[0, 70:].tolist(), 70)]
    for p, logits in enumerate(got, 70):  # int16 activations on the decode path
        assert (logits - want[p]).abs().max() < 3e-3 * want[p].abs().max()
        assert logits.argmax() == want[p].argmax()


def test_an_untied_k_quant_output_is_repacked_and_its_embedding_left(tmp_path):
    """Llama 3.1 8B's Q4_K_M layout: an embedding of its own (Q4_K) and a Q6_K output projection. The
    output is repacked for the kernels; the embedding keeps the file's layout and reads it exactly."""
    import gguf

    from llamaherd.weights import build_model, load_checkpoint

    path = write_tiny_gguf(tmp_path / "untied-q4_k_m.gguf", 256, tie=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    fast, ref = (build_model(c.args, c.state_dict, "cpu", c.quantized)
                 for c in (load_checkpoint(path, quantized=q) for q in (True, False)))
    assert fast.output.rows8 and fast.output.kernel_type == native.KQ_R8 + int(Q.Q6_K)
    assert not fast.tok_embeddings.rows8 and fast.tok_embeddings.kernel_type == int(Q.Q4_K)
    ids = torch.arange(0, 256, 5)
    assert torch.equal(fast.tok_embeddings(ids), ref.tok_embeddings(ids))
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(tokens, torch.arange(40)[None])[0, -1]
    fast.setup_cache(1, 64)
    got = native.prefill(fast, tokens[0].tolist(), 0)
    assert (got - want).abs().max() < 3e-3 * want.abs().max() and got.argmax() == want.argmax()
