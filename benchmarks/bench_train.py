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
  herd qlora ac    the same with activation checkpointing (each block recomputed in the backward),
                   (`--activation-checkpointing`): QLoRA is the memory-lean method
  herd dpo lora    `herd train dpo`'s step (see run_dpo_row): LoRA r16, reference = adapters off, packed pairs,
                   each pair's prompt computed once (`noshare`: chosen and rejected as two documents)
  trl dpo lora     TRL's DPOTrainer with a peft LoRA of the same settings, the same pairs and batch
  herd pretrain    pre-training a Llama 3 shape from random weights (`--preset`, `--vocab`; see below)
  hf pretrain      a plain transformers LlamaForCausalLM loop of the same shape
Each row runs in a fresh process (peak RSS is its own): one warm-up step, then `--steps` timed
steps. On a shared machine whose load moves, `--paired --rows "herd lora,hf+peft lora"` runs the rows
in one process instead, their steps alternating on the same batches (CPU time with `--threads 1`):
speed ratios only, no memory. tokens/s = batch x seq x steps / time; ratios are herd / transformers (and, for memory,
transformers' / herd's: > 1 is better).

`--sampling` runs the rejection-sampling section instead (see `bench_sampling` below).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

ROWS = ["herd full", "hf full", "herd lora", "hf+peft lora", "herd qlora", "herd qlora ac", "herd dpo lora",
        "trl dpo lora"]
EXTRA_ROWS = ["herd dpo lora noshare"]  # on request (--rows): what sharing each pair's prompt saves


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


