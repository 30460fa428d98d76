"""Training's GPU path, checked on the CPU: the compiled training step (`finetune.compile_blocks`,
as `herd train sft --compile` runs it) equals the eager one, and benchmarks/bench_train_gpu.py's
tiny smoke mode measures every row.

The compile backend here is aot_eager: dynamo captures each block and AOTAutograd traces its
forward and backward (the graphs inductor would get on CUDA) without a C++ build (inductor's
CPU code generation takes ~30 s for even a tiny model)."""

import copy

import pytest
import llamaherd  # noqa: F401 — before torch: the OpenMP wait policy (settings.py)
import torch

from llamaherd.config import ModelArgs
from llamaherd.train.finetune import CausalLMLoss, compile_blocks
from llamaherd.train.lora import lora_llama3
from llamaherd.train.loop import make_optimizer, train_step
from llamaherd.train.pretrain import build_random

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=300, max_seq_len=128,
                 tie_embeddings=True, rope_theta=500000.0)


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_train_gpu")


def packed_batch(bench, seed_batches: int = 2) -> list[dict]:
    """Random packed sequences with document masks (positions restarting, no target across a
    boundary), as `herd train pretrain` / packed `sft` batches are."""
    return bench.token_batches(ARGS.vocab_size, 2, 48, seed_batches, torch.device("cpu"), packed=True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_compiled_training_step_equals_eager(bench, lora):
    """Loss and every gradient of the compiled model equal the eager model's (fp32 tolerance), with
    the document mask; then two whole steps (clipping, fused AdamW) give the same losses and weights."""
    eager = build_random(ARGS, "cpu", seed=0)
    if lora:
        lora_llama3(eager, "all", rank=4, alpha=8.0)
        with torch.no_grad():  # B = 0 at start: give the adapters a value, so their path counts
            for name, p in eager.named_parameters():
                if "lora_b" in name:
                    p.normal_(0, 0.02)
    from torch._dynamo.utils import counters

    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    batches = packed_batch(bench)
    assert (batches[0]["input_pos"] == 0).sum() > 2  # several documents per sequence
    wrappers = [CausalLMLoss(m.train(), 8192) for m in (eager, compiled)]

    losses = [w(**batches[0]) for w in wrappers]
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled side did compile (not eager vs eager)
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (eager, compiled)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)

    for m in (eager, compiled):
        m.zero_grad(set_to_none=True)
    params = [[p for p in m.parameters() if p.requires_grad] for m in (eager, compiled)]
    optimizers = [make_optimizer(ps, lr=1e-3, weight_decay=0.1) for ps in params]
    for batch in batches:
        steps = [train_step(w, [batch], o, ps, device="cpu", grad_clip=1.0)
                 for w, o, ps in zip(wrappers, optimizers, params)]
        assert steps[1][0]["loss"] == pytest.approx(steps[0][0]["loss"], rel=1e-5)
        assert steps[1][1] == steps[0][1] == batch["tokens"].numel()
    for a, b in zip(*params):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_compile_blocks_shares_one_graph_between_blocks(bench):
    """Every block runs the same compiled graph: one capture for all of them (a recompile per block
    would hit dynamo's cache limit on deep models and fall back to eager)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build_random(ARGS, "cpu", seed=0)
    compile_blocks(model, backend="aot_eager")
    CausalLMLoss(model.train(), 8192)(**packed_batch(bench, 1)[0]).backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_compiled_sft_pads_batches_to_a_few_lengths():
    """With --compile a chat batch's length is rounded up (`padded_multiple`: a quarter of
    --max-seq-len), so batches of many lengths make a couple of graphs, not one each (after 8
    dynamo runs the blocks eagerly); the padding takes no loss and changes no real token's."""
    from torch._dynamo.utils import counters

    from llamaherd.train.data import Example, collate, pack
    from llamaherd.train.finetune import padded_multiple

    assert padded_multiple(True, 2048) == 512 and padded_multiple(False, 2048) == 1
    multiple = padded_multiple(True, ARGS.max_seq_len)  # 64
    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, ids[1:] + [-100]) for ids in
                (torch.randint(1, ARGS.vocab_size, (n,), generator=g).tolist() for n in (20, 50, 90, 33))]
    torch._dynamo.reset()
    counters.clear()
    model = build_random(ARGS, "cpu", seed=0)
    eager = copy.deepcopy(model)
    compile_blocks(model, backend="eager")
    for seq in pack(examples, ARGS.max_seq_len, packed=False):
        padded, plain = collate([seq], multiple=multiple), collate([seq])
        assert padded["tokens"].shape[1] % multiple == 0
        torch.testing.assert_close(CausalLMLoss(model, 8192)(**padded), CausalLMLoss(eager, 8192)(**plain))
    assert counters["stats"]["unique_graphs"] <= 2  # lengths 64 and 128


