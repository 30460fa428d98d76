"""The offline demonstration guard: turn the labelled set in `examples/guard-demo/` into chat data for
`herd train sft` (the guard prompt as the user turn, the verdict as the assistant's), and score a
model on the held-out split.

    python -m llamaherd.safety.demo build examples/guard-demo
    python -m llamaherd.safety.demo evaluate MODEL examples/guard-demo/labelled.jsonl

The prompt is the "chat" protocol of `llama_guard` (the Llama Guard 3 text as a user message in the
model's own template), which is what `GuardClassifier` sends to a model that is not a Llama Guard;
so a model trained on `train.jsonl` is used as it is by `herd guard` and HERD_GUARD.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import HerdError
from .llama_guard import default_policy, prompt_body


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": row["prompt"]}]
    if row.get("role") == "agent":
        turns.append({"role": "assistant", "content": row["response"]})
    return turns


def answer(row: dict[str, Any]) -> str:
    return "safe" if row["label"] == "safe" else "unsafe\n" + ",".join(row["categories"])


def read_labelled(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("label") not in ("safe", "unsafe") or (row["label"] == "unsafe") != bool(row.get("categories")):
            raise HerdError(f"{path} line {n}: a row needs label safe (no categories) or unsafe (categories)")
        if row.get("role") == "agent" and not row.get("response"):
            raise HerdError(f"{path} line {n}: an agent row needs a response")
        rows.append(row)
    return rows


def build(folder: str | Path) -> dict[str, int]:
    """Write train.jsonl and test.jsonl (SFT chat records) next to labelled.jsonl; returns counts."""
    folder = Path(folder)
    policy = default_policy("chat")
    counts = {"train": 0, "test": 0}
    outs = {split: open(folder / f"{split}.jsonl", "w", encoding="utf-8") for split in counts}
    try:
        for row in read_labelled(folder / "labelled.jsonl"):
            conv = conversation(row)
            role = "agent" if row["role"] == "agent" else "user"
            record = {"messages": [{"role": "user", "content": prompt_body(conv, policy, role)},
                                   {"role": "assistant", "content": answer(row)}],
                      "id": row["id"], "lang": row["lang"], "label": row["label"], "categories": row["categories"]}
            outs[row["split"]].write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[row["split"]] += 1
    finally:
        for f in outs.values():
            f.close()
    return counts


def metrics(truth: list[bool], predicted: list[bool]) -> dict[str, float]:
    """Precision, recall and F1 of the unsafe class."""
    tp = sum(t and p for t, p in zip(truth, predicted))
    fp = sum(p and not t for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "n": len(truth)}


def evaluate(model: str, test_file: str | Path, threshold: float = 0.5) -> dict[str, Any]:
    """Classify the held-out rows (labelled.jsonl rows with split test, or a built test.jsonl).

    Returns:
        `fail_closed`: precision, recall and F1 of the unsafe class with an answer outside the
        protocol counted as unsafe (the server's default); `by_score`: the same decided by the unsafe
        score alone (on_malformed="score"); `malformed`: how many answers were outside the protocol.
    """
    import asyncio

    from .classify import guard_async

    rows = [r for r in read_labelled(Path(test_file)) if r.get("split", "test") == "test"]
    if not rows:
        raise HerdError(f"{test_file}: no rows with split test")
    # Each conversation is assessed for its last message: the user's prompt, or the agent's reply.
    verdicts = asyncio.run(guard_async(model, [conversation(r) for r in rows], threshold=threshold,
                                       on_malformed="unsafe"))
    truth = [r["label"] == "unsafe" for r in rows]
    return {"fail_closed": metrics(truth, [v.flagged for v in verdicts]),
            "by_score": metrics(truth, [v.score >= threshold for v in verdicts]),
            "malformed": sum(v.malformed for v in verdicts),
            "answers": [{"id": r["id"], "label": r["label"], "flagged": v.flagged, "score": round(v.score, 4),
                         "categories": v.categories, "malformed": v.malformed} for r, v in zip(rows, verdicts)]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "build":
        print(json.dumps(build(argv[1])))
        return 0
    if len(argv) == 3 and argv[0] == "evaluate":
        print(json.dumps(evaluate(argv[1], argv[2]), ensure_ascii=False))
        return 0
    print("usage: python -m llamaherd.safety.demo build FOLDER | evaluate MODEL LABELLED.jsonl", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
