"""`herd eval`: score models on a task — perplexity, multiple choice, generation, code."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import HerdError


def cmd_eval(args) -> int:
    """Evaluate one or more models on a task and print a table, one column per model.

    TASK is a built-in (mmlu, mmlu:<subject>, humaneval, ko_mc) or a JSONL file of your own (see
    llamaherd.eval.tasks for the format: perplexity, mc, generate, code, guard and insecure_code
    kinds) or a .txt file (perplexity). Code runs in a sandbox (Linux namespaces: no network, read-only file system,
    resource limits). --out writes every per-item result as JSON."""
    from ..eval import run
    from ..eval.tasks import load_task
    from .common import resolve_model

    task = load_task(args.task)  # a bad task is reported before any model is loaded
    if args.out and Path(args.out).is_dir():
        raise HerdError(f"--out {args.out} is a directory")
    paths, names = [], []
    for name in args.models:
        paths.append(resolve_model(name).path)
        names.append(name)
    report = run(paths, task, limit=args.limit, shots=args.shots, template=args.template, n=args.n,
                 k=args.k, temperature=args.temperature, seed=args.seed, window=args.window,
                 stride=args.stride, names=names, quantized=False if args.reference else None,
                 guard=args.guard)
    print_report(report)
    if args.out:
        try:
            Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise HerdError(f"cannot write {args.out}: {e.strerror}") from None
    return 0


def print_report(report: dict) -> None:
    """The metrics as a table: a row per metric, a column per model."""
    from .common import print_table

    names = report["models"]
    keys = [k for k, v in report["results"][names[0]]["metrics"].items() if isinstance(v, (int, float))]
    rows = [("METRIC", *names)]
    for key in keys:
        rows.append((key, *(_fmt(report["results"][n]["metrics"][key]) for n in names)))
    rows.append(("items/s", *(_fmt(report["results"][n]["items_per_s"]) for n in names)))
    print(f"{report['task']} ({report['kind']}, {report['config']['items']} items"
          f"{', %d-shot' % report['config']['shots'] if report['config']['shots'] else ''}"
          f", {report['config']['template']})")
    print_table(rows)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return "nan" if math.isnan(x) else f"{x:.4f}"


def register(sub, local) -> None:
    p = sub.add_parser("eval", help="evaluate models on a task (perplexity, multiple choice, generation, code)",
                       description=cmd_eval.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help="model names, .gguf files or checkpoint directories")
    p.add_argument("--task", required=True, help="mmlu, mmlu:<subject>, humaneval, ko_mc, a .jsonl/.txt file, or MMLU in its CSV layout (a directory or a .csv)")
    p.add_argument("--limit", type=int, help="evaluate N items (evenly spaced over the task)")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples before each question (default 0)")
    p.add_argument("--template", choices=("raw", "chat"), help="prompt as raw text or through the chat template")
    p.add_argument("-n", type=int, default=1, help="samples per code problem (default 1)")
    p.add_argument("-k", type=int, nargs="+", default=[1, 10, 100], help="pass@k to report, k <= n")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0 for n=1, 0.8 otherwise)")
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.add_argument("--window", type=int, help="perplexity: tokens per window (default min(2048, context))")
    p.add_argument("--stride", type=int, help="perplexity: tokens scored per window (default window/2)")
    p.add_argument("--guard", help="guard tasks: the guard model that judges the replies (e.g. llama-guard3:1b)")
    p.add_argument("--reference", action="store_true", help="use float weights (the reference path), not 4/8-bit")
    p.add_argument("--out", help="write the full results (every item) as JSON here")
    p.set_defaults(func=cmd_eval)
