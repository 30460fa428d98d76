"""The compiled static-cache decode step of float models (`TorchRunner.compiled_step`, HERD_COMPILE)
equals the eager step, on a tiny random model."""

import pytest
import torch

from llamaherd.config import ModelArgs
from llamaherd.engine.runner import TorchRunner
from llamaherd.model import Transformer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=128, max_seq_len=128)
    m = Transformer(args)
    m.init_weights(std=0.1)
    return m.eval()


def greedy(runner, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    runner.allocate(1, 64)
    logits = runner.prefill([(ids, 0, 0)])[0]
    tokens, seen = [], []
    for i in range(n):
        seen.append(logits)
        tokens.append(int(logits.argmax()))
        logits = runner.decode([tokens[-1]], [len(ids) + i], [0])[0]
    return tokens, torch.stack(seen)


def test_compiled_equals_eager(tiny):
    """Greedy tokens and logits (measured: 2e-6 apart with inductor and with aot_eager). The test
    compiles with aot_eager — the same fullgraph capture of the model's forward and of its in-place
    cache writes, without inductor's C++ build (a minute on two cores)."""
    ids = [3, 14, 15, 92, 65, 35]
    want_tokens, want = greedy(TorchRunner(tiny, "f32", compile=False), ids, 8)
    runner = TorchRunner(tiny, "f32", compile=True)
    runner.compile_backend = "aot_eager"
    got_tokens, got = greedy(runner, ids, 8)
    assert runner._step is not None  # the steps above went through it
    assert got_tokens == want_tokens
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
