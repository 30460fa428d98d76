"""kernels/decode.c shares each op of a step among the threads of one OpenMP region, met at its own
barrier: whatever the thread count, every row must get the same numbers, to the bit (a missed
barrier or an op split along a sum would show here), also past one span of keys (KV_SPAN = 512:
the spans' results merged in a pass of their own) and on a prompt's float32 path."""

import re
from pathlib import Path

import pytest
import torch

import llamaherd
from llamaherd.quantize import native

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not native.available(), reason="needs the native kernels (a C compiler, AVX2)")]


@pytest.fixture(scope="module")
def model(smollm2_path):
    """A model of its own: these tests write its KV cache directly."""
    return llamaherd.load(smollm2_path, device="cpu", quantized=True).model


def run_with(threads: int, model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `ids` into cache row 1 (float32 blocks, then an int16 tail), then one decode step of
    three rows (row 1 past position 512, rows 0 and 2 short): (the prompt's logits, the step's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.setup_cache(3, 1024)
        prompt = native.prefill(model, ids, 0, row=1)
        native.prefill_many(model, [(ids[:5], 0, 0), (ids[:9], 0, 2)])
        step = native.decode(model, [ids[5], ids[9], ids[-1]], [5, 9, len(ids)], [0, 2, 1])
    finally:
        torch.set_num_threads(before)
    return prompt, step


@pytest.mark.slow
def test_rows_do_not_depend_on_the_thread_count(model, smollm2):
    ids = smollm2.encode("The quick brown fox jumps over the lazy dog. " * 60)[:600]
    one = run_with(1, model, ids)
    for threads in (2, 3):
        got = run_with(threads, model, ids)
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1]), f"{threads} threads"


def test_the_folded_output_gives_torchs_logits(model, smollm2):
    """A decode step's final norm and output projection run inside the native call (one region a
    token); its logits must be those of torch's norm and the output module after the blocks, to the bit."""
    ids = smollm2.encode("The quick brown fox jumps over the lazy dog. " * 8)
    model.setup_cache(3, 128)
    native.prefill_many(model, [(ids[:40], 0, 1), (ids[:5], 0, 0), (ids[:9], 0, 2)])
    if torch.backends.cpu.get_cpu_capability() == "AVX2":  # the order decode.c's norm replays
        assert native.decoder(model).output, "the output projection is not folded into the step"
    tokens, positions, rows = [ids[5], ids[9], ids[40]], [5, 9, 40], [0, 2, 1]
    folded = native.decode(model, tokens, positions, rows)
    by_torch = model.output(model.norm(native._run(model, tokens, positions, rows, dense=False)))
    assert torch.equal(folded, by_torch)


# The kernels that open an OpenMP region of their own: those Python calls (and the load-time
# repacks). Every other loop is an orphaned `omp for`, shared among the threads of the caller's
# region; a `parallel` among them would run on ONE thread inside herd_decode's region (a nested
# region is serialized): the same numbers, silently half as fast, so no other test would notice.
ENTRY_POINTS = {"herd_decode", "block_mm", "block_mm_dense", "block_dequantize", "rows8_repack", "repack_part",
                "kq_rows_dequantize"}


def test_only_the_entry_points_open_a_parallel_region():
    kernels = Path(native.__file__).parent / "kernels"
    opened = set()
    for source in kernels.glob("*.c"):
        function = None
        for line in source.read_text().splitlines():
            definition = re.match(r"[A-Za-z_][\w \*]*?\b(\w+)\(", line)  # at column 0, not a declaration
            if definition and not line.rstrip().endswith(";"):
                function = definition[1]
            if re.match(r"\s*#pragma omp parallel", line):
                opened.add(function)
    assert opened == ENTRY_POINTS
