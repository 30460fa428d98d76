"""Training speed and memory: herd vs HF transformers (+ peft), SmolLM2-135M, one run.

    python benchmarks/bench_train.py [--model FILE.gguf] [--steps 4] [--batch 4] [--seq 256] [--threads 2]

Same weights (the SmolLM2-135M-Instruct GGUF, dequantized to float32), the same token batches
(random ids from a fixed seed: the data pipeline is not what is measured), AdamW, fp32 on the CPU.
Rows:
  herd full        every weight trains
  hf full          transformers LlamaForCausalLM, the same
  herd lora        LoRA r16 on all seven projections, base frozen
  hf+peft lora     peft's LoRA with the same settings
  herd qlora       herd's LoRA over the GGUF's own quantized blocks (no float copy of the blocks)
  herd pretrain    pre-training a Llama 3 shape from random weights (`--preset`, `--vocab`; see below)
  hf pretrain      a plain transformers LlamaForCausalLM loop of the same shape
Each row runs in a fresh process (peak RSS is its own): one warm-up step, then `--steps` timed
steps. tokens/s = batch x seq x steps / time; ratios are herd / transformers (and, for memory,
transformers' / herd's: > 1 is better).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

ROWS = ["herd full", "hf full", "herd lora", "hf+peft lora", "herd qlora"]


# -- pre-training: a Llama 3 shape from random weights, herd's recipe step vs a plain transformers loop --
#
#   python benchmarks/bench_train.py --rows "herd pretrain,hf pretrain" [--preset 20m] [--vocab 128256]
#   python benchmarks/bench_train.py --paired ...     # both in one process, steps alternating (speed only)
#
# The same shape (herd's preset; `LlamaConfig` with the same sizes), the same random token batches, AdamW
# (0.9/0.95, weight decay 0.1), clipping at 1.0, fp32 on the CPU. herd trains as `herd train pretrain`
# does: documents packed with a document mask (a boundary every ~`seq / 3` tokens, positions restarting),
# the chunked cross-entropy over the vocabulary. transformers trains plain causal sequences (no mask:
# less work than herd's). MFU = training FLOPs per token (train/presets.flops_per_token, the same for
# both) x tokens/s / this process's measured peak (the best of a few large fp32 matmuls, same threads).
PRETRAIN_ROWS = ["herd pretrain", "hf pretrain"]


def peak_flops(n: int = 2048, repeats: int = 5, clock=time.perf_counter) -> float:
    """This process's fp32 matmul FLOP/s: the best of `repeats` n x n products."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        a @ b
        best = min(best, clock() - t0)
    return 2 * n ** 3 / best


def pretrain_batches(vocab: int, batch: int, seq: int, n: int):
    """Random ids with document boundaries every ~seq/3 tokens: (tokens, targets, doc_ids, input_pos)."""
    import numpy as np
    import torch

    from llamaherd.train.pretrain import positions

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (batch, seq + 1))
        starts = rng.random((batch, seq)) < 3 / seq
        starts[:, 0] = True
        doc_ids = np.cumsum(starts, axis=1) - 1
        targets = ids[:, 1:].copy()
        targets[:, :-1][starts[:, 1:]] = -100  # no target across a boundary
        out.append({"tokens": torch.from_numpy(ids[:, :-1]), "targets": torch.from_numpy(targets),
                    "doc_ids": torch.from_numpy(doc_ids), "input_pos": torch.from_numpy(positions(doc_ids))})
    return out


