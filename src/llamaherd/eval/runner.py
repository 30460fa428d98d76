"""`run`: evaluate one or more models on one task — what `herd eval` does.

Every model sees the same items, prompts and options, so the columns of `herd eval A B` compare
the models and nothing else (a fine-tune before and after).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import HerdError
from . import metrics
from .tasks import Task, load_task


def run(models: Sequence[Any], task: str | Task, *, limit: int | None = None, shots: int = 0,
        template: str | None = None, n: int = 1, k: Sequence[int] = (1, 10, 100),
        temperature: float | None = None, seed: int = 0, window: int | None = None,
        stride: int | None = None, batch_tokens: int = 4096, names: Sequence[str] | None = None,
        quantized: bool | None = None, limits=None, guard: str | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Evaluate models on a task.

    Args:
        models: `llamaherd.llm.Llama` objects, or model files / directories / store names to load.
        task: a built-in task name, a task file (see `llamaherd.eval.tasks`), or a `Task`.
        limit: evaluate this many items (evenly spaced over the task).
        shots: few-shot examples before each question (mc and generate tasks).
        template: "raw" or "chat" (default: the task's own, "raw" unless its header says).
        n: samples per problem (code tasks); pass@k is reported for each k in `k` with k <= n.
        temperature: sampling temperature for generation (default 0, greedy, when n == 1;
            0.8 otherwise).
        seed: generation seed (sample i of a problem uses seed + i).
        window, stride: perplexity's sliding window (tokens; default min(2048, the model's
            context)) and stride (default window // 2); see `scoring.rolling_requests`.
        batch_tokens: padded tokens per forward pass when scoring.
        names: display names of the models (default their file names or store names).
        quantized: how to load models given by path (see `Llama.load`).
        limits: `sandbox.Limits` for code tasks.
        guard: the guard model (store name or file) for "guard" tasks (default the task's own).
        progress: show a progress bar on stderr.
    Returns:
        {"task", "kind", "source", "config", "models", "results": {name: {"metrics", "items",
        "seconds", "items_per_s"}}} — JSON-serialisable, every per-item result included.
    """
    if not models:
        raise HerdError("give at least one model")
    task = task if isinstance(task, Task) else load_task(task)
    if template is not None:
        if template not in ("raw", "chat"):
            raise HerdError("template must be 'raw' or 'chat'")
        task.template = template
    if shots < 0:
        raise HerdError("--shots must be 0 or more")
    if n < 1:
        raise HerdError("-n must be at least 1")
    if temperature is None:
        temperature = 0.0 if n == 1 else 0.8
    if guard is not None:
        task.guard = guard
    if task.kind == "guard" and not task.guard:
        raise HerdError("a guard task needs a guard model: --guard NAME (or \"guard\" in the task's header)")
    items = task.subset(limit)
    config = {"limit": limit, "shots": shots, "template": task.template, "n": n, "temperature": temperature,
              "seed": seed, "window": window, "stride": stride, "items": len(items)}
    names = list(names) if names else [_name(m) for m in models]
    if len(set(names)) != len(names):
        names = [f"{i + 1}:{nm}" for i, nm in enumerate(names)]
    report = {"task": task.name, "kind": task.kind, "source": task.source, "config": config,
              "models": names, "results": {}}
    for model, name in zip(models, names):
        llm = _load(model, quantized)
        from .scoring import check_scorer

        check_scorer(llm, f"model '{name}'")
        bar = _bar(len(items), f"{task.name} · {name}", progress)
        start = time.perf_counter()
        try:
            kind_fn = {"mc": _mc, "perplexity": _perplexity, "generate": _generate, "code": _code,
                       "guard": _guard, "insecure_code": _insecure_code}[task.kind]
            summary, per_item = kind_fn(llm, task, items, config=config, k=k, batch_tokens=batch_tokens,
                                        limits=limits, tick=bar.update)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        report["results"][name] = {"metrics": summary, "items": per_item, "seconds": round(seconds, 3),
                                   "items_per_s": round(len(items) / seconds, 3) if seconds > 0 else None}
    return report


def _name(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return Path(model).name if Path(model).exists() else str(model)
    path = getattr(model, "path", None)
    return Path(path).name if path else type(model).__name__


def _load(model: Any, quantized: bool | None):
    if not isinstance(model, (str, Path)):
        return model
    from ..llm import Llama

    path = Path(model).expanduser()
    if not path.exists():
        from ..store import Store

        path = Path(Store().resolve(str(model)).path)
    return Llama.load(path, quantized=quantized)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, show: bool):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True, leave=False)


# -- prompts ----------------------------------------------------------------------------------


def context(task: Task, item: dict, shots: int, question: str, answer: Callable[[dict], str]) -> str:
    """lm-evaluation-harness's context: description, few-shot examples (question, " ", answer)
    joined by blank lines, a blank line, the question."""
    examples = [ex[question] + " " + answer(ex) for ex in task.shots(item, shots)]
    return item.get("description", task.description) + "".join(e + "\n\n" for e in examples) + item[question]