def batches(vocab: int, batch: int, seq: int, n: int, data: str | None = None, model_path: str | None = None):
    """`n` fine-tuning batches {tokens, targets, doc_ids, input_pos}, (batch, seq) each: random ids
    (every position has a target), or with `data` a chat JSONL as `herd train sft` sees it (the
    model's chat template, loss only on the assistant's tokens, examples packed into `seq`)."""
    import torch

    if data is None:
        g = torch.Generator().manual_seed(0)
        blocks = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(n)]
        return [{"tokens": b[:, :-1], "targets": b[:, 1:], "doc_ids": None, "input_pos": None} for b in blocks]
    from llamaherd.tokenizer import load_tokenizer
    from llamaherd.train.data import collate, pack, read_jsonl, tokenize

    sequences = pack(tokenize(load_tokenizer(model_path), read_jsonl(data), seq)[0], seq)
    sequences = (sequences * (batch * n // len(sequences) + 1))[:batch * n]  # the file again if it is short
    return [collate(sequences[i * batch:(i + 1) * batch], multiple=seq) for i in range(n)]


def sft_step(row: str, model_path: str):
    """(a function that runs one training step on a (batch, seq + 1) block of ids, the trainable
    parameters, the vocabulary size) for a fine-tuning row. Both sides use the fused AdamW: herd's
    `train.loop.fit` makes it in one process, and it is transformers' Trainer default (torch >= 2.8)."""
    import torch

    torch.manual_seed(0)
    if row.startswith("herd"):
        from llamaherd.train.finetune import CausalLMLoss, load_for_training
        from llamaherd.train.lora import lora_llama3

        method = row.split()[1]
        model, _ = load_for_training(model_path, method, "cpu")
        if method != "full":
            lora_llama3(model, "all", rank=16, alpha=32)
        if row.endswith(" ac"):  # activation checkpointing, as `herd train sft --activation-checkpointing`
            from llamaherd.train.finetune import _checkpoint_blocks

            _checkpoint_blocks(model)
        model.train()
        loss_module = CausalLMLoss(model, 8192)
        vocab = model.args.vocab_size

        def step_loss(b):
            n = (b["targets"] != -100).sum()
            return loss_module(b["tokens"], b["targets"], b["doc_ids"], b["input_pos"]) / n
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
            # shift_labels: position t's target as herd has it (HF would shift `labels` and drop the
            # last). Packed data: the same restarting positions, from which transformers masks across
            # examples as herd's document mask does (only without a KV cache: use_cache=False).
            return model(input_ids=b["tokens"], labels=b["targets"], shift_labels=b["targets"],
                         position_ids=b["input_pos"], use_cache=False).loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def step(b, clock=time.perf_counter) -> float:
        t0 = clock()
        step_loss(b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return clock() - t0

    return step, params, vocab


def run_row(row: str, model_path: str, steps: int, batch: int, seq: int, threads: int, data: str | None = None
            ) -> dict:
    import torch

    torch.set_num_threads(threads)
    if "dpo" in row:
        return run_dpo_row(row, model_path, steps, batch, threads)
    step, params, vocab = sft_step(row, model_path)
    times = [step(b) for b in batches(vocab, batch, seq, steps + 1, data, model_path)]
    timed = sum(times[1:])
    return {"row": row, "tokens_per_s": batch * seq * steps / timed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in params)}


def run_sft_paired(rows: list[str], model_path: str, steps: int, batch: int, seq: int, threads: int,
                   data: str | None = None) -> dict:
    """Fine-tuning rows in one process, their steps alternating on the same batches (as
    `run_pretrain_paired`; with one thread, timed in CPU time). Speed only: peak memory needs
    a process per row. Returns per row the median step's tokens/s and every step's seconds."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    made = {row: sft_step(row, model_path) for row in rows}
    vocab = next(iter(made.values()))[2]
    times: dict[str, list[float]] = {row: [] for row in rows}
    for i, b in enumerate(batches(vocab, batch, seq, steps + 1, data, model_path)):
        for row, (step, _, _) in made.items():
            t = step(b, clock)
            if i:  # the first step of each is a warm-up
                times[row].append(t)
    return {row: {"row": row, "tokens_per_s": batch * seq / statistics.median(ts), "step_seconds": ts}
            for row, ts in times.items()}


# -- DPO: herd train dpo's step vs TRL's DPOTrainer (+ peft LoRA) ------------------------------------
# The same pairs (made-up words from a fixed seed, prompts ~40 tokens, responses ~60-120), the same
# batch of pairs, LoRA r16 / alpha 32 on all seven projections, lr 1e-5, beta 0.1, the NLL term 0.2
# (TRL: loss_type ["sigmoid", "sft"], loss_weights [1, 0.2]), fp32, the reference = the base with the
# adapters off in both. One warm-up step, then `steps` timed. tokens/s counts the pairs' real tokens
# (prompt twice + both responses), the same for both rows, so its ratio is the steps/s ratio.

def dpo_pairs(n: int, seed: int = 0) -> list[dict]:
    import random

    words = ("river stone light garden quiet morning paper window bread music winter market bridge letter "
             "forest candle silver harbor orange thunder meadow lantern velvet compass").split()
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    return [{"prompt": [{"role": "user", "content": text(rng.randint(20, 30))}],
             "chosen": [{"role": "assistant", "content": text(rng.randint(40, 80))}],
             "rejected": [{"role": "assistant", "content": text(rng.randint(40, 80))}]} for _ in range(n)]


def run_dpo_row(row: str, model_path: str, steps: int, batch: int, threads: int) -> dict:
    import torch

    pairs = dpo_pairs(batch * (steps + 1))
    times: list[float] = []
    if row.startswith("herd"):
        from llamaherd.train.dpo import DPOLoss, Pair, PairBatches, tokenize_pairs
        from llamaherd.train.finetune import load_for_training
        from llamaherd.train.lora import lora_llama3

        model, ckpt = load_for_training(model_path, "lora", "cpu")
        lora_llama3(model, "all", rank=16, alpha=32)
        model.train()
        examples, stats = tokenize_pairs(ckpt.tokenizer, [Pair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs],
                                         512, mask_format_tokens=True)
        wrapper = DPOLoss(model, beta=0.1, nll_coef=0.2)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        for b in PairBatches(examples, batch, 512, shuffle=False, share_prompt="noshare" not in row).epoch(0):
            t0 = time.perf_counter()
            loss, _ = wrapper(**b)
            (loss / batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        tokens = stats.tokens  # both sides' input positions
    else:
        import datasets
        import peft
        import transformers
        import trl
        from pathlib import Path

        path = Path(model_path)
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The GGUF is dequantized to float32 at load, but transformers keeps a GGUF "quantizer" mark that
        # makes Trainer refuse to train (peft's LoRA over it is fine): drop the mark.
        model.hf_quantizer, model.is_quantized = None, False

        class Timer(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t0)

        args = trl.DPOConfig(output_dir="/tmp/bench_trl_dpo", per_device_train_batch_size=batch, max_steps=steps + 1,
                             learning_rate=1e-5, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2],
                             bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
                             dataloader_num_workers=0, max_length=512, seed=0, lr_scheduler_type="constant")
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs),
                                 processing_class=tok, peft_config=lora, callbacks=[Timer()])
        trainer.train()
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        tokens = None
    timed = sum(times[1:])
    if tokens is None:  # the same pairs through herd's tokenizer: the token count both rows share
        from llamaherd.train.dpo import Pair, tokenize_pairs
        from llamaherd.weights import load_checkpoint

        tokens = tokenize_pairs(load_checkpoint(model_path).tokenizer,
                                [Pair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs], 512)[1].tokens
    per_step = tokens / (steps + 1)
    return {"row": row, "tokens_per_s": per_step * steps / timed, "steps_per_s": steps / timed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in params), "pairs_per_step": batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the SmolLM2 GGUF (default: the cached one)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", help="comma-separated subset of: " + ", ".join(ROWS + EXTRA_ROWS + PRETRAIN_ROWS)
                   + " [all but the pre-training rows; with --paired: the pre-training rows]")
    p.add_argument("--preset", default="20m", help="pre-training rows: herd's preset [20m]")
    p.add_argument("--vocab", type=int, default=128256, help="pre-training rows: vocabulary size [Llama 3's]")
    p.add_argument("--paired", action="store_true", help="the rows in one process, steps alternating "
                                                           "(speed only; for a machine whose load moves)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row in this process
    p.add_argument("--data", help="fine-tuning rows: a chat JSONL (e.g. examples/korean-chat/train.jsonl) in place of "
                                  "random ids: the template, the assistant-only loss and the packing of herd train sft")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.data:  # a bad file is one usage line, here rather than in every row's process
        from llamaherd.errors import HerdError
        from llamaherd.train.data import read_jsonl

        try:
            read_jsonl(args.data)
        except HerdError as e:
            p.error(str(e))
    args.rows = args.rows or ",".join(PRETRAIN_ROWS if args.paired else ROWS)
    if args.model is None and any(r not in PRETRAIN_ROWS for r in (args.one or args.rows).split(",")):
        from llamaherd.fetch import smollm2_gguf

        args.model = str(smollm2_gguf())
    if args.paired and set(args.rows.split(",")) != set(PRETRAIN_ROWS):
        rows = args.rows.split(",")
        results = run_sft_paired(rows, args.model, args.steps, args.batch, args.seq, args.threads, args.data)
        print(f"batch {args.batch} x {args.seq}{f' of {args.data}' if args.data else ''}, {args.steps} timed steps "
              f"each, alternating, {args.threads} threads"
              f"{' (CPU time)' if args.threads == 1 else ''}")
        for r in results.values():
            print(f"{r['row']:<14} {r['tokens_per_s']:8.1f} tokens/s   steps {', '.join(f'{t:.2f}' for t in r['step_seconds'])} s")
        peers = {"herd full": "hf full", "herd lora": "hf+peft lora", "herd qlora": "hf+peft lora"}
        for row, peer in peers.items():
            if row in results and peer in results:
                print(f"{row} / {peer}: {results[row]['tokens_per_s'] / results[peer]['tokens_per_s']:.2f}x")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return
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
        print(json.dumps(run_row(args.one, args.model, args.steps, args.batch, args.seq, args.threads, args.data)))
        return
    results = {}
    for row in args.rows.split(","):
        cmd = [sys.executable, __file__, "--one", row, "--model", str(args.model), "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
               "--preset", args.preset, "--vocab", str(args.vocab)] + (["--data", args.data] if args.data else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{row}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
            continue
        results[row] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[row]
        print(f"{row:<14} {r['tokens_per_s']:8.1f} tokens/s " + (f"({r['steps_per_s']:.3f} DPO steps/s) "
              if "steps_per_s" in r else "") + f"  peak RSS {r['peak_rss_mb']:7.0f} MB   "
              f"trainable {r['trainable'] / 1e6:.2f} M", flush=True)
    print(f"\nbatch {args.batch} x {args.seq} tokens, {args.steps} timed steps, {args.threads} threads")
    print("| run | tokens/s | peak RSS (MB) | vs transformers (speed / memory) |")
    print("|---|---|---|---|")
    peers = {"herd full": "hf full", "herd lora": "hf+peft lora", "herd qlora": "hf+peft lora",
             "herd qlora ac": "hf+peft lora", "herd dpo lora": "trl dpo lora", "herd dpo lora noshare": "trl dpo lora",
             "herd pretrain": "hf pretrain"}
    for row, r in results.items():
        ratio = ""
        if row in peers and peers[row] in results:
            q = results[peers[row]]
            ratio = f"{r['tokens_per_s'] / q['tokens_per_s']:.2f}x / {q['peak_rss_mb'] / r['peak_rss_mb']:.2f}x"
        mfu = f" (MFU {r['mfu']:.1%} of {r['peak_gflops']:.0f} GFLOP/s)" if "mfu" in r else ""
        print(f"| {row}{mfu} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {ratio} |")
    for row in ("herd qlora", "herd qlora ac"):
        if row in results and "herd lora" in results:
            print(f"{row} peak / herd lora peak: {results[row]['peak_rss_mb'] / results['herd lora']['peak_rss_mb']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


# -- rejection sampling: herd's batch loop vs transformers' generate(num_return_sequences=K) ----------
#
#     python benchmarks/bench_train.py --sampling [--k 8] [--prompts 8] [--max-tokens 64] [--parallel 32]
#
# The same prompts (a shared system prompt and short questions, chat template applied), the same
# sampling (temperature 1, top-p 0.9, no top-k, no repeat penalty), up to --max-tokens new tokens
# each, a reply ending at its end-of-turn token. samples/s = prompts x K / wall time (prefill
# included, load not). Rows, each in a fresh process:
#   herd q4_1        the GGUF's own blocks (the native runner), K samples sharing each prompt's prefill
#   herd q4_1 noshare  the same with each sample prefilling its prompt (what the sharing saves)
#   herd f32         weights dequantized to float32 (the torch runner): the same numbers as HF's
#   hf f32           transformers, the GGUF dequantized to float32, one generate() over all prompts
#                    (left-padded) with num_return_sequences=K

SAMPLING_ROWS = ["herd q4_1", "herd q4_1 noshare", "herd f32", "hf f32"]
SAMPLING_SYSTEM = ("You are a helpful, careful assistant. Answer the user's question clearly and correctly, "
                   "in a friendly tone. Prefer short paragraphs and concrete examples; say so when you are "
                   "not sure, and never make up facts, names or numbers.")
SAMPLING_QUESTIONS = ["What is the capital of France?", "Give me three tips for learning to cook.",
                      "Why is the sky blue?", "Write a haiku about the sea.", "How do vaccines work?",
                      "What is a prime number?", "Suggest a name for a pet turtle.", "Explain recursion to a child.",
                      "What causes the seasons?", "How do I make a cup of tea?", "What is photosynthesis?",
                      "Tell me a fun fact about octopuses.", "What is the difference between weather and climate?",
                      "How does a bicycle stay upright?", "Name three famous painters.", "What is gravity?"]


def sampling_prompts(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": SAMPLING_SYSTEM}, {"role": "user", "content": q}]
            for q in (SAMPLING_QUESTIONS * (n // len(SAMPLING_QUESTIONS) + 1))[:n]]


def run_sampling_row(row: str, model_path: str, n_prompts: int, k: int, max_tokens: int, parallel: int,
                     threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    prompts = sampling_prompts(n_prompts)
    if row.startswith("herd"):
        from llamaherd.llm import Llama
        from llamaherd.train.sample import generate_samples

        policy = Llama.load(model_path, device="cpu", quantized="q4_1" in row)
        options = {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "repeat_penalty": 1.0, "num_predict": max_tokens}
        list(generate_samples(policy, prompts[:1], 2, {**options, "num_predict": 4}))  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        done = list(generate_samples(policy, prompts, k, options, seed=0, parallel=parallel,
                                     share_prefill="noshare" not in row))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        new_tokens = sum(len(s.tokens) for _, samples in done for s in samples)
        prompt_tokens = sum(len(policy.encode_chat(p)) for p in prompts)
    else:
        from pathlib import Path

        import transformers

        path = Path(model_path)
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tok.padding_side = "left"
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
        kw = dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0, repetition_penalty=1.0,
                  num_return_sequences=k, eos_token_id=eos, pad_token_id=tok.pad_token_id or 0)
        with torch.inference_mode():
            model.generate(**tok(texts[:1], return_tensors="pt"), max_new_tokens=4, **kw)  # warm-up
            torch.manual_seed(0)
            t0, c0 = time.perf_counter(), time.process_time()
            out = model.generate(**batch, max_new_tokens=max_tokens, **kw)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        new = out[:, batch["input_ids"].shape[1]:]
        ended = torch.isin(new, torch.tensor(eos))  # the tokens up to the first end, as herd counts them
        lengths = torch.where(ended.any(1), ended.int().argmax(1), torch.full((new.shape[0],), new.shape[1]))
        new_tokens = int(lengths.sum())
        prompt_tokens = int(batch["attention_mask"].sum())
    # CPU time too: with one thread, on a machine others load, samples per CPU second is the
    # steadier figure (time spent waiting for a core left out).
    return {"row": row, "samples_per_s": n_prompts * k / seconds, "new_tokens_per_s": new_tokens / seconds,
            "seconds": seconds, "cpu_seconds": cpu, "samples_per_cpu_s": n_prompts * k / cpu, "samples": n_prompts * k, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_sampling(args) -> None:
    results = {}
    settings = ["--model", args.model, "--k", str(args.k), "--prompts", str(args.prompts), "--max-tokens",
                str(args.max_tokens), "--parallel", str(args.parallel), "--threads", str(args.threads)]
    for row in args.sampling_rows.split(","):
        proc = subprocess.run([sys.executable, __file__, "--sampling", "--one", row, *settings],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{row}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
            continue
        r = results[row] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{row:<18} {r['samples_per_s']:7.2f} samples/s  {r['new_tokens_per_s']:7.1f} new tokens/s  "
              f"({r['samples']} samples, {r['new_tokens']} new tokens in {r['seconds']:.1f} s, "
              f"{r['cpu_seconds']:.1f} s CPU)  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    print(f"\n{args.prompts} prompts x K={args.k}, up to {args.max_tokens} new tokens, temperature 1, top-p 0.9, "
          f"{args.threads} threads, herd --parallel {args.parallel}")
    print("| run | samples/s | new tokens/s | vs hf f32 (samples/s) | samples per CPU s | vs hf f32 |")
    print("|---|---|---|---|---|---|")
    for row, r in results.items():
        hf = results.get("hf f32")
        ratio = f"{r['samples_per_s'] / hf['samples_per_s']:.2f}x" if hf else ""
        cpu_ratio = f"{r['samples_per_cpu_s'] / hf['samples_per_cpu_s']:.2f}x" if hf else ""
        print(f"| {row} | {r['samples_per_s']:.2f} | {r['new_tokens_per_s']:.1f} | {ratio} | "
              f"{r['samples_per_cpu_s']:.2f} | {cpu_ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def sampling_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="rejection sampling: herd vs transformers generate")
    p.add_argument("--sampling", action="store_true")
    p.add_argument("--model")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--parallel", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sampling-rows", default=",".join(SAMPLING_ROWS),
                   help="comma-separated subset of: " + ", ".join(SAMPLING_ROWS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.model is None:
        from llamaherd.fetch import smollm2_gguf

        args.model = str(smollm2_gguf())
    if args.one:
        print(json.dumps(run_sampling_row(args.one, args.model, args.prompts, args.k, args.max_tokens,
                                          args.parallel, args.threads)))
    else:
        bench_sampling(args)


if __name__ == "__main__":
    if "--sampling" in sys.argv:
        sampling_main(sys.argv[1:])
    else:
        main()
