"""Batch-1 decode of float models on a GPU: herd's eager and compiled steps vs the memory-bandwidth
bound and vs transformers (static cache + torch.compile), random weights on Llama 3 shapes.

    python benchmarks/bench_gpu.py [--shapes llama3.2-1b llama3.1-8b] [--tokens 128] [--json FILE]
    python benchmarks/bench_gpu.py --device cpu --tiny     # smoke run on a CPU (tests/test_bench_gpu.py)

Rows, one run, each model on its own:
  herd eager      `TorchRunner.decode` (the row-exact eager step)
  herd compiled   `TorchRunner.compiled_step`: the model's forward under torch.compile over the
                  static KV cache (on CUDA mode "reduce-overhead": a CUDA graph per step)
  transformers    `generate` with cache_implementation="static" (which compiles its forward)
Decode rate = tokens / time after one warm-up step per row. The bound: the bytes one step must read
(every weight once; an untied input embedding is only gathered) over the bandwidth measured here
by a device-to-device copy. Float dtype: bf16 on CUDA, float32 on a CPU.

Not here yet (issue 20): GGUF int4 weights kept 4-bit on CUDA and the 16-stream `herd serve` row.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=256, max_seq_len=256)


def bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Bytes read + written per second by a device-to-device copy (the best of 5)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_bytes(model) -> int:
    """Bytes of the weights one decode step reads: all but an untied input embedding."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen or (name == "tok_embeddings.weight" and not model.args.tie_embeddings):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def herd_rate(model, tokens: int, compile: bool, backend: str = "inductor") -> float:
    from llamaherd.engine.runner import TorchRunner

    runner = TorchRunner(model, "f16", compile=compile)
    runner.compile_backend = backend
    runner.allocate(1, tokens + 32)
    runner.prefill([(list(range(16)), 0, 0)])
    runner.decode([1], [16], [0])  # warm-up (and compilation)
    sync(model.device)
    t0 = time.perf_counter()
    token = 1
    for i in range(tokens):
        token = int(runner.decode([token], [17 + i], [0])[0].argmax())
    return tokens / (time.perf_counter() - t0)


def hf_rate(args, dtype, device, tokens: int) -> float | None:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    config = LlamaConfig(hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, intermediate_size=args.hidden_dim,
                         vocab_size=args.vocab_size, tie_word_embeddings=args.tie_embeddings,
                         max_position_embeddings=args.max_seq_len)
    hf = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    ids = torch.arange(16, device=device)[None]

    def run(n):
        sync(device)
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
        sync(device)
        return time.perf_counter() - t0

    run(2)  # warm-up (and compilation)
    return (tokens - 1) / (run(tokens) - run(1))


def bench(name: str, margs, device: torch.device, tokens: int, hf: bool, backend: str) -> dict:
    from llamaherd.model import Transformer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(margs)
        model.init_weights()
    model = model.to(dtype).eval()
    bound = bandwidth(device) / step_bytes(model)
    row = {"shape": name, "bound tok/s": bound,
           "herd eager": herd_rate(model, tokens, compile=False),
           "herd compiled": herd_rate(model, tokens, compile=True, backend=backend)}
    del model
    if hf:
        row["transformers static+compile"] = hf_rate(margs, dtype, device, tokens)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    from llamaherd.config import ModelArgs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*", default=["llama3.2-1b", "llama3.1-8b"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the shapes (smoke run)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="leave transformers out")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of herd's step (aot_eager: no C++ build)")
    parser.add_argument("--json", default="benchmarks/results/bench_gpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("[no CUDA device: nothing to measure; --device cpu --tiny is the smoke run]")
        return []
    shapes = {"tiny": ModelArgs(**TINY)} if args.tiny else \
        {s: replace(ModelArgs.from_name(s), max_seq_len=args.tokens + 64) for s in args.shapes}
    rows = [bench(name, margs, device, args.tokens, args.hf, args.backend) for name, margs in shapes.items()]
    for row in rows:
        bound = row["bound tok/s"]
        cells = [f"{k}: {v:.1f} tok/s ({v / bound:.0%} of bound)" for k, v in row.items()
                 if k not in ("shape", "bound tok/s") and v is not None]
        print(f"{row['shape']} ({args.device}; bound {bound:.0f} tok/s): " + "; ".join(cells))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
