"""GGUF dequantization: every ggml type bit-exact against the reference `gguf.quants.dequantize`."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as ref

from llamaherd.errors import FormatError
from llamaherd.quantize import ggml
from llamaherd.quantize.ggml import SUPPORTED_TYPES, block_info, dequantize

# Byte offsets of the fp16 scale/min fields in one block of each type (ggml-common.h). Random
# bytes there are often inf/NaN, which would hide every other bit, so tests put finite values in.
FP16_FIELDS = {
    Q.F32: [], Q.F16: [], Q.BF16: [],
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
# The types gguf can quantize itself, so their blocks can come from real float data.
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
SHAPES = [(4, 256), (3, 512), (2, 3, 256), (256,)]


def assert_bit_equal(ours: torch.Tensor, expected: np.ndarray) -> None:
    """Same float32 bits everywhere, except that any NaN matches any NaN.

    NaN payloads legitimately differ: numpy converts a signalling fp16 NaN to a signalling fp32 one,
    torch quiets it (or, on its scalar path, returns the canonical 0x7fffffff), and when both
    `d * q` and `m` are NaN the two libraries propagate different operands.
    """
    assert ours.dtype == torch.float32
    expected = torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float32))
    assert ours.shape == expected.shape
    same = ours.view(torch.int32) == expected.view(torch.int32)
    same |= ours.isnan() & expected.isnan()
    if not same.all():
        i = int((~same).reshape(-1).nonzero()[0])
        got, want = ours.reshape(-1)[i].item(), expected.reshape(-1)[i].item()
        raise AssertionError(f"{int((~same).sum())} of {same.numel()} values differ; "
                             f"first at flat index {i}: {got!r} != {want!r}")


def random_blocks(qtype: Q, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random raw bytes for a tensor of `shape`, (rows, bytes_per_row), with finite fp16 scales."""
    rng = np.random.default_rng(seed)
    block_size, type_size = block_info(qtype)
    rows, row_len = int(np.prod(shape[:-1])), shape[-1]
    raw = rng.integers(0, 256, size=(rows, row_len // block_size, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        # Small positive scales, like a real model's (1e-4 .. 1e-1, normal fp16).
        log_scale = rng.uniform(np.log(1e-4), np.log(1e-1), size=raw.shape[:2])
        scale = np.exp(log_scale).astype(np.float16)
        raw[..., off:off + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def test_supported_types_and_block_info():
    assert SUPPORTED_TYPES == frozenset(FP16_FIELDS)
    assert block_info(Q.Q4_K) == (256, 144)
    assert block_info(Q.Q8_0) == (32, 34)
    assert block_info(int(Q.F32)) == (1, 4)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=lambda t: t.name)
def test_random_blocks_match_gguf(qtype, shape):
    """Every bit pattern of the values (and of F16/BF16/F32: inf, NaN, subnormals)."""
    raw = random_blocks(qtype, shape, seed=hash((qtype.value, shape)) % 2**32)
    expected = ref.dequantize(raw, qtype).reshape(shape)
    assert_bit_equal(dequantize(raw, qtype, shape), expected)
    assert_bit_equal(dequantize(torch.from_numpy(raw), int(qtype), shape), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_floats_match_gguf(qtype, shape):
    """Blocks as gguf's own quantizer writes them, from normal data with a few outliers."""
    rng = np.random.default_rng(int(qtype) * 1000 + len(shape))
    x = rng.standard_normal(shape).astype(np.float32) * 0.02
    x.reshape(-1)[rng.integers(0, x.size, size=4)] *= 50
    raw = ref.quantize(x, qtype)
    expected = ref.dequantize(raw.view(np.uint8), qtype).reshape(shape)
    assert_bit_equal(dequantize(raw.view(np.uint8), qtype, shape), expected)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        # GGUFReader hands out float types already typed (bf16 as uint16); quantize() does too.
        assert_bit_equal(dequantize(raw, qtype, shape), expected)


def test_bf16_typed_input():
    x = torch.randn(4, 8)
    bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert torch.equal(dequantize(bits, Q.BF16, (4, 8)), x.to(torch.bfloat16).float())
    assert torch.equal(dequantize(x.to(torch.bfloat16), Q.BF16, (4, 8)),
                       x.to(torch.bfloat16).float())


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K, Q.F16], ids=lambda t: t.name)
def test_chunk_boundaries(qtype, monkeypatch):
    """Chunks of a few blocks (and of one block) give the same bits as one pass."""
    shape = (5, 512)
    raw = random_blocks(qtype, shape, seed=7)
    expected = ref.dequantize(raw, qtype).reshape(shape)
    for values in (1, 3 * block_info(qtype)[0]):
        monkeypatch.setattr(ggml, "_CHUNK_VALUES", values)
        assert_bit_equal(dequantize(raw, qtype, shape), expected)


def test_output_dtype_and_ownership():
    raw = random_blocks(Q.Q8_0, (2, 64), seed=1)
    f32 = dequantize(raw, Q.Q8_0, (2, 64))
    bf16 = dequantize(raw, Q.Q8_0, (2, 64), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, f32.to(torch.bfloat16))
    assert dequantize(raw.tobytes(), Q.Q8_0, (2, 64)).equal(f32)
    # F32 data comes back as a copy: writing to it must not touch the (possibly mapped) input.
    x = torch.randn(3, 5)
    before = x.clone()
    y = dequantize(x, Q.F32, (3, 5))
    assert torch.equal(y, x)
    y += 1
    assert torch.equal(x, before)


def test_unsupported_type():
    with pytest.raises(FormatError, match="unsupported GGUF tensor type IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), Q.IQ2_XXS, (256,))
    with pytest.raises(FormatError, match="unknown GGUF tensor type 999"):
        dequantize(np.zeros(8, np.uint8), 999, (8,))


def test_wrong_sizes():
    with pytest.raises(FormatError, match=r"Q4_0 tensor of shape \(2, 64\) needs 72 bytes, got 71"):
        dequantize(np.zeros(71, np.uint8), Q.Q4_0, (2, 64))
    with pytest.raises(FormatError, match="F32 tensor of shape .* needs 24 bytes, got 28"):
        dequantize(np.zeros(7, np.float32), Q.F32, (2, 3))
    with pytest.raises(FormatError, match="not a multiple of the block size 32"):
        dequantize(np.zeros(36, np.uint8), Q.Q4_0, (2, 48))


def test_smollm2_tensors_match_gguf(smollm2_reader):
    """The real Q4_1 file: a few tensors of each type in it (Q8_0: the 49152x576 embedding)."""
    reader = smollm2_reader
    by_type: dict[Q, list] = {}
    for t in reader.tensors:
        by_type.setdefault(Q(t.tensor_type), []).append(t)
    assert {Q.Q4_1, Q.Q8_0, Q.F32} <= set(by_type)
    for qtype, tensors in by_type.items():
        for t in tensors[:3]:
            shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 (the row) first
            ours = dequantize(t.data, qtype, shape)
            assert_bit_equal(ours, ref.dequantize(t.data, qtype).reshape(shape))
