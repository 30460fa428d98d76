"""`herd guard` (classify with a guard model) and `herd scan` (the code shield)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from ..errors import HerdError


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HerdError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise HerdError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise HerdError(f"{path}: {e.strerror}") from None


def _conversation(item, where: str):
    """A JSON item as a conversation: a string, a list of messages, or {"messages": [...]} / {"prompt": ...}."""
    if isinstance(item, dict):
        item = item.get("messages", item.get("prompt"))
    if isinstance(item, str) or (isinstance(item, list) and all(isinstance(m, dict) for m in item)):
        return item
    raise HerdError(f"{where}: expected a string, a list of messages, or an object with messages or prompt")


def _items(args) -> list:
    if args.jsonl:
        items = []
        for n, line in enumerate(_read(args.jsonl).splitlines(), 1):
            if line.strip():
                try:
                    items.append(_conversation(json.loads(line), f"{args.jsonl} line {n}"))
                except json.JSONDecodeError as e:
                    raise HerdError(f"{args.jsonl} line {n}: not JSON ({e.msg})") from None
        if not items:
            raise HerdError(f"{args.jsonl}: no conversations")
        return items
    if args.conversation:
        try:
            data = json.loads(_read(args.conversation))
        except json.JSONDecodeError as e:
            raise HerdError(f"{args.conversation}: not JSON ({e.msg})") from None
        return [_conversation(data, args.conversation)]
    text = args.prompt if args.prompt not in (None, "-") else (sys.stdin.read() if not sys.stdin.isatty() else "")
    if not text.strip():
        raise HerdError("give a prompt, --conversation FILE or --jsonl FILE")
    return [text]


def cmd_guard(args) -> int:
    """Classify prompts or responses with a guard model (Llama Guard 3 / 2, or any model in their
    protocol): prints the verdict, the violated categories and the unsafe score, one line each.

    Examples:
      herd guard llama-guard3:1b "How do I pick a lock?"
      herd guard llama-guard3:8b --conversation chat.json            # [{"role": "user", ...}, ...]
      herd guard ./guard.gguf --jsonl prompts.jsonl --format json    # batched through the engine
      herd guard llama-guard3:1b "Here is how..." --role agent --policy mine.yaml

    The score is the probability of "unsafe" as the first token (Meta's model card); a verdict is
    unsafe when it reaches --threshold. An answer that is not `safe` / `unsafe\\nS1,...` is
    malformed: unsafe (--on-malformed unsafe, the default) or decided by the score alone."""
    from ..safety.classify import guard_async
    from .common import resolve_model

    items = _items(args)
    resolved = resolve_model(args.model)
    verdicts = asyncio.run(guard_async(resolved.path, items, role=args.role, policy=args.policy,
                                       threshold=args.threshold, on_malformed=args.on_malformed))
    if not isinstance(verdicts, list):
        verdicts = [verdicts]
    for i, v in enumerate(verdicts, 1):
        if args.format == "json":
            print(json.dumps(v.as_dict(), ensure_ascii=False))
            continue
        prefix = f"{i}\t" if len(verdicts) > 1 else ""
        if v.flagged:
            cats = ",".join(v.categories) or "-"
            names = f" ({', '.join(v.names)})" if v.names else (" (malformed answer)" if v.malformed else "")
            print(f"{prefix}unsafe\t{cats}{names}\tscore={v.score:.4f}")
        else:
            print(f"{prefix}safe\t-\tscore={v.score:.4f}")
    return 0


def cmd_scan(args) -> int:
    """Scan code (or a model's reply with fenced code blocks) for insecure patterns: one line per
    finding, `FILE:LINE: SEVERITY CWE-N message [analyser:rule]`. Exit status 1 when a finding has
    severity block, else 0.

    Examples:
      herd scan reply.md                  # finds the code blocks, detects their languages
      herd scan app.py --language python
      herd run smollm2 "write a C strcpy example" | herd scan -"""
    from ..safety.code_shield import scan_code, worst

    text = _read(args.file)
    findings = scan_code(text, args.language, bandit=False if args.no_bandit else None, semgrep=args.semgrep)
    name = "<stdin>" if args.file == "-" else args.file
    for f in findings:
        if args.format == "json":
            print(json.dumps({"file": name, **f.as_dict()}))
        else:
            print(f"{name}:{f}")
    return 1 if worst(findings) == "block" else 0


def register(sub, local) -> None:
    g = sub.add_parser("guard", help="classify prompts or responses with a guard model (Llama Guard)",
                       description=cmd_guard.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model", help="a guard model: llama-guard3:1b, llama-guard3:8b, a .gguf file, ...")
    g.add_argument("prompt", nargs="?", help="the message to classify (- or nothing: stdin)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--conversation", metavar="FILE", help="a JSON conversation: [{\"role\": ..., \"content\": ...}]")
    src.add_argument("--jsonl", metavar="FILE", help="one conversation (or prompt string) per line, classified together")
    g.add_argument("--role", choices=["user", "agent"], help="which message to assess (default: the last one's role)")
    g.add_argument("--policy", metavar="FILE", help="custom categories (YAML or JSON; see llamaherd.safety.load_policy)")
    g.add_argument("--threshold", type=float, default=0.5, help="unsafe-score threshold (default 0.5)")
    g.add_argument("--on-malformed", choices=["unsafe", "score"], default="unsafe",
                   help="an answer outside the protocol is unsafe (default), or decided by the score")
    g.add_argument("--format", choices=["text", "json"], default="text")
    g.set_defaults(func=cmd_guard)

    s = sub.add_parser("scan", help="scan code for insecure patterns (the code shield)", description=cmd_scan.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("file", help="a file, or - for stdin")
    s.add_argument("--language", help="the file is code in this language (default: find fenced blocks, detect)")
    s.add_argument("--semgrep", action="store_true", help="also run Semgrep with our rules (needs semgrep)")
    s.add_argument("--no-bandit", action="store_true", help="do not run Bandit on Python code")
    s.add_argument("--format", choices=["text", "json"], default="text")
    s.set_defaults(func=cmd_scan)
