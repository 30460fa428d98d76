"""Training on a GPU: herd's step (full and LoRA, compiled) vs transformers (+ peft) on the Llama 3.2
1B shape, with herd's MFU against this device's measured bf16 matmul peak, in one run.

    PYTHONPATH=src python benchmarks/bench_train_gpu.py --json $OUT/train_gpu.json [--batch 8] [--seq 2048]
                                                       [--steps 6] [--rows ...]
    python benchmarks/bench_train_gpu.py --device cpu --tiny --backend aot_eager   # smoke run (tests)

Random weights made on the device, random token batches from a fixed seed (no model file, no
data file, no internet). Each row builds its model, takes `--warmup` steps (the compile happens
in the first) and then `--steps` timed steps (each synchronised), and is freed before the next.
Every row is its own try/except, printed as soon as it is measured; the JSON is rewritten after
each row, so a run cut short keeps what it measured.

Rows (`--rows`, default all but `herd lora eager`), in this order:
  herd full           `herd train sft --method full --compile`'s step: the `Transformer`, each block
                      torch.compiled (`finetune.compile_blocks`), `CausalLMLoss` (the chunked
                      cross-entropy), `loop.train_step` (bf16 autocast, clipping at 1.0, the fused
                      AdamW of `loop.make_optimizer`); plain causal sequences
  hf full             transformers `LlamaForCausalLM` (its default sdpa attention, eager), the same
                      batches, bf16 autocast, clipping at 1.0, fused AdamW
  herd lora           the same as herd full with `lora_llama3(model, "all", rank 16, alpha 32)`
  hf+peft lora        peft's LoRA, the same settings, on the hf model
  herd pretrain       `herd train pretrain --compile`'s step: packed documents with the document
                      mask (a boundary every ~seq/3 tokens, positions restarting), issue 17's row
  herd full eager     herd full without compile (what compile brings; and a figure if compile fails)
  herd lora eager     herd lora without compile (on request)
tokens/s = batch x seq / the median timed step. MFU = training FLOPs per token
(`train.presets.flops_per_token`: 6 x the matmul weights, the output included, + causal attention)
x tokens/s / the peak: the best of a few 8192^3 bf16 matmuls in this process. Memory: the CUDA
allocator's peak during the row (`torch.cuda.max_memory_allocated`). Goals (issue 15): herd full
MFU >= 50%; herd lora >= 2x hf+peft lora.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from dataclasses import replace
from pathlib import Path

import llamaherd  # noqa: F401 — before torch: the OpenMP wait policy (settings.py)
import torch

HERD_ROWS = ("herd full", "herd lora", "herd pretrain", "herd full eager", "herd lora eager")
HF_ROWS = ("hf full", "hf+peft lora")
ROWS = ("herd full", "hf full", "herd lora", "hf+peft lora", "herd pretrain", "herd full eager", "herd lora eager")
DEFAULT_ROWS = ROWS[:6]
PEERS = {"herd full": "hf full", "herd lora": "hf+peft lora", "herd full eager": "hf full",
         "herd lora eager": "hf+peft lora"}
LORA = dict(rank=16, alpha=32.0)
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=512, max_seq_len=256,
            tie_embeddings=True, rope_theta=500000.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 5) -> float:
    """FLOP/s of this device's dense matmuls: the best of `repeats` runs of 4 n x n x n products,
    bf16 on CUDA (float32 on a CPU, smaller)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del a, b, c
    return 4 * 2 * n ** 3 / best