def pretrain_step(row: str, preset: str, vocab: int):
    """(a function that runs one training step on a batch, the trainable parameters) for a row."""
    import torch

    from llamaherd.train.presets import preset_args

    args = preset_args(preset, vocab)
    if row == "herd pretrain":
        from llamaherd.train.finetune import CausalLMLoss
        from llamaherd.train.pretrain import build_from_preset

        model = build_from_preset(preset, vocab, "cpu", seed=0)
        model.train()
        wrapper = CausalLMLoss(model, 8192)

        def step_loss(b):
            return wrapper(**b) / (b["targets"] != -100).sum()
    else:
        import transformers

        from llamaherd.export.hf import hf_config

        torch.manual_seed(0)
        config = transformers.LlamaConfig(**{k: v for k, v in hf_config(args).items()
                                             if k not in ("architectures", "model_type", "torch_dtype")})
        model = transformers.LlamaForCausalLM(config)
        model.train()

        def step_loss(b):
            return model(input_ids=b["tokens"], labels=b["tokens"]).loss  # HF shifts the labels

    params = [p for p in model.parameters() if p.requires_grad]
    # herd: the optimizer `train.loop.fit` makes in one process (fused); transformers: a plain loop's default
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True if row == "herd pretrain" else None)

    def step(b, clock=time.perf_counter) -> float:
        t0 = clock()
        step_loss(b).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return clock() - t0

    return step, params


def run_pretrain_row(row: str, preset: str, vocab: int, steps: int, batch: int, seq: int, threads: int) -> dict:
    import torch

    from llamaherd.train.presets import flops_per_token, preset_args

    torch.set_num_threads(threads)
    step, params = pretrain_step(row, preset, vocab)
    times = [step(b) for b in pretrain_batches(vocab, batch, seq, steps + 1)]
    tokens_per_s = batch * seq * steps / sum(times[1:])
    peak = peak_flops()
    return {"row": row, "tokens_per_s": tokens_per_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in params),
            "mfu": flops_per_token(preset_args(preset, vocab), seq) * tokens_per_s / peak, "peak_gflops": peak / 1e9}


def run_pretrain_paired(preset: str, vocab: int, steps: int, batch: int, seq: int, threads: int) -> dict:
    """Both rows in one process, their steps alternating (herd, hf, herd, hf, ...) with a peak-FLOPs
    probe between pairs: on a shared machine whose load moves, both see the same conditions. With one
    thread, steps are timed in this process's CPU time (time spent waiting for a core left out).
    Returns per row the median step's tokens/s and MFU against the median probe."""
    import statistics

    import torch

    from llamaherd.train.presets import flops_per_token, preset_args

    torch.set_num_threads(threads)
    rows = {row: pretrain_step(row, preset, vocab)[0] for row in PRETRAIN_ROWS}
    times: dict[str, list[float]] = {row: [] for row in rows}
    peaks = []
    for i, b in enumerate(pretrain_batches(vocab, batch, seq, steps + 1)):
        for row, step in rows.items():
            t = step(b, time.process_time if threads == 1 else time.perf_counter)
            if i:  # the first step of each is a warm-up
                times[row].append(t)
        peaks.append(peak_flops(repeats=3, clock=time.process_time if threads == 1 else time.perf_counter))
    peak = statistics.median(peaks)
    flops = flops_per_token(preset_args(preset, vocab), seq)
    out = {}
    for row, ts in times.items():
        tps = batch * seq / statistics.median(ts)
        out[row] = {"row": row, "tokens_per_s": tps, "mfu": flops * tps / peak, "peak_gflops": peak / 1e9,
                    "step_seconds": ts}
    return out


def batches(vocab: int, batch: int, seq: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(n)]


