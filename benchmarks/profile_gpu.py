"""Where a decode step's time goes: torch.profiler over herd's compiled step (batch 1, or N rows)
on a Llama 3 shape with random weights. It prints the wall time of a step against the time the
device was busy in it (the difference is the host's: launches, copies, waiting for the logits)
and against the memory-bandwidth bound, and the kernels that take the most, so that a lent GPU's
few minutes show what to work on (issue 20: batch 1 at 43% / 65% of the bound on an H200).

    python benchmarks/profile_gpu.py [--shape llama3.2-1b] [--int4] [--rows 1] [--steps 50]
                                     [--json FILE] [--trace FILE.json]
    python benchmarks/profile_gpu.py --device cpu --tiny --backend eager      # smoke run (tests)

On a CPU the profile has no device side: the top operators by their own CPU time instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import llamaherd  # noqa: F401 — before torch: it sets the OpenMP wait policy a CPU run needs
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gpu, beside this script
from bench_gpu import PROMPT, TINY, bandwidth, random_model, runner_for, step_bytes, sync

KINDS = (  # a kernel's kind, by the first pattern its name contains
    ("attention", ("flash", "attention", "sdpa", "softmax")),
    ("matmul", ("gemm", "gemv", "matmul", "cutlass", "sm80_", "sm90_", "nvjet", "tinygemm", "int4", "mm_")),
    ("copy", ("memcpy", "memset", "copy")),
    ("fused elementwise", ("triton",)),
)


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, pats in KINDS if any(p in low for p in pats)), "other")


def self_time_us(event, device: bool) -> float:
    if not device:
        return event.self_cpu_time_total
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_decode(model, rows: int, steps: int, compile: bool, backend: str, trace: str | None = None) -> dict:
    """Profile `steps` greedy decode steps of `rows` rows after a warm-up (compilation, graph
    capture). Returns per-step milliseconds: wall, device busy, by kernel kind, and the top kernels."""
    on_device = model.device.type == "cuda"
    runner = runner_for(model, rows, PROMPT + steps + 16, compile, backend)
    try:
        logits = runner.prefill([(list(range(1, PROMPT + 1)), 0, r) for r in range(rows)])
        tokens, pos = logits.argmax(-1).tolist(), PROMPT

        def step():
            nonlocal tokens, pos
            tokens = runner.decode(tokens, [pos] * rows, list(range(rows))).argmax(-1).tolist()
            pos += 1

        for _ in range(3):
            step()
        sync(model.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(model.device)
            wall = time.perf_counter() - t0
    finally:
        runner.release()
    if trace:
        prof.export_chrome_trace(trace)
    events = [e for e in prof.key_averages() if self_time_us(e, on_device) > 0]
    if on_device:  # the device side: kernels and copies only
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    ms = lambda us: us / 1e3 / steps  # noqa: E731 — per step
    busy = sum(self_time_us(e, on_device) for e in events)
    kinds: dict[str, float] = {}
    for e in events:
        kinds[kind(e.key)] = kinds.get(kind(e.key), 0.0) + ms(self_time_us(e, on_device))
    top = sorted(events, key=lambda e: self_time_us(e, on_device), reverse=True)[:25]
    return {
        "rows": rows, "steps": steps, "wall ms/step": wall * 1e3 / steps,
        ("device busy ms/step" if on_device else "operators ms/step"): ms(busy),
        "by kind ms/step": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top": [{"name": e.key[:120], "ms/step": ms(self_time_us(e, on_device)), "calls/step": e.count / steps,
                 "kind": kind(e.key)} for e in top],
    }


def report(p: dict, bound_ms: float) -> str:
    busy_key = "device busy ms/step" if "device busy ms/step" in p else "operators ms/step"
    lines = [f"{p['rows']} row(s), {p['steps']} steps: wall {p['wall ms/step']:.3f} ms/step, "
             f"{busy_key.split(' ms')[0]} {p[busy_key]:.3f} ms/step, bound {bound_ms:.3f} ms/step "
             f"(wall at {bound_ms / p['wall ms/step']:.0%} of the bound)",
             "by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in p["by kind ms/step"].items())]
    lines += [f"  {t['ms/step']:8.4f} ms  {t['calls/step']:6.1f}x  {t['kind']:<17} {t['name']}" for t in p["top"]]
    return "\n".join(lines)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    from llamaherd.config import ModelArgs
    from llamaherd.errors import HerdError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="llama3.2-1b")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the shape (smoke run)")
    parser.add_argument("--int4", action="store_true", help="the block projections in int4 (what a 4-bit GGUF loads as)")
    parser.add_argument("--rows", type=positive, default=1, help="rows decoded together (the server's batch)")
    parser.add_argument("--steps", type=positive, default=50)
    parser.add_argument("--eager", action="store_true", help="profile the eager step, not the compiled one")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: no C++ build)")
    parser.add_argument("--json", help="write the profile here")
    parser.add_argument("--trace", help="write a Chrome trace here (chrome://tracing, Perfetto)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("[no CUDA device: nothing to profile; --device cpu --tiny is the smoke run]")
        return {}
    try:
        margs = ModelArgs(**TINY) if args.tiny else replace(ModelArgs.from_name(args.shape),
                                                           max_seq_len=PROMPT + args.steps + 64)
    except HerdError as e:
        parser.error(str(e))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(margs, device, dtype, int4=args.int4)
    bound_ms = step_bytes(model) / bandwidth(device) * 1e3
    p = profile_decode(model, args.rows, args.steps, not args.eager, args.backend, args.trace)
    p.update(shape="tiny" if args.tiny else args.shape, int4=args.int4, compiled=not args.eager,
             **{"bound ms/step": bound_ms})
    print(report(p, bound_ms), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(p, indent=2))
    return p


if __name__ == "__main__":
    main()
