"""Decode on a GPU: herd's steps (bf16 and int4, batch 1, and 16 streams through the server's
scheduler) vs the memory-bandwidth bound and vs transformers (static cache + torch.compile),
random weights on Llama 3 shapes, in one run.

    python benchmarks/bench_gpu.py [--shapes llama3.2-1b llama3.1-8b] [--tokens 128] [--streams 16]
                                   [--rows ...] [--json FILE]
    python benchmarks/bench_gpu.py --device cpu --tiny     # smoke run on a CPU (tests/test_bench_gpu.py)

On a lent GPU each shape compiles five decode graphs (herd batch 1, herd int4, herd N rows,
transformers batch 1 and N): about a minute each for the 8B shape, so give each shape its own call
when a call is limited to 10 minutes (`--shapes llama3.2-1b`, then `--shapes llama3.1-8b --json ...`).

Rows (`--rows`, default all), each model on its own:
  herd eager           `TorchRunner.decode`, the row-exact eager step, batch 1
  herd compiled        the compiled static step (`engine/static.py`; on CUDA `GraphedStep`:
                       one CUDA graph per step), batch 1
  herd int4 compiled   the same with every block projection (and an untied output projection) in
                       torch's int4 layers (`Int4Linear`, groups of 32: what a Q4_0/Q4_1/Q4_K GGUF
                       loads as on CUDA), random codes
  herd N streams       N jobs at once through `engine.Scheduler` (what `herd serve` runs: sampling,
                       text, per-job bookkeeping) with the compiled step over its N rows; aggregate
  transformers         `generate` with cache_implementation="static" (which compiles its forward),
                       batch 1, and N identical prompts at once (aggregate)
Rates difference two runs, (n - 1) tokens / (time for n - time for 1), each the best of two, so
that prompt processing and compilation are left out (as MEASURED.md's GPU table). The bound: the
bytes one step must read (every weight once, int4 codes with their scales; an untied input
embedding is only gathered) over the bandwidth measured here by a device-to-device copy. Float
dtype: bf16 on CUDA, float32 on a CPU. Goals (issue 20, from an H100): batch 1 >= 85% of the bound; int4 8B >= 265 tokens/s
(torchao's published 241 x 1.1); N streams >= 1.5x transformers'.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import llamaherd  # noqa: F401 — before torch: it sets the OpenMP wait policy (GOMP_SPINCOUNT) a CPU run needs
import torch

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=256, max_seq_len=256)
ROWS = ("herd eager", "herd compiled", "herd int4 compiled", "herd streams", "transformers", "transformers streams")
PROMPT = 16  # prompt tokens
INT4_8B_GOAL = 265.0  # tokens/s: torchao's published int4 Llama-3.1-8B on H100 (241.4) x 1.1


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


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every parameter and weight buffer (int4 codes,
    scales and zeros) once, but not an untied input embedding, the RoPE table or a KV cache."""
    seen, total = set(), 0
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                  if n != "rope" and ".cache." not in n]
    for name, t in tensors:
        if t.data_ptr() in seen or (name == "tok_embeddings.weight" and not model.args.tie_embeddings):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def random_model(margs, device: torch.device, dtype: torch.dtype, int4: bool = False):
    """A `Transformer` of random weights; `int4`: its block projections fused (wqkv, w13) and, with
    an untied output projection, in `Int4Linear`s of random codes, scales and zeros (the speed of
    the kernel does not depend on the values)."""
    from llamaherd.model import Transformer

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(margs)
        model.init_weights()
    model = model.to(dtype).eval()
    if int4:
        for layer in model.layers:
            attn, ffn = layer.attention, layer.feed_forward
            attn.fuse(random_int4(attn.wq.out_features + attn.wk.out_features + attn.wv.out_features,
                                  attn.wq.in_features, device))
            ffn.fuse(random_int4(2 * ffn.w1.out_features, ffn.w1.in_features, device))
            attn.wo = random_int4(attn.wo.out_features, attn.wo.in_features, device)
            ffn.w2 = random_int4(ffn.w2.out_features, ffn.w2.in_features, device)
        if not margs.tie_embeddings:
            model.output = random_int4(margs.vocab_size, margs.dim, device)
    return model


