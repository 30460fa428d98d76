"""herd eval vs lm-evaluation-harness's `hf` backend on the same SmolLM2 GGUF, one run.

    python benchmarks/bench_eval.py [--model FILE.gguf] [--mmlu 200] [--humaneval 164] [--threads 2]
                                    [--runtimes fast,reference,hf] [--json out.json]

  MMLU       an --mmlu question subset (evenly spaced over the 57 subjects, 0-shot, lm-eval's
             `mmlu` prompt), scored by log-likelihood: acc and items/s. lm-eval's `hf` backend gets
             the very (context, continuation) strings herd scores.
  HumanEval  the first --humaneval problems, n=1 greedy, up to 384 new tokens, Codex stop
             sequences: pass@1 and items/s. lm-eval's `hf` backend generates with
             `generate_until` from the same prompts; both completions are judged in herd's sandbox.
Rows: herd on the fast path (4-bit weights), herd on the float reference path, lm-eval `hf`
(transformers, float32, the same GGUF dequantized). Ratios are items/s over lm-eval's. Accuracy
must be identical on the reference path; the fast path's per-choice scores move by ~1e-3.
"""

from __future__ import annotations

import argparse
import json
import time


def lm_eval_mmlu(hf, task, items) -> tuple[float, float]:
    from lm_eval.api.instance import Instance

    from llamaherd.eval import metrics
    from llamaherd.eval.runner import context

    reqs, spans = [], []
    for item in items:
        ctx = context(task, item, 0, "question", lambda ex: ex["choices"][ex["answer"]])
        spans.append((len(reqs), len(item["choices"])))
        reqs += [Instance("loglikelihood", {}, (ctx, " " + c), len(reqs)) for c in item["choices"]]
    start = time.perf_counter()
    out = hf.loglikelihood(reqs, disable_tqdm=True)
    seconds = time.perf_counter() - start
    correct = 0
    for item, (s, m) in zip(items, spans):
        pred, _ = metrics.mc_scores([ll for ll, _ in out[s:s + m]], item["choices"])
        correct += pred == item["answer"]
    return correct / len(items), seconds


def lm_eval_humaneval(hf, task, items) -> tuple[float, float]:
    from lm_eval.api.instance import Instance

    from llamaherd.eval.runner import check_completion

    reqs = [Instance("generate_until", {}, (it["prompt"], {"until": task.stop, "max_gen_toks": task.max_tokens,
                                                            "do_sample": False}), i) for i, it in enumerate(items)]
    start = time.perf_counter()
    completions = hf.generate_until(reqs, disable_tqdm=True)
    seconds = time.perf_counter() - start
    passed = sum(check_completion(it, c).passed for it, c in zip(items, completions))
    return passed / len(items), seconds


def main() -> None:
    import torch

    import llamaherd
    from llamaherd.eval import run
    from llamaherd.eval.tasks import load_task
    from llamaherd.fetch import smollm2_gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF file (default SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--mmlu", type=int, default=200)
    ap.add_argument("--humaneval", type=int, default=164)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtimes", default="fast,reference,hf", help="which rows to run (comma-separated)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_gguf() if not args.model else args.model
    from pathlib import Path

    path = Path(path)
    mmlu, humaneval = load_task("mmlu"), load_task("humaneval")
    mmlu_items = mmlu.subset(args.mmlu)
    he_items = humaneval.items[:args.humaneval]
    rows = {}
    wanted = set(args.runtimes.split(","))
    for name, quantized in (("herd (fast)", True), ("herd (reference)", False)):
        if name[6:-1] not in wanted:
            continue
        llm = llamaherd.load(path, device="cpu", quantized=quantized)
        row = {}
        if args.mmlu:
            r = run([llm], mmlu, limit=args.mmlu, names=["m"], progress=False)["results"]["m"]
            row["mmlu_acc"], row["mmlu_items_s"] = r["metrics"]["acc"], len(mmlu_items) / r["seconds"]
        if args.humaneval:
            from llamaherd.eval.tasks import Task

            sub = Task("humaneval", "code", he_items, stop=humaneval.stop, max_tokens=humaneval.max_tokens)
            r = run([llm], sub, names=["m"], progress=False)["results"]["m"]
            row["humaneval_pass1"], row["humaneval_items_s"] = r["metrics"]["pass@1"], len(he_items) / r["seconds"]
        rows[name] = row
        print(name, row, flush=True)
    if "hf" not in wanted:
        return
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(path.parent), gguf_file=path.name, dtype="float32", device="cpu", batch_size=8)
    row = {}
    if args.mmlu:
        acc, seconds = lm_eval_mmlu(hf, mmlu, mmlu_items)
        row["mmlu_acc"], row["mmlu_items_s"] = acc, len(mmlu_items) / seconds
    if args.humaneval:
        p1, seconds = lm_eval_humaneval(hf, humaneval, he_items)
        row["humaneval_pass1"], row["humaneval_items_s"] = p1, len(he_items) / seconds
    rows["lm-eval hf"] = row
    print("lm-eval hf", row, flush=True)

    base = rows["lm-eval hf"]
    print(f"\n{'':18} {'MMLU acc':>9} {'items/s':>8} {'ratio':>6}   {'HumanEval':>9} {'items/s':>8} {'ratio':>6}")
    for name, r in rows.items():
        cells = []
        for acc, speed in (("mmlu_acc", "mmlu_items_s"), ("humaneval_pass1", "humaneval_items_s")):
            if acc in r:
                cells.append(f"{r[acc]:>9.4f} {r[speed]:>8.3f} {r[speed] / base[speed]:>5.2f}x")
            else:
                cells.append(f"{'-':>9} {'-':>8} {'-':>6}")
        print(f"{name:18} " + "   ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": str(path), "mmlu": args.mmlu, "humaneval": args.humaneval,
                       "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