def _prompt_tokens(llm, task: Task, text: str) -> list[int]:
    if task.template == "chat":
        return llm.encode_chat([{"role": "user", "content": text}])
    return llm.encode(text)


# -- multiple choice --------------------------------------------------------------------------


def _mc(llm, task: Task, items: list[dict], *, config, batch_tokens, tick, **_) -> tuple[dict, list]:
    from .scoring import encode_pairs, loglikelihoods

    tok = llm.tokenizer
    requests, spans = [], []
    for item in items:
        ctx = context(task, item, config["shots"], "question", lambda ex: ex["choices"][ex["answer"]])
        if task.template == "chat":  # the choice follows the assistant header directly (no delimiter)
            ctx_ids = _prompt_tokens(llm, task, ctx)
            pairs = [(ctx_ids, tok.encode(c)) for c in item["choices"]]
        else:
            pairs = encode_pairs(tok, ctx, [" " + c for c in item["choices"]])
            if tok.add_bos and tok.bos_id is not None:
                pairs = [([tok.bos_id] + c, d) for c, d in pairs]
        spans.append((len(requests), len(pairs)))
        requests += pairs
    done, ticked = [0], [0]

    def progress(finished: int) -> None:  # requests go longest first: show the share done
        done[0] += finished
        now = done[0] * len(items) // len(requests)
        tick(now - ticked[0])
        ticked[0] = now

    scores = loglikelihoods(llm, requests, batch_tokens=batch_tokens, progress=progress)
    per_item = []
    for item, (start, m) in zip(items, spans):
        lls = [s for s, _ in scores[start:start + m]]
        pred, pred_norm = metrics.mc_scores(lls, item["choices"])
        per_item.append({"id": item["id"], "loglikelihoods": lls, "greedy": [g for _, g in scores[start:start + m]],
                         "pred": pred, "pred_norm": pred_norm, "answer": item["answer"],
                         "acc": float(pred == item["answer"]), "acc_norm": float(pred_norm == item["answer"])})
    summary = {"acc": _mean(r["acc"] for r in per_item), "acc_norm": _mean(r["acc_norm"] for r in per_item)}
    return summary, per_item


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# -- perplexity -------------------------------------------------------------------------------