def random_int4(out_features: int, in_features: int, device: torch.device):
    from llamaherd.quantize.linear import GROUP, Int4Linear, pack_int4

    g = in_features // GROUP
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, device=device)
    scales = torch.full((out_features, g), 0.02 / 8, device=device)
    zeros = torch.randn(out_features, g, device=device) * 0.002
    layer = Int4Linear(in_features, out_features, device=device)
    for name, tensor in pack_int4(codes, scales, zeros).items():
        setattr(layer, name, tensor)
    layer.pack()
    return layer


def rate(run, tokens: int, batch: int = 1) -> float:
    """batch * (tokens - 1) / (time for `tokens` - time for 1), each time the best of two runs (a
    loaded machine adds noise to both), after one warm-up run of 3 tokens (and the compilation)."""
    run(3)
    best = {n: min(run(n) for _ in range(2)) for n in (tokens, 1)}
    return batch * (tokens - 1) / (best[tokens] - best[1])


def runner_for(model, n_rows: int, capacity: int, compile: bool, backend: str):
    from llamaherd.engine.runner import TorchRunner

    runner = TorchRunner(model, "f16", compile=compile)
    runner.compile_backend = backend
    runner.allocate(n_rows, capacity)
    return runner


def herd_rate(model, tokens: int, compile: bool, backend: str) -> float:
    """Batch-1 greedy decode rate through the runner."""
    runner = runner_for(model, 1, tokens + PROMPT + 16, compile, backend)

    def run(n):
        sync(model.device)
        t0 = time.perf_counter()
        token = int(runner.prefill([(list(range(1, PROMPT + 1)), 0, 0)])[0].argmax())
        for i in range(n - 1):
            token = int(runner.decode([token], [PROMPT + i], [0])[0].argmax())
        sync(model.device)
        return time.perf_counter() - t0

    try:
        return rate(run, tokens)
    finally:
        runner.release()


class _Bytes:
    """A tokenizer for the scheduler's text stream: every token is one letter."""

    def token_bytes(self, token: int) -> bytes:
        return b"x"


def herd_streams_rate(model, streams: int, tokens: int, compile: bool, backend: str) -> float:
    """Aggregate greedy decode rate of `streams` jobs at once through `engine.Scheduler`."""
    from llamaherd.engine.scheduler import Job, Scheduler
    from llamaherd.engine.types import Delta
    from llamaherd.generate import SamplingOptions

    ctx = tokens + PROMPT + 16
    runner = runner_for(model, streams, ctx, compile, backend)  # the scheduler keeps this cache
    scheduler = Scheduler(runner, n_rows=streams, max_ctx=ctx, name="bench")
    V = model.args.vocab_size

    rounds = iter(range(1 << 30))

    def run(n):
        round_ = next(rounds)
        done, errors = threading.Semaphore(0), []
        opts = SamplingOptions(temperature=0.0, repeat_penalty=1.0, num_predict=n, num_ctx=ctx)

        def emit(event):  # on the scheduler's thread
            if isinstance(event, Delta):
                return
            if isinstance(event, BaseException):
                errors.append(event)
            done.release()  # Done, or an error: the job is over

        # Prompts differ by job and by run, so no run reuses a kept prefix of another.
        jobs = [Job([(round_ * 7919 + s * 131 + j) % V for j in range(PROMPT)], opts, frozenset(), _Bytes(), emit)
                for s in range(streams)]
        sync(model.device)
        t0 = time.perf_counter()
        for job in jobs:
            scheduler.submit(job)
        for _ in jobs:
            done.acquire()
        sync(model.device)
        if errors:
            raise errors[0]
        return time.perf_counter() - t0

    try:
        return rate(run, tokens, streams)
    finally:
        scheduler.close()
        runner.release()


def hf_rates(args, dtype, device, tokens: int, streams: int, rows: set[str]) -> dict[str, float]:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return {}
    config = LlamaConfig(hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, intermediate_size=args.hidden_dim,
                         vocab_size=args.vocab_size, tie_word_embeddings=args.tie_embeddings,
                         max_position_embeddings=args.max_seq_len)
    with torch.device(device):  # random init on the device: minutes on a CPU for the 8B shape
        hf = LlamaForCausalLM(config).to(dtype).eval()
    out = {}
    for row, batch in (("transformers", 1), ("transformers streams", streams)):
        if row not in rows:
            continue
        ids = torch.arange(1, PROMPT + 1, device=device)[None].expand(batch, -1).contiguous()

        def run(n):
            sync(device)
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
            sync(device)
            return time.perf_counter() - t0

        out[row] = rate(run, tokens, batch)
    return out