def token_batches(vocab: int, batch: int, seq: int, n: int, device: torch.device, packed: bool) -> list[dict]:
    """`n` batches of random ids (a fixed seed) as `CausalLMLoss` takes them: tokens and targets
    (B, seq), and for `packed` document ids and positions with a boundary every ~seq/3 tokens
    (as `herd train pretrain`'s windows; no target across a boundary). Made on the device."""
    import numpy as np

    from llamaherd.train.pretrain import positions

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (batch, seq + 1))
        b = {"tokens": ids[:, :-1], "targets": ids[:, 1:].copy()}
        if packed:
            starts = rng.random((batch, seq)) < 3 / seq
            starts[:, 0] = True
            doc_ids = np.cumsum(starts, axis=1) - 1
            b["targets"][:, :-1][starts[:, 1:]] = -100
            b["doc_ids"], b["input_pos"] = doc_ids, positions(doc_ids)
        out.append({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in b.items()})
    return out


def herd_step(row: str, margs, device: torch.device, backend: str, loss_chunk: int):
    """(one training step on a batch, the trainable parameters, the model) for a herd row: the
    pieces `herd train sft` / `pretrain` put together (see the module doc)."""
    from llamaherd.train.finetune import CausalLMLoss, compile_blocks
    from llamaherd.train.lora import lora_llama3
    from llamaherd.train.loop import make_optimizer, train_step
    from llamaherd.train.pretrain import build_random

    model = build_random(margs, str(device), seed=0)  # `herd train pretrain`'s initialisation, on the device
    if "lora" in row:
        lora_llama3(model, "all", LORA["rank"], LORA["alpha"])
    if "eager" not in row:
        compile_blocks(model, backend)
    model.train()
    wrapper = CausalLMLoss(model, loss_chunk)
    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=1e-5, weight_decay=0.0)

    def step(batch: dict) -> dict:
        means, _, _ = train_step(wrapper, [batch], optimizer, params, device=str(device), grad_clip=1.0)
        return means

    return step, params, model


def hf_step(row: str, margs, device: torch.device):
    """The same for a transformers row: `LlamaForCausalLM` of the same shape (+ peft's LoRA)."""
    import transformers

    from llamaherd.train.loop import autocast

    config = transformers.LlamaConfig(
        hidden_size=margs.dim, num_hidden_layers=margs.n_layers, num_attention_heads=margs.n_heads,
        num_key_value_heads=margs.n_kv_heads, intermediate_size=margs.hidden_dim, vocab_size=margs.vocab_size,
        tie_word_embeddings=margs.tie_embeddings, max_position_embeddings=margs.max_seq_len,
        rms_norm_eps=margs.norm_eps)  # RoPE's theta and scaling left at their defaults: the same work
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).float()
    if row == "hf+peft lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    def step(batch: dict) -> dict:
        with autocast(str(device)):  # herd's: bf16 on CUDA
            # The same next-token targets as herd's: HF shifts the labels itself (so its last
            # position has none); its loss is the mean over them.
            loss = model(input_ids=batch["tokens"], labels=batch["tokens"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item()}

    return step, params, model


def run_row(row: str, margs, device: torch.device, args, peak: float) -> dict:
    from llamaherd.train.presets import flops_per_token

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()  # each row compiles its own model's blocks (no stale graphs of the last row's)
    counters = _dynamo_counters()
    t_build = time.perf_counter()
    if row in HERD_ROWS:
        step, params, model = herd_step(row, margs, device, args.backend, args.loss_chunk)
    else:
        step, params, model = hf_step(row, margs, device)
    batches = token_batches(margs.vocab_size, args.batch, args.seq, args.warmup + args.steps, device,
                            packed=row == "herd pretrain")
    times, losses = [], []
    first = None
    for i, batch in enumerate(batches):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step(batch)["loss"])
        sync(device)
        if i == 0:
            first = time.perf_counter() - t_build  # build + the first step (the compile)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens_per_s = args.batch * args.seq / statistics.median(times)
    result = {"row": row, "tokens_per_s": tokens_per_s, "step_seconds": times,
              "median_step_s": statistics.median(times), "first_step_s": first,
              "trainable": sum(p.numel() for p in params), "losses": losses}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    flops = flops_per_token(margs, args.seq)
    result["mfu"] = flops * tokens_per_s / peak  # full-training FLOPs; for LoRA rows an upper count
    after = _dynamo_counters()
    result["graph_breaks"] = after["graph_breaks"] - counters["graph_breaks"]
    result["compiled_graphs"] = after["graphs"] - counters["graphs"]
    del step, params, model, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {"graph_breaks": 0, "graphs": 0}
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"].get("unique_graphs", 0)}


