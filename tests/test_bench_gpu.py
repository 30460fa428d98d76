"""benchmarks/bench_gpu.py runs on a CPU-only machine: its tiny smoke mode measures, and asking
for CUDA where there is none ends cleanly."""

import pytest
import llamaherd  # noqa: F401 — before torch: the OpenMP wait policy (settings.py)
import torch

@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_gpu")


@pytest.mark.slow  # three captures of the step by dynamo: ~15 s on a quiet 2-core machine, 45 at load 10
def test_tiny_smoke_run_on_the_cpu(bench, tmp_path):
    """Every herd row (bf16 and int4 steps, 4 streams through the scheduler) measures, with one
    compile backend that builds no C++; the int4 model's bound counts its 4-bit bytes."""
    rows = bench.main(["--device", "cpu", "--tiny", "--tokens", "8", "--streams", "4", "--backend", "eager",
                       "--no-hf", "--json", str(tmp_path / "out.json")])
    (row,) = rows
    assert row["shape"] == "tiny" and row["bound tok/s"] > 0
    assert row["int4 bound tok/s"] > 2 * row["bound tok/s"]  # float32 weights here: int4 reads ~1/7 of them
    for key in ("herd eager", "herd compiled", "herd int4 compiled", "herd 4 streams"):
        assert row[key] > 0, key
    assert (tmp_path / "out.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_no_cuda_is_a_clean_skip(bench, tmp_path, capsys):
    assert bench.main(["--device", "cuda", "--json", str(tmp_path / "out.json")]) == []
    assert "no CUDA device" in capsys.readouterr().out


def test_profile_smoke_run_on_the_cpu(load_benchmark, tmp_path):
    """benchmarks/profile_gpu.py (what a lent GPU's first minutes run) profiles the step of a tiny
    model on the CPU (eager: the compiled step is the smoke run's above): per-step times, the kinds
    adding up, the top operators, the JSON."""
    import json

    prof = load_benchmark("profile_gpu")
    p = prof.main(["--device", "cpu", "--tiny", "--steps", "4", "--rows", "2", "--eager",
                   "--json", str(tmp_path / "p.json")])
    assert p["wall ms/step"] > 0 and p["operators ms/step"] > 0 and p["top"]
    assert sum(p["by kind ms/step"].values()) == pytest.approx(p["operators ms/step"])
    assert any(t["kind"] == "matmul" for t in p["top"])
    assert json.loads((tmp_path / "p.json").read_text())["rows"] == 2