def bench(name: str, margs, device: torch.device, tokens: int, streams: int, rows: set[str], backend: str) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bw = bandwidth(device)
    row = {"shape": name}

    def measured(key: str, value: float) -> None:  # printed at once: a long run shows where it is
        row[key] = value
        print(f"  {name} {key}: {value:.1f}", flush=True)

    model = random_model(margs, device, dtype)
    measured("bound tok/s", bw / step_bytes(model))
    if "herd eager" in rows:
        measured("herd eager", herd_rate(model, tokens, compile=False, backend=backend))
    if "herd compiled" in rows:
        measured("herd compiled", herd_rate(model, tokens, compile=True, backend=backend))
    if "herd streams" in rows:
        measured(f"herd {streams} streams", herd_streams_rate(model, streams, tokens, compile=True, backend=backend))
    del model
    if "herd int4 compiled" in rows:
        model = random_model(margs, device, dtype, int4=True)
        measured("int4 bound tok/s", bw / step_bytes(model))
        measured("herd int4 compiled", herd_rate(model, tokens, compile=True, backend=backend))
        del model
    hf = hf_rates(margs, dtype, device, tokens, streams, rows)
    if "transformers" in hf:
        measured("transformers static+compile", hf["transformers"])
    if "transformers streams" in hf:
        measured(f"transformers {streams} streams", hf["transformers streams"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def report(row: dict, device: str, streams: int) -> str:
    """One line: each rate, and against its bound (a stream row: its per-stream rate) or peer."""
    bound, int4_bound = row["bound tok/s"], row.get("int4 bound tok/s")
    cells = []
    for key, value in row.items():
        if key in ("shape", "bound tok/s", "int4 bound tok/s"):
            continue
        if "streams" in key:
            cells.append(f"{key}: {value:.1f} tok/s aggregate")
        elif "int4" in key:
            cells.append(f"{key}: {value:.1f} tok/s ({value / int4_bound:.0%} of the int4 bound {int4_bound:.0f})")
        else:
            cells.append(f"{key}: {value:.1f} tok/s ({value / bound:.0%} of bound)")
    herd, hf = row.get(f"herd {streams} streams"), row.get(f"transformers {streams} streams")
    if herd and hf:
        cells.append(f"{streams} streams herd/transformers {herd / hf:.2f}x (goal 1.5x)")
    if "8b" in row["shape"] and "herd int4 compiled" in row:
        cells.append(f"int4 vs goal {row['herd int4 compiled'] / INT4_8B_GOAL:.2f}x of {INT4_8B_GOAL:.0f}")
    return f"{row['shape']} ({device}; float bound {bound:.0f} tok/s): " + "; ".join(cells)


def main(argv: list[str] | None = None) -> list[dict]:
    from llamaherd.config import ModelArgs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*", default=["llama3.2-1b", "llama3.1-8b"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the shapes (smoke run)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS, help="which rows to run")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="leave transformers out")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of herd's step (aot_eager: no C++ build)")
    parser.add_argument("--json", default="benchmarks/results/bench_gpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("[no CUDA device: nothing to measure; --device cpu --tiny is the smoke run]")
        return []
    rows = set(args.rows) - (set() if args.hf else {"transformers", "transformers streams"})
    shapes = {"tiny": ModelArgs(**TINY)} if args.tiny else \
        {s: replace(ModelArgs.from_name(s), max_seq_len=args.tokens + 64) for s in args.shapes}
    results = []
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for name, margs in shapes.items():
        results.append(bench(name, margs, device, args.tokens, args.streams, rows, args.backend))
        print(report(results[-1], args.device, args.streams), flush=True)
        # written after every shape: a call stopped at its time limit keeps the shapes it finished
        Path(args.json).write_text(json.dumps({"device": gpu_name(device), "rows": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