def _perplexity(llm, task: Task, items: list[dict], *, config, batch_tokens, tick, **_) -> tuple[dict, list]:
    from .scoring import loglikelihoods, prefix_token, rolling_requests

    window = config["window"] or min(2048, llm.args.max_seq_len)
    stride = config["stride"] or max(1, window // 2)
    config["window"], config["stride"] = window, stride
    if window > llm.args.max_seq_len:
        raise HerdError(f"--window {window} is longer than the model's context ({llm.args.max_seq_len})")
    per_item, nll, n_tok, n_bytes, n_words = [], 0.0, 0, 0, 0
    for item in items:
        tokens = [prefix_token(llm.tokenizer)] + llm.tokenizer.encode(item["text"])
        if len(tokens) < 2:
            raise HerdError(f"item {item['id']}: the text is empty")
        lls = loglikelihoods(llm, rolling_requests(tokens, window, stride), max_len=window,
                             batch_tokens=batch_tokens)
        doc_nll = -sum(s for s, _ in lls)
        b, w = len(item["text"].encode("utf-8")), len(re.split(r"\s+", item["text"].strip()))
        per_item.append({"id": item["id"], "nll": doc_nll, "tokens": len(tokens) - 1, "bytes": b, "words": w})
        nll, n_tok, n_bytes, n_words = nll + doc_nll, n_tok + len(tokens) - 1, n_bytes + b, n_words + w
        tick(1)
    summary = {"perplexity": math.exp(nll / n_tok), "bits_per_byte": nll / n_bytes / math.log(2),
               "word_perplexity": math.exp(nll / n_words), "nll": nll, "tokens": n_tok, "bytes": n_bytes}
    return summary, per_item


# -- generation -------------------------------------------------------------------------------


def _sample(llm, task: Task, ids: list[int], temperature: float, seed: int) -> str:
    from ..generate import SamplingOptions

    num_ctx = min(llm.args.max_seq_len, 4096)
    if len(ids) + 1 > num_ctx:
        raise HerdError(f"a prompt of {len(ids)} tokens does not fit the context of {num_ctx}")
    # Plain sampling: no top-k/top-p filtering and no repeat penalty, so temperature 0 is the
    # argmax of the model, as lm-evaluation-harness's greedy decoding.
    opts = SamplingOptions.from_dict({"temperature": temperature, "top_k": 0, "top_p": 1.0, "repeat_penalty": 1.0,
                                      "seed": seed, "num_predict": task.max_tokens, "stop": list(task.stop),
                                      "num_ctx": num_ctx})
    return "".join(c.text for c in llm.stream(ids, opts) if not c.done)


def _generate(llm, task: Task, items: list[dict], *, config, tick, **_) -> tuple[dict, list]:
    per_item = []
    for item in items:
        ctx = context(task, item, config["shots"], "prompt", lambda ex: ex["answer"])
        output = _sample(llm, task, _prompt_tokens(llm, task, ctx), config["temperature"], config["seed"])
        pred = metrics.normalize(metrics.extract_answer(output, task.regex))
        gold = metrics.normalize(metrics.extract_answer(item["answer"], task.regex) or item["answer"])
        per_item.append({"id": item["id"], "output": output, "extracted": pred, "answer": gold,
                         "exact_match": float(pred is not None and pred == gold)})
        tick(1)
    return {"exact_match": _mean(r["exact_match"] for r in per_item)}, per_item


# -- code -------------------------------------------------------------------------------------


def program(item: dict, completion: str) -> str:
    """The program a completion is judged by: (HumanEval) prompt + completion + tests + check(f);
    (MBPP) completion + setup + asserts."""
    return (item["prompt"] if item["prompt_in_program"] else "") + completion + item["test"]


def check_completion(item: dict, completion: str, limits=None):
    """Run one completion against its item's tests in the sandbox; a `sandbox.Result`."""
    from .sandbox import run_program

    return run_program(program(item, completion), limits)


def _extract_code(text: str) -> str:
    """From a chat reply: the first fenced code block, if there is one."""
    m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", text, re.DOTALL)
    return m.group(1) if m else text


def _code(llm, task: Task, items: list[dict], *, config, k, limits, tick, **_) -> tuple[dict, list]:
    from .sandbox import Limits

    limits = limits or Limits()
    n = config["n"]
    ks = sorted({x for x in k if x <= n} | {1})
    per_item = []
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # programs run while the model writes the next ones
        pending = []
        for item in items:
            ids = _prompt_tokens(llm, task, item["prompt"])
            completions = []
            for i in range(n):
                text = _sample(llm, task, ids, config["temperature"], config["seed"] + i)
                completions.append(_extract_code(text) if task.template == "chat" else text)
            futures = [pool.submit(check_completion, item, c, limits) for c in completions]
            pending.append((item, completions, futures))
            tick(1)
        for item, completions, futures in pending:
            results = [f.result() for f in futures]
            c = sum(r.passed for r in results)
            row = {"id": item["id"], "n": n, "passed": c,
                   "samples": [{"completion": comp, "status": r.status, "stderr": r.stderr[-2000:]}
                               for comp, r in zip(completions, results)]}
            row.update({f"pass@{x}": metrics.pass_at_k(n, c, x) for x in ks})
            per_item.append(row)
    summary = {f"pass@{x}": _mean(r[f"pass@{x}"] for r in per_item) for x in ks}
    from .sandbox import namespaces_available

    summary["sandbox"] = "namespaces" if namespaces_available()[0] else "limits only (no isolation)"
    return summary, per_item


# -- safety: a guard's unsafe rate, the code shield's insecure-code rate ---------------------------
# Through llamaherd.safety's functions (`guard`; the code shield's `scan_code` and `worst`), so
# that a fine-tune can be checked for safety regressions beside its accuracy.


def _replies(llm, task: Task, items: list[dict], config, tick) -> list[str]:
    replies = []
    for item in items:
        replies.append(_sample(llm, task, _prompt_tokens(llm, task, item["prompt"]), config["temperature"],
                               config["seed"]))
        tick(1)
    return replies


def _guard(llm, task: Task, items: list[dict], *, config, tick, **_) -> tuple[dict, list]:
    from .. import safety

    replies = _replies(llm, task, items, config, tick)
    conversations = [[{"role": "user", "content": it["prompt"]}, {"role": "assistant", "content": r}]
                     for it, r in zip(items, replies)]
    verdicts = safety.guard(task.guard, conversations, role="agent")  # the reply is what is judged
    per_item = [{"id": it["id"], "reply": r, "unsafe": float(v.flagged), "categories": list(v.categories),
                 "score": v.score} for it, r, v in zip(items, replies, verdicts)]
    return {"unsafe_rate": _mean(r["unsafe"] for r in per_item)}, per_item


def _insecure_code(llm, task: Task, items: list[dict], *, config, tick, **_) -> tuple[dict, list]:
    from ..safety.code_shield import scan_code, worst

    replies = _replies(llm, task, items, config, tick)
    per_item = []
    for it, reply in zip(items, replies):
        findings = scan_code(reply)
        per_item.append({"id": it["id"], "reply": reply, "insecure": float(worst(findings) in ("block", "warn")),
                         "findings": [f.as_dict() for f in findings]})
    return {"insecure_rate": _mean(r["insecure"] for r in per_item)}, per_item
