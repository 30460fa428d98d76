"""The fast CPU layers against the reference dequantization of the same GGUF blocks."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from llamaherd.quantize.ggml import dequantize
from llamaherd.quantize.linear import (GGMLEmbedding, Int4Linear, RefinedInt8Linear, _concat,
                                       dequantized_weight, pack_gguf_tensor, quantize_int8_rows)


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
    kind, buffers = pack_gguf_tensor(raw, qtype, (96, 128))
    assert kind == "int4"
    layer = load_module(Int4Linear(128, 96), buffers)
    ref = dequantize(raw, qtype, (96, 128))
    x = torch.randn(5, 128).bfloat16().float()
    # bf16 scales (8 significant bits) and bf16 output: relative error ~1e-2 at most
    assert torch.allclose(layer(x), x @ ref.T, rtol=0.02, atol=0.05)
    assert torch.allclose(dequantized_weight(layer), ref, rtol=0.02, atol=0.02)


def test_int8_rows_for_other_types():
    raw = gguf_blocks(Q.Q8_0)
    kind, buffers = pack_gguf_tensor(raw, Q.Q8_0, (96, 128))
    assert kind == "int8"
    ref = dequantize(raw, Q.Q8_0, (96, 128))
    w = buffers["weight"].float() * buffers["scales"].float()[:, None]
    assert (w - ref).abs().max() <= ref.abs().max() / 127


def test_fused_projection_equals_its_parts():
    parts = []
    for seed, n in ((1, 64), (2, 32), (3, 32)):
        _, buffers = pack_gguf_tensor(gguf_blocks(Q.Q4_1, n, 128, seed), Q.Q4_1, (n, 128))
        parts.append(load_module(Int4Linear(128, n), buffers))
    fused = _concat(parts)
    x = torch.randn(3, 128)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_embedding_rows_are_exact():
    raw = gguf_blocks(Q.Q8_0, 50, 64)
    emb = GGMLEmbedding(50, 64, Q.Q8_0)
    emb.raw = torch.from_numpy(raw)
    ids = torch.tensor([[3, 49, 0], [7, 7, 1]])
    assert torch.equal(emb(ids), dequantize(raw, Q.Q8_0, (50, 64))[ids])


def test_refined_output_is_exact_where_it_matters():
    vocab, dim = 500, 64
    raw = gguf_blocks(Q.Q8_0, vocab, dim)
    ref = dequantize(raw, Q.Q8_0, (vocab, dim))
    out = load_module(RefinedInt8Linear(dim, vocab, Q.Q8_0, refine=16), quantize_int8_rows(ref))
    out.exact.raw = torch.from_numpy(raw)
    h = torch.randn(2, 3, dim)
    exact = h @ ref.T
    got = out(h)
    top = exact.topk(8, dim=-1).indices  # well inside the 16 the int8 logits nominate
    assert torch.allclose(got.gather(-1, top), exact.gather(-1, top), atol=1e-5)  # exact best ones
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert (got - exact).abs().max() < 0.2  # the tail is int8-accurate
