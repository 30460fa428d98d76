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
  herd dpo lora    `herd train dpo`'s step (see run_dpo_row): LoRA r16, reference = adapters off, packed pairs
  trl dpo lora     TRL's DPOTrainer with a peft LoRA of the same settings, the same pairs and batch
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

ROWS = ["herd full", "hf full", "herd lora", "hf+peft lora", "herd qlora", "herd dpo lora", "trl dpo lora"]


def batches(vocab: int, batch: int, seq: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(n)]


def run_row(row: str, model_path: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if "dpo" in row:
        return run_dpo_row(row, model_path, steps, batch, threads)
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
        for b in PairBatches(examples, batch, 512, shuffle=False).epoch(0):
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
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row in this process
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.model is None:
        from llamaherd.fetch import smollm2_gguf

        args.model = str(smollm2_gguf())
    if args.one:
        print(json.dumps(run_row(args.one, args.model, args.steps, args.batch, args.seq, args.threads)))
        return
    results = {}
    for row in args.rows.split(","):
        cmd = [sys.executable, __file__, "--one", row, "--model", args.model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
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
             "herd dpo lora": "trl dpo lora"}
    for row, r in results.items():
        ratio = ""
        if row in peers and peers[row] in results:
            q = results[peers[row]]
            ratio = f"{r['tokens_per_s'] / q['tokens_per_s']:.2f}x / {q['peak_rss_mb'] / r['peak_rss_mb']:.2f}x"
        print(f"| {row} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
