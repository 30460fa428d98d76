"""benchmarks/bench_gpu.py runs on a CPU-only machine: its tiny smoke mode measures, and asking
for CUDA where there is none ends cleanly."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_smoke_run_on_the_cpu(bench, tmp_path):
    rows = bench.main(["--device", "cpu", "--tiny", "--tokens", "4", "--backend", "aot_eager", "--no-hf",
                       "--json", str(tmp_path / "out.json")])
    (row,) = rows
    assert row["shape"] == "tiny" and row["bound tok/s"] > 0
    assert row["herd eager"] > 0 and row["herd compiled"] > 0
    assert (tmp_path / "out.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_no_cuda_is_a_clean_skip(bench, tmp_path, capsys):
    assert bench.main(["--device", "cuda", "--json", str(tmp_path / "out.json")]) == []
    assert "no CUDA device" in capsys.readouterr().out
