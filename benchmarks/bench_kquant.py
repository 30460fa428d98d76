"""The decode matmul of each GGUF block type, in the file's blocks and repacked eight rows at a time.

    python benchmarks/bench_kquant.py [--threads 1] [--rounds 5]

For SmolLM2-135M's shapes (w13: 3072 x 576, w2: 576 x 1536), each type's `BlockLinear` on random
blocks at batch 1 and 8: microseconds a call, nanoseconds a weight and GB/s of weight bytes, the
file's layout (kernels/kquant.c `tile`; Q4_1 and Q8_0 as a part of a mixed projection, which takes
that path) against the layout `BlockLinear.repack` makes at load (kquant.c's `r8_row`; blockmm.c's
`tile8` for a plain Q4_1 / Q8_0 layer). The weights stay in cache here, so this is the kernels'
arithmetic; a real decode step streams them from memory (`bench_cpu.py`). Best of `--rounds`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from llamaherd.quantize.linear import BlockLinear

F16_AT = {Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q6_K: [208]}  # where the f16 scales are


def random_blocks(qtype: Q, n: int, k: int) -> torch.Tensor:
    """n rows of k weights as random blocks (random codes, f16 scales of a sane size)."""
    rng = np.random.default_rng(0)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for at in F16_AT[qtype]:
        raw[..., at:at + 2] = (rng.standard_normal((n, k // block, 1)) * 0.02).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(n, -1))


def layer(qtype: Q, n: int, k: int, repacked: bool) -> BlockLinear:
    raw = random_blocks(qtype, n, k)
    if qtype in (Q.Q4_1, Q.Q8_0) and not repacked:  # a mixed projection's part: kquant.c's path
        module = BlockLinear(k, n, qtype, parts=[(n, qtype, 0)])
        module.raw = raw.view(-1)
    else:
        module = BlockLinear(k, n, qtype)
        module.raw = raw
    if repacked:
        module.repack()
    return module


def seconds(module: BlockLinear, x: torch.Tensor, rounds: int) -> float:
    reps = 60 if x.shape[0] == 1 else 20
    for _ in range(5):
        module(x)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            module(x)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads: {args.threads}\n{'shape':10} {'type':5} {'layout':8} {'batch':>5} {'us':>8} {'ns/weight':>10} {'GB/s':>6}")
    for n, k, types in [(3072, 576, [Q.Q4_1, Q.Q8_0, Q.Q5_0]), (576, 1536, [Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K])]:
        for qtype in types:
            for repacked in (False, True):
                module = layer(qtype, n, k, repacked)
                for m in (1, 8):
                    s = seconds(module, torch.randn(m, k), args.rounds)
                    print(f"{n}x{k:<5} {qtype.name:5} {'8-row' if repacked else 'file':8} {m:5} {s * 1e6:8.0f} "
                          f"{s * 1e9 / (n * k):10.4f} {module.raw.numel() / s / 1e9:6.2f}", flush=True)


if __name__ == "__main__":
    main()
