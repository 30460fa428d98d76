"""herd eval vs lm-evaluation-harness's `hf` backend on the same SmolLM2 GGUF, one run.

    python benchmarks/bench_eval.py [--model FILE.gguf] [--mmlu 200] [--humaneval 164] [--threads 2]
                                    [--runtimes fast,reference,hf] [--chunk 20] [--json out.json]

  MMLU       an --mmlu question subset (evenly spaced over the 57 subjects, 0-shot, lm-eval's
             `mmlu` prompt), scored by log-likelihood: acc and items/s. lm-eval's `hf` backend gets
             the very (context, continuation) strings herd scores.
  HumanEval  the first --humaneval problems, n=1 greedy, up to 384 new tokens, Codex stop
             sequences: pass@1 and items/s. lm-eval's `hf` backend generates with
             `generate_until` from the same prompts; both completions are judged in herd's sandbox.
Rows: herd on the fast path (4-bit weights, the engine's kernels), herd on the float reference
path, lm-eval `hf` (transformers, float32, the same GGUF dequantized, batch size 8). The runtimes
take turns on chunks of --chunk items, so a change in the machine's load falls on all of them
alike; items/s is items over each runtime's own seconds, and the ratio is over lm-eval's. The
answers are compared item by item (MMLU: the predicted letter; HumanEval: pass or fail).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def herd_mmlu(llm, task, items) -> tuple[list[int], float]:
    """herd eval's multiple choice on `items`: the predicted choice of each, and the seconds."""
    from llamaherd.eval import run
    from llamaherd.eval.tasks import Task

    sub = Task(task.name, "mc", items, source=task.source)
    r = run([llm], sub, names=["m"], progress=False)["results"]["m"]
    return [it["pred"] for it in r["items"]], r["seconds"]


def hf_mmlu(hf, task, items) -> tuple[list[int], float]:
    """lm-eval's `hf` backend's log-likelihoods of the same strings; the prediction as lm-eval's acc."""
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
    return [metrics.mc_scores([ll for ll, _ in out[s:s + m]], it["choices"])[0]
            for it, (s, m) in zip(items, spans)], seconds


def herd_humaneval(llm, task, items) -> tuple[list[bool], float]:
    from llamaherd.eval import run
    from llamaherd.eval.tasks import Task

    sub = Task(task.name, "code", items, stop=task.stop, max_tokens=task.max_tokens, source=task.source)
    r = run([llm], sub, names=["m"], progress=False)["results"]["m"]
    return [it["passed"] > 0 for it in r["items"]], r["seconds"]


def hf_humaneval(hf, task, items) -> tuple[list[bool], float]:
    """lm-eval's `hf` generate_until, then herd's sandbox judges (its time is not counted, as
    herd's judging overlaps its generation)."""
    from lm_eval.api.instance import Instance

    from llamaherd.eval.runner import check_completion

    reqs = [Instance("generate_until", {}, (it["prompt"], {"until": task.stop, "max_gen_toks": task.max_tokens,
                                                            "do_sample": False}), i) for i, it in enumerate(items)]
    start = time.perf_counter()
    completions = hf.generate_until(reqs, disable_tqdm=True)
    seconds = time.perf_counter() - start
    return [check_completion(it, c).passed for it, c in zip(items, completions)], seconds


def main() -> None:
    import torch

    import llamaherd
    from llamaherd.eval.tasks import load_task
    from llamaherd.fetch import smollm2_gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF file (default SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--mmlu", type=int, default=200)
    ap.add_argument("--humaneval", type=int, default=164)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtimes", default="fast,reference,hf", help="which rows to run (comma-separated)")
    ap.add_argument("--chunk", type=int, default=20, help="items per turn of each runtime")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pathlib import Path

    path = Path(args.model) if args.model else smollm2_gguf()
    wanted = args.runtimes.split(",")
    runtimes = {}
    for name, quantized in (("fast", True), ("reference", False)):
        if name in wanted:
            runtimes[f"herd ({name})"] = ("herd", llamaherd.load(path, device="cpu", quantized=quantized))
    if "hf" in wanted:
        from lm_eval.models.huggingface import HFLM

        runtimes["lm-eval hf"] = ("hf", HFLM(pretrained=str(path.parent), gguf_file=path.name, dtype="float32",
                                              device="cpu", batch_size=8))
    load = [os.getloadavg()[0]]
    figures = {"model": str(path), "threads": args.threads, "chunk": args.chunk, "rows": {n: {} for n in runtimes}}
    benches = []
    if args.mmlu:
        mmlu = load_task("mmlu")
        benches.append(("mmlu", mmlu, mmlu.subset(args.mmlu), {"herd": herd_mmlu, "hf": hf_mmlu},
                        lambda item, pred: float(pred == item["answer"])))
    if args.humaneval:
        he = load_task("humaneval")
        benches.append(("humaneval", he, he.items[:args.humaneval], {"herd": herd_humaneval, "hf": hf_humaneval},
                        lambda item, passed: float(passed)))
    for bench, task, items, fns, score in benches:
        answers = {n: [] for n in runtimes}
        seconds = dict.fromkeys(runtimes, 0.0)
        for at in range(0, len(items), args.chunk):
            chunk = items[at:at + args.chunk]
            for name, (kind, obj) in runtimes.items():  # turns: the same load for every runtime
                got, s = fns[kind](obj, task, chunk)
                answers[name] += got
                seconds[name] += s
            load.append(os.getloadavg()[0])
            print(f"{bench} {at + len(chunk)}/{len(items)}: " + ", ".join(
                f"{n} {len(answers[n]) / seconds[n]:.3f}/s" for n in runtimes), flush=True)
        for name in runtimes:
            figures["rows"][name][bench] = {
                "items": len(items), "score": sum(score(it, a) for it, a in zip(items, answers[name])) / len(items),
                "seconds": round(seconds[name], 2), "items_per_s": len(items) / seconds[name], "answers": answers[name]}
    figures["load_avg_1min"] = {"min": min(load), "max": max(load)}

    base = figures["rows"].get("lm-eval hf", {})
    heads = {"mmlu": "MMLU acc", "humaneval": "pass@1"}
    print(f"\n{'':18} " + "   ".join(f"{heads[b]:>9} {'items/s':>8} {'ratio':>6} {'same':>5}" for b, *_ in benches))
    for name, row in figures["rows"].items():
        cells = []
        for bench, *_ in benches:
            r, b = row[bench], base.get(bench)
            ratio = f"{r['items_per_s'] / b['items_per_s']:>5.2f}x" if b else f"{'-':>6}"
            same = f"{sum(x == y for x, y in zip(r['answers'], b['answers'])):>5}" if b else f"{'-':>5}"
            cells.append(f"{r['score']:>9.4f} {r['items_per_s']:>8.3f} {ratio} {same}")
        print(f"{name:18} " + "   ".join(cells))
    print(f"load average (1 min) during the run: {load[0]:.1f} at the start, {min(load):.1f}-{max(load):.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
