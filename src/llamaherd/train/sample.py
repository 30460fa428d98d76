"""Rejection sampling: K replies per prompt from the policy, scored, the best kept as SFT data.

    policy = llamaherd.load("smollm2:135m")
    rows = rejection_sample(policy, prompts, load_reward_model("runs/rm").score, k=8,
                            temperature=0.8, top_p=0.95)   # [{"messages": [...], "score": 1.7, ...}]

As the Llama 3 paper does it (section 4.2.2): for each prompt, K samples from the current policy;
a reward model scores them; the best (here optionally the top quartile) becomes fine-tuning data.

The samples run through the server's batch loop (`engine.scheduler`), many prompts at once. The
K samples of one prompt share its prefill: the prompt is computed once and its keys and values
copied into the other K - 1 rows (`Scheduler.submit(job, forks=...)`), each sample then drawing
with its own seed. (The paper reports over 2x from this on long prompts.)

Sampling is plain: temperature and top-p over the whole vocabulary, no top-k, no repeat penalty
(`options` overrides any of Ollama's options). With a `seed`, every sample has its own seed drawn
from it, so a run is reproducible. A round's `system` prompt steers the samples (prompts with a
system message of their own keep theirs) but is not written to the output nor shown to the
scorer: the fine-tuned model should learn to answer that way without being told.
"""

from __future__ import annotations

import json
import math
import queue
import random
from contextlib import closing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HerdError
from .data import read_records

KEEPS = ("best", "top_quartile")
Messages = list[dict[str, Any]]


@dataclass
class Sample:
    """One reply of the policy to a prompt."""

    text: str
    tokens: list[int]
    done_reason: str  # "stop" (end of turn) or "length" (max_tokens or the context was reached)


# -- prompts ------------------------------------------------------------------------------------

def prompt_messages(record: Any) -> Messages:
    """The prompt a JSONL record stands for: `{"messages": [...]}` (a last assistant message, a
    reference reply, is dropped, so SFT data can be used as prompts) or `{"prompt": "..."}`.

    Raises:
        HerdError: a malformed record (one line saying what is wrong).
    """
    if not isinstance(record, dict):
        raise HerdError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise HerdError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise HerdError(f"messages[{i}] must be an object with a 'role' and a string 'content'")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise HerdError("the prompt must end with a user message")
        return messages
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise HerdError("'prompt' must be a non-empty string")
        return [{"role": "user", "content": record["prompt"]}]
    raise HerdError("expected a 'messages' list or a 'prompt' string "
                    f"(keys found: {', '.join(sorted(record)) or 'none'})")


def read_prompts(path: str | Path) -> list[Messages]:
    """The prompts of a JSONL file (blank lines skipped; see `prompt_messages`).

    Raises:
        HerdError: the file is missing or holds no prompt, or a line is malformed (FILE:LINE).
    """
    return read_records(path, prompt_messages, "prompts", kind="prompts file")


def _as_messages(prompt: str | Sequence[dict[str, Any]]) -> Messages:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt_messages({"messages": list(prompt)})


# -- sampling -----------------------------------------------------------------------------------

def generate_samples(policy, prompts: Sequence[Messages], k: int, options: dict[str, Any], *,
                     seed: int | None = 0, parallel: int = 16, progress: bool = False,
                     share_prefill: bool = True) -> Iterator[tuple[int, list[Sample]]]:
    """K replies to each prompt, through one batch loop over `policy`'s model; yields
    (prompt index, its K samples) as each prompt's samples are all done (not in order).

    Args:
        policy: a `llamaherd.llm.Llama`. Its own one-row loop is closed: this one takes the model.
        prompts: the conversations to answer (each ending with a user message).
        k: samples per prompt; they share the prompt's prefill.
        options: sampling options (Ollama's names: temperature, top_p, num_predict...).
        seed: each sample's seed is drawn from it; None: fresh entropy.
        parallel: KV-cache rows, samples decoded together (at least k).
        progress: show a tqdm bar (samples/s).
        share_prefill: compute each prompt once for its k samples (off: k prefills, to measure).
    """
    from tqdm import tqdm

    from ..engine.scheduler import Job, Scheduler
    from ..engine.types import Done

    if k < 1:
        raise HerdError(f"k must be at least 1 (got {k})")
    rng = random.Random(seed)
    events: queue.SimpleQueue = queue.SimpleQueue()
    groups = []
    for i, messages in enumerate(prompts):
        ids = policy.encode_chat(messages)
        jobs = []
        for j in range(k):
            opts = policy.options({**options, "seed": None if seed is None else rng.getrandbits(63)})
            emit = lambda event, at=(i, j): events.put((at, event))  # noqa: E731
            try:
                jobs.append(Job(ids, opts, policy.tokenizer.stop_ids, policy.tokenizer, emit))
            except HerdError as e:
                raise HerdError(f"prompt {i + 1}: {e}") from None
        groups.append(jobs)

    policy.close()  # its one-row loop would share the runner
    loop = Scheduler(policy.runner, n_rows=max(parallel, k), max_ctx=policy.args.max_seq_len, name="sample")
    texts = [[[] for _ in range(k)] for _ in prompts]
    done: list[list[Sample | None]] = [[None] * k for _ in prompts]
    left = [k] * len(prompts)
    bar = tqdm(total=k * len(prompts), unit="sample", desc="sampling", disable=not progress, dynamic_ncols=True)
    try:
        for jobs in groups:
            if share_prefill:
                loop.submit(jobs[0], forks=jobs[1:])
            else:
                for job in jobs:
                    loop.submit(job)
        for _ in range(k * len(prompts)):
            while True:
                (i, j), event = events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Done):
                    break
                texts[i][j].append(event.text)
            done[i][j] = Sample("".join(texts[i][j]), groups[i][j].generated, event.reason)
            bar.update(1)
            left[i] -= 1
            if not left[i]:
                yield i, done[i]
    finally:
        bar.close()
        for jobs in groups:
            for job in jobs:
                loop.cancel(job)
        loop.close()


