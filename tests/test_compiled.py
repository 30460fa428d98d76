"""The static-shape decode step over every row of the KV cache (`static.StaticStep`), which the
torch runner compiles (`TorchRunner(compile=True)`, HERD_COMPILE; a CUDA graph on CUDA), equals
the eager row-exact step on a tiny random model: rows at different positions, an idle row left as
it was, rows in any order."""

import copy

import pytest
import llamaherd  # noqa: F401 — before torch: the OpenMP wait policy (settings.py)
import torch

from llamaherd.config import ModelArgs
from llamaherd.engine.runner import TorchRunner
from llamaherd.engine.static import StaticStep, step_inputs
from llamaherd.model import Transformer

PROMPTS = [[3, 14, 15, 92, 65, 35], [2, 71, 82], [8, 1, 8, 2, 8, 4, 5, 9, 0]]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=128, max_seq_len=128)
    m = Transformer(args)
    m.init_weights(std=0.1)
    return m.eval()


def serve(runner, decode) -> tuple[list[list[int]], torch.Tensor]:
    """Three rows prefilled; rows 0 and 2 decode 4 greedy steps while row 1 waits, then rows 1
    and 0 (in that order) decode 2 more. Returns each row's tokens and every step's logits."""
    runner.release()
    runner.allocate(3, 64)
    logits = runner.prefill([(p, 0, row) for row, p in enumerate(PROMPTS)])
    history = [list(p) + [int(logits[row].argmax())] for row, p in enumerate(PROMPTS)]
    seen = []
    for rows in [[0, 2]] * 4 + [[1, 0]] * 2:
        out = decode([history[r][-1] for r in rows], [len(history[r]) - 1 for r in rows], rows)
        seen.append(out)
        for r, row_logits in zip(rows, out):
            history[r].append(int(row_logits.argmax()))
    return history, torch.cat(seen)


def test_static_step_equals_the_row_exact_step(tiny):
    runner = TorchRunner(tiny, "f32", compile=False)
    want_tokens, want = serve(runner, runner.decode)
    step = StaticStep(tiny)

    @torch.inference_mode()
    def static(tokens, positions, rows):
        return step(step_inputs(3, tokens, positions, rows, "cpu"))[torch.tensor(rows)].float()

    got_tokens, got = serve(runner, static)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fused_projections_compute_the_same(tiny):
    """`Transformer.fuse_projections` (what the torch runner does on CUDA): wq/wk/wv and w1/w3 as
    one matmul each, every weight held once, the slices still callable; the same logits."""
    from llamaherd.model import FusedSlice

    tiny.clear_cache()  # a runner's (memory-mapped) cache: not copied
    fused = copy.deepcopy(tiny)
    fused.fuse_projections()
    attn, ffn = fused.layers[0].attention, fused.layers[0].feed_forward
    assert FusedSlice.intact(attn.wqkv, attn.wq, attn.wk, attn.wv) and FusedSlice.intact(ffn.w13, ffn.w1, ffn.w3)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in tiny.parameters())
    x = torch.randn(2, 64)
    torch.testing.assert_close(attn.wk(x), tiny.layers[0].attention.wk(x))
    tokens = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), tiny(tokens), rtol=1e-5, atol=1e-5)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_compiled_equals_eager(tiny, device):
    """The runner's compiled step (measured on the CPU: 2e-6 from eager with inductor and with
    aot_eager). On the CPU it compiles with aot_eager — the same fullgraph capture of the step and
    of its in-place cache writes, without inductor's C++ build (a minute on two cores); on CUDA
    with inductor and one CUDA graph a step (`static.GraphedStep`), as the server runs it."""
    tiny.clear_cache()  # a CPU runner's memory-mapped cache: not copied
    model = tiny if device == "cpu" else copy.deepcopy(tiny).to(device)  # CUDA's runner fuses its model
    try:
        eager = TorchRunner(model, "f32", compile=False)
        want_tokens, want = serve(eager, eager.decode)
        runner = TorchRunner(model, "f32", compile=True)
        if device == "cpu":
            runner.compile_backend = "aot_eager"
        got_tokens, got = serve(runner, runner.decode)
    finally:
        tiny.to("cpu")
    assert runner._step is not None  # the steps above went through it
    assert got_tokens == want_tokens
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-4)


def test_masked_attention_over_repeated_heads_equals_grouped_query_attention():
    """`model.heads_for_mask` (what a masked attention does on CUDA: one key/value head per query
    head) gives what SDPA's grouped-query mode gives: query head h reads key/value head h // (H/K)."""
    import torch.nn.functional as F

    from llamaherd.model import heads_for_mask

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 5, 8, generator=g) for heads in (6, 2, 2))
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.4
    mask[..., 0] = True  # every query sees a key
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    kr, vr = heads_for_mask(q, k, v, repeat=True)
    assert kr.shape == (2, 6, 5, 8)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask), want)
    assert heads_for_mask(q, k, v)[0] is k  # on the CPU: unchanged


def test_the_compiled_step_follows_the_cache_as_it_grows(tiny):
    """A compile for each cache shape: the cache doubles up to the model's context (~10 sizes, more
    than dynamo's default 8 recompiles of one function), and every step equals the eager one. (Here
    dynamo's limit starts at 2, so that 5 sizes pass it.)"""
    eager = TorchRunner(tiny, "f32", compile=False)
    runner = TorchRunner(tiny, "f32", compile=True)
    runner.compile_backend = "eager"  # the same capture and guards as inductor, no code generation
    tokens = PROMPTS[2]
    logits = []
    with torch._dynamo.config.patch(recompile_limit=2):  # the runner raises it; restored after
        for r in (eager, runner):
            r.release()
            r.allocate(1, len(tokens))
            r.prefill([(tokens, 0, 0)])
            out = []
            for i in range(5):
                pos = len(tokens) + i
                r.allocate(1, pos + 1 + i, [pos])  # a larger cache before every step (its rows kept)
                out.append(r.decode([7 + i], [pos], [0]))
            logits.append(torch.cat(out))
            r.release()
    tiny.clear_cache()
    assert runner.compile  # no fallback: every shape compiled
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_a_step_that_cannot_compile_falls_back_to_eager(tiny, caplog):
    """No compiler (or a GPU inductor cannot build for): a warning, then the eager step's logits."""
    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler")

    eager = TorchRunner(tiny, "f32", compile=False)
    runner = TorchRunner(tiny, "f32", compile=True)
    runner.compile_backend = broken
    _, want = serve(eager, eager.decode)
    with caplog.at_level("WARNING", logger="llamaherd.engine"):
        _, got = serve(runner, runner.decode)
    assert not runner.compile and "decoding eagerly" in caplog.text
    torch.testing.assert_close(got, want)
