"""A GGUF block model's weights are the file's own mapped pages, not copies (held once, as llama.cpp
holds them): K-quant projections, fused ones whose parts lie apart in the file included."""

import pytest
import torch

import llamaherd
from llamaherd.quantize import native
from test_kquant import write_tiny_gguf

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the native kernels (a C compiler, AVX2)")


def file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path` (/proc/self/maps)."""
    out = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            out.append((lo, hi))
    return out


@pytest.mark.parametrize("dim", [256, 192], ids=["k-quants", "fallbacks"])
def test_block_weights_are_the_files_pages(tmp_path, dim):
    path = write_tiny_gguf(tmp_path / "q4_k_m.gguf", dim)
    llm = llamaherd.load(path, device="cpu")
    maps = file_mappings(path.resolve())
    assert maps

    def mapped(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() and t.data_ptr() + t.numel() <= hi for lo, hi in maps)

    layer = llm.model.layers[0]
    for module in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2,
                   llm.model.tok_embeddings):
        assert mapped(module.raw), module
    assert llm.model.output.raw.data_ptr() == llm.model.tok_embeddings.raw.data_ptr()  # tied: one set of bytes
    # and they compute what the copied, stacked layout computes (test_kquant checks that against gguf)
    ref = llamaherd.load(path, device="cpu", quantized=False)
    tokens = list(range(20, 40))
    got, want = llm.runner.logits(tokens), ref.runner.logits(tokens)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