def run_row(row: str, model_path: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if row.startswith("herd"):
        from llamaherd.train.finetune import CausalLMLoss, load_for_training
        from llamaherd.train.lora import lora_llama3

        method = row.split()[1]
        model, _ = load_for_training(model_path, method, "cpu")
        if method != "full":
            lora_llama3(model, "all", rank=16, alpha=32)
        model.train()
        loss_module = CausalLMLoss(model, 8192)
        vocab = model.args.vocab_size

        def step_loss(b):
            tokens, targets = b[:, :-1], b[:, 1:]
            return loss_module(tokens, targets, None, None) / targets.numel()
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(__import__("pathlib").Path(model_path).parent), gguf_file=__import__("pathlib").Path(model_path).name,
            dtype=torch.float32)
        if row.startswith("hf+peft"):
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"]))
        model.train()
        vocab = model.config.vocab_size

        def step_loss(b):
            return model(input_ids=b[:, :-1], labels=b[:, :-1].clone()).loss  # HF shifts the labels

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    data = batches(vocab, batch, seq, steps + 1)
    times = []
    for b in data:
        t0 = time.perf_counter()
        step_loss(b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = sum(times[1:])
    return {"row": row, "tokens_per_s": batch * seq * steps / timed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the SmolLM2 GGUF (default: the cached one)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS + PRETRAIN_ROWS))
    p.add_argument("--preset", default="20m", help="pre-training rows: herd's preset [20m]")
    p.add_argument("--vocab", type=int, default=128256, help="pre-training rows: vocabulary size [Llama 3's]")
    p.add_argument("--paired", action="store_true", help="pre-training rows in one process, steps alternating "
                                                           "(speed only; for a machine whose load moves)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row in this process
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.model is None and not args.paired and any(r not in PRETRAIN_ROWS for r in (args.one or args.rows).split(",")):
        from llamaherd.fetch import smollm2_gguf

        args.model = str(smollm2_gguf())
    if args.paired:
        results = run_pretrain_paired(args.preset, args.vocab, args.steps, args.batch, args.seq, args.threads)
        herd, hf = results["herd pretrain"], results["hf pretrain"]
        print(f"{args.preset} (vocabulary {args.vocab}), batch {args.batch} x {args.seq}, {args.steps} timed steps "
              f"each, alternating, {args.threads} threads{' (CPU time)' if args.threads == 1 else ''}, "
              f"median probe {herd['peak_gflops']:.0f} GFLOP/s")
        for r in (herd, hf):
            print(f"{r['row']:<14} {r['tokens_per_s']:8.1f} tokens/s   MFU {r['mfu']:.1%}   "
                  f"steps {', '.join(f'{t:.2f}' for t in r['step_seconds'])} s")
        print(f"herd / transformers: {herd['tokens_per_s'] / hf['tokens_per_s']:.2f}x")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return
    if args.one in PRETRAIN_ROWS:
        print(json.dumps(run_pretrain_row(args.one, args.preset, args.vocab, args.steps, args.batch, args.seq,
                                          args.threads)))
        return
    if args.one:
        print(json.dumps(run_row(args.one, args.model, args.steps, args.batch, args.seq, args.threads)))
        return
    results = {}
    for row in args.rows.split(","):
        cmd = [sys.executable, __file__, "--one", row, "--model", str(args.model), "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
               "--preset", args.preset, "--vocab", str(args.vocab)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{row}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
            continue
        results[row] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[row]
        print(f"{row:<14} {r['tokens_per_s']:8.1f} tokens/s   peak RSS {r['peak_rss_mb']:7.0f} MB   "
              f"trainable {r['trainable'] / 1e6:.2f} M", flush=True)
    print(f"\nbatch {args.batch} x {args.seq} tokens, {args.steps} timed steps, {args.threads} threads")
    print("| run | tokens/s | peak RSS (MB) | vs transformers (speed / memory) |")
    print("|---|---|---|---|")
    peers = {"herd full": "hf full", "herd lora": "hf+peft lora", "herd qlora": "hf+peft lora",
             "herd pretrain": "hf pretrain"}
    for row, r in results.items():
        ratio = ""
        if row in peers and peers[row] in results:
            q = results[peers[row]]
            ratio = f"{r['tokens_per_s'] / q['tokens_per_s']:.2f}x / {q['peak_rss_mb'] / r['peak_rss_mb']:.2f}x"
        mfu = f" (MFU {r['mfu']:.1%} of {r['peak_gflops']:.0f} GFLOP/s)" if "mfu" in r else ""
        print(f"| {row}{mfu} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