def select(scores: Sequence[float], keep: str) -> list[int]:
    """Which samples to keep, best first: the argmax ("best") or the best ceil(K / 4)
    ("top_quartile"); ties go to the earlier sample."""
    n = 1 if keep == "best" else math.ceil(len(scores) / 4)
    return sorted(range(len(scores)), key=lambda j: -scores[j])[:n]


def rejection_sample(policy, prompts: Sequence[str | Sequence[dict[str, Any]]],
                     scorer: Callable[[list[Messages]], Sequence[float]], k: int, temperature: float = 0.8,
                     top_p: float = 0.9, system: str | None = None, keep: str = "best", *,
                     max_tokens: int = 256, seed: int | None = 0, parallel: int = 16,
                     options: dict[str, Any] | None = None, progress: bool = False,
                     on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Rejection sampling: K samples per prompt, scored; the best kept as SFT rows.

    Args:
        policy: the model to sample from (a `llamaherd.llm.Llama`).
        prompts: conversations ending with a user message (or plain strings: one user message).
        scorer: conversations (prompt + the reply as an assistant message) -> one score each, higher
            better (e.g. `llamaherd.train.reward.load_reward_model(path).score`).
        k: samples per prompt (>= 1).
        temperature, top_p: the sampling; 0 is greedy.
        system: a system prompt for this round, steering the samples (not written; see the module).
        keep: "best" (one row per prompt) or "top_quartile" (the best ceil(K / 4) of each prompt).
        max_tokens: the longest reply, in tokens.
        seed: the samples' seeds are drawn from it (None: fresh entropy).
        parallel: samples decoded together (KV-cache rows; at least k).
        options: more of Ollama's sampling options (top_k, repeat_penalty, ...; default off).
        progress: show a progress bar with samples/s.
        on_rows: called with each prompt's kept rows as soon as they are scored (so that an
            interrupted run keeps what it has).
    Returns:
        SFT JSONL rows in prompt order: {"messages": prompt + reply, "score", "prompt" (its index),
        "sample" (which of the K), "done_reason"}.
    """
    if keep not in KEEPS:
        raise HerdError(f"keep must be one of {', '.join(KEEPS)} (got {keep!r})")
    if k < 1:
        raise HerdError(f"k must be at least 1 (got {k})")
    if not prompts:
        raise HerdError("no prompts to sample")
    conversations = [_as_messages(p) for p in prompts]
    steered = [c if not system or c[0]["role"] == "system" else [{"role": "system", "content": system}, *c]
               for c in conversations]
    opts = {"top_k": 0, "repeat_penalty": 1.0, **(options or {}), "temperature": temperature, "top_p": top_p,
            "num_predict": max_tokens}
    rows: list[list[dict[str, Any]]] = [[] for _ in prompts]
    with closing(generate_samples(policy, steered, k, opts, seed=seed, parallel=parallel, progress=progress)) as done:
        for i, samples in done:
            replies = [conversations[i] + [{"role": "assistant", "content": s.text}] for s in samples]
            scores = _scores(scorer, replies)
            rows[i] = [{"messages": replies[j], "score": scores[j], "prompt": i, "sample": j,
                        "done_reason": samples[j].done_reason} for j in select(scores, keep)]
            if on_rows is not None:
                on_rows(rows[i])
    return [row for prompt_rows in rows for row in prompt_rows]


def _scores(scorer, conversations: list[Messages]) -> list[float]:
    scores = list(scorer(conversations))
    if len(scores) != len(conversations):
        raise HerdError(f"the scorer gave {len(scores)} scores for {len(conversations)} replies")
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise HerdError(f"the scorer gave something other than numbers: {scores[:4]!r}") from None
    if not all(math.isfinite(s) for s in scores):
        raise HerdError(f"the scorer gave a score that is not a finite number: {scores}")
    return scores


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write SFT rows as JSONL (UTF-8, one object a line); the folder is made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