@pytest.mark.slow  # importing peft alone takes ~7 s on a loaded 2-core machine
def test_tiny_smoke_run_on_the_cpu(bench, tmp_path):
    """The rows measure: herd full and pretrain compiled (dynamo's capture without code generation:
    the equality test above traces the backward), transformers + peft (the hf full row is the
    same code without peft; herd lora is compiled in the equality test)."""
    rows = ["herd full", "hf+peft lora", "herd pretrain"]
    out = bench.main(["--device", "cpu", "--tiny", "--backend", "eager", "--warmup", "1", "--steps", "2",
                      "--rows", *rows, "--json", str(tmp_path / "out.json")])
    assert list(out["rows"]) == rows
    for row, r in out["rows"].items():
        assert "error" not in r, (row, r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and len(r["step_seconds"]) == 2, row
        assert all(loss == loss and 0 < loss < 20 for loss in r["losses"]), row  # finite, near ln(vocab)
    assert out["rows"]["hf+peft lora"]["trainable"] < out["rows"]["herd full"]["trainable"] / 2
    assert out["rows"]["herd full"]["graph_breaks"] == 0
    assert (tmp_path / "out.json").exists() and "herd full" in (tmp_path / "out.json").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_no_cuda_is_a_clean_skip(bench, tmp_path, capsys):
    assert bench.main(["--device", "cuda", "--json", str(tmp_path / "out.json")]) == {}
    assert "no CUDA device" in capsys.readouterr().out


def test_a_failing_row_loses_no_other(bench, tmp_path, monkeypatch, capsys):
    """A row that raises (an OOM, a missing package) is reported and the next rows still run."""
    def broken(*args):
        raise RuntimeError("CUDA out of memory (made up)")

    monkeypatch.setattr(bench, "hf_step", broken)
    out = bench.main(["--device", "cpu", "--tiny", "--warmup", "1", "--steps", "1", "--rows", "hf full",
                      "herd full eager", "--json", str(tmp_path / "out.json")])
    assert "out of memory" in out["rows"]["hf full"]["error"]
    assert out["rows"]["herd full eager"]["tokens_per_s"] > 0
    assert "hf full          FAILED" in capsys.readouterr().out
    assert "herd full eager" in (tmp_path / "out.json").read_text()


def test_fused_loss_under_autocast_matches_float32_and_keeps_dtypes():
    """Under autocast (bf16 on CUDA; the CPU's bf16 autocast here runs the same code) the fused
    cross-entropy casts its inputs once and does its matmuls in bf16: the loss and gradients stay
    close to float32's, and the gradients come back in the inputs' own dtype (float32)."""
    import torch.nn.functional as F

    from llamaherd.train.loss import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 32, generator=g).requires_grad_()
    w = (torch.randn(300, 32, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (40,), generator=g)
    targets[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, targets, chunk=64)  # 64 * 8192 // 300 rows: one block
    loss.backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ ref_w.T, targets, ignore_index=-100, reduction="sum")
    ref.backward()
    assert loss.dtype == h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=5e-2, atol=2e-2)
