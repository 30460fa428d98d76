"""Greedy replies of two models to the held-out questions, side by side as a Markdown table.

    python examples/korean-chat/compare.py smollm2:135m runs/smollm2-korean-f16.gguf [-n 6]

Each model is a name in the store (its model file; adapters are not applied), a .gguf file or a
checkpoint directory. The questions are the first user turns of heldout.jsonl, taken evenly over the file.
"""

import argparse
import json
from pathlib import Path

import llamaherd
from llamaherd.resolve import resolve_model

HERE = Path(__file__).resolve().parent


def questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in (HERE / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    users = [r["prompt"] if "prompt" in r else next(m["content"] for m in r["messages"] if m["role"] == "user")
             for r in rows]
    return [users[i * len(users) // n] for i in range(n)]


def replies(model: str, asked: list[str], num_predict: int) -> list[str]:
    llm = llamaherd.load(resolve_model(model).path, device="cpu")
    return ["".join(llm.chat([{"role": "user", "content": q}], temperature=0, num_predict=num_predict)).strip()
            for q in asked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("-n", type=int, default=6, help="questions [6]")
    parser.add_argument("--num-predict", type=int, default=48, help="tokens per reply at most [48]")
    args = parser.parse_args()
    asked = questions(args.n)
    before = replies(args.before, asked, args.num_predict)
    after = replies(args.after, asked, args.num_predict)
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    print("| question | before | after |\n|---|---|---|")
    for row in zip(asked, before, after):
        print("| " + " | ".join(cell(s) for s in row) + " |")


if __name__ == "__main__":
    main()