def line(r: dict) -> str:
    mem = f", peak {r['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in r else ""
    mfu = f", MFU {r['mfu']:.1%}" if not r["row"].startswith("hf") and "lora" not in r["row"] else ""
    return (f"{r['row']:<16} {r['tokens_per_s']:9.0f} tokens/s (median step {r['median_step_s'] * 1e3:.0f} ms, "
            f"first step incl. build+compile {r['first_step_s']:.1f} s){mfu}{mem}; "
            f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}; graphs {r['compiled_graphs']}, "
            f"graph breaks {r['graph_breaks']}")


def main(argv: list[str] | None = None) -> dict:
    from llamaherd.config import ModelArgs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="llama3.2-1b")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke run)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compile is in the first)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--rows", nargs="*", default=list(DEFAULT_ROWS), choices=ROWS)
    parser.add_argument("--backend", default="inductor", help="herd's torch.compile backend (aot_eager: no C++ build)")
    parser.add_argument("--loss-chunk", type=int, default=8192, help="herd's cross-entropy chunk [8192, the CLI's]")
    parser.add_argument("--json", default="benchmarks/results/bench_train_gpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("[no CUDA device: nothing to measure; --device cpu --tiny is the smoke run]")
        return {}
    if args.tiny:
        margs, name = ModelArgs(**TINY), "tiny"
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 64)
    else:
        margs, name = replace(ModelArgs.from_name(args.shape), max_seq_len=args.seq), args.shape
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "shape": name, "batch": args.batch, "seq": args.seq,
           "steps": args.steps, "warmup": args.warmup, "backend": args.backend, "rows": {}}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 256)
    out["peak_tflops"] = peak / 1e12
    print(f"{name} on {out['device']} (torch {torch.__version__}), batch {args.batch} x {args.seq}, "
          f"{args.warmup} warm-up + {args.steps} timed steps; matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for row in args.rows:
        print(f"[{time.perf_counter() - start:5.0f} s] {row} ...", flush=True)
        try:
            r = out["rows"][row] = run_row(row, margs, device, args, peak)
            print(line(r), flush=True)
        except Exception as e:  # one row's failure (an OOM, a missing package) loses no other
            out["rows"][row] = {"row": row, "error": f"{type(e).__name__}: {e}"}
            print(f"{row:<16} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc()
        # Out of the except block: its traceback (and the failed row's model in its frames) is gone.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        path.write_text(json.dumps(out, indent=2))
    out["wall_s"] = time.perf_counter() - start
    path.write_text(json.dumps(out, indent=2))
    print(table(out), flush=True)
    print(f"[{out['wall_s']:.0f} s in all; JSON in {path}]", flush=True)
    return out


def table(out: dict) -> str:
    rows = {k: v for k, v in out["rows"].items() if "error" not in v}
    lines = ["", f"| run | tokens/s | MFU | peak memory (GB) | vs transformers (speed / memory) |", "|---|---|---|---|---|"]
    for row, r in rows.items():
        peer = rows.get(PEERS.get(row, ""))
        ratio = ""
        if peer:
            ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x"
            if "peak_memory_gb" in r:
                ratio += f" / {peer['peak_memory_gb'] / r['peak_memory_gb']:.2f}x"
        mem = f"{r['peak_memory_gb']:.1f}" if "peak_memory_gb" in r else ""
        lines.append(f"| {row} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {mem} | {ratio} |")
    lines.append(f"goals: herd full MFU >= 50% (peak {out['peak_tflops']:.0f} TFLOP/s measured here); "
                 f"herd lora >= 2x hf+peft lora. MFU counts full-training FLOPs (for LoRA rows, more than they do)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
