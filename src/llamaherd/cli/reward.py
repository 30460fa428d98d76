"""Reward models: train one, score replies with one, and run a post-training round.

    herd train reward --model smollm2:135m --data prefs.jsonl --out runs/rm [--method full|lora] ...
    herd reward runs/rm --data replies.jsonl [--out scored.jsonl]
    herd train loop --config loop-smollm2 --out runs/round1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import HerdError
from .train import BOOLS, FLAGS, add_sft_arguments, config_values, launch

_NOT_FOR_REWARD = {"loss_chunk"}
REWARD_FLAGS = [
    (k, t, {"data": "preference JSONL: prompt, chosen, rejected (optional edited: edited > chosen > rejected)",
            "method": "full | lora (the scalar head always trains) [lora]",
            "lr": "peak learning rate [1e-4]",
            "val_split": "hold out this fraction of the rows for pairwise accuracy [0.1]",
            "val_data": "held-out preference JSONL for pairwise accuracy"}.get(k, h))
    for k, t, h in FLAGS if k not in _NOT_FOR_REWARD]
REWARD_BOOLS = [(k, h) for k, h in BOOLS if k not in ("activation_checkpointing", "compile")]


def register(sub, local) -> None:
    p = sub.add_parser("reward", help="score replies with a reward model",
                       description="Score each reply of a JSONL file with a reward model (a `herd train reward` "
                                   "output or a Hugging Face LlamaForSequenceClassification directory). "
                                   "Each line: {\"messages\": [..., assistant reply]} or {\"prompt\", \"response\"}.")
    p.add_argument("model", help="the reward model directory")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL of conversations to score")
    p.add_argument("--out", metavar="FILE", help="write the records with a \"score\" field here (JSONL) "
                                                 "instead of printing one score per line")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per forward [8]")
    p.set_defaults(func=cmd_reward)


def register_train_verbs(verbs) -> None:
    """`herd train reward` and `herd train loop` (called from cli/train.py's `register`)."""
    s = verbs.add_parser("reward", help="train a reward model on preference pairs",
                         description="Train a reward model (a Llama with a scalar head, Bradley-Terry loss) "
                                     "on preference rows; reports pairwise accuracy on held-out rows and "
                                     "writes a Hugging Face LlamaForSequenceClassification directory.")
    add_sft_arguments(s, REWARD_FLAGS, REWARD_BOOLS)
    s.set_defaults(func=cmd_train_reward)
    from ..train.posttrain import LOOP_FLAGS

    s = verbs.add_parser("loop", help="one post-training round: reward -> rejection sampling -> SFT -> DPO",
                         description="One round of the Llama 3 post-training loop on a preference set: train a "
                                     "reward model, rejection-sample the policy, fine-tune on the best samples, "
                                     "then DPO; each stage optionally averages the weights of several runs.")
    s.add_argument("--config", metavar="FILE", help="a YAML file of these keys (or a shipped recipe's name); "
                                                    "flags override it")
    for key, kind, text in LOOP_FLAGS:
        s.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None, help=text)
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show the stages' progress bars [on]")
    s.set_defaults(func=cmd_train_loop)


def cmd_train_reward(args) -> int:
    from ..train.config import make_config
    from ..train.reward import RewardConfig, train_reward

    values = config_values(args, REWARD_FLAGS, REWARD_BOOLS)
    make_config(values, RewardConfig)  # a bad key or value fails before anything is loaded
    if args.nproc > 1:
        return launch(args.nproc, "reward", values)
    try:
        s = train_reward(values)
    except KeyboardInterrupt:
        return 130
    if s:  # only the first process has one
        print_reward_summary(s)
    return 0


def print_reward_summary(s: dict) -> None:
    from .common import human_size

    d = s["data"]
    print(f"trained {s['steps']} steps ({s['method']}) in {s['wall_seconds']:.1f} s on {d['rows']} rows "
          f"({d['pairs']} pairs, {d['dropped']} dropped as too long), peak memory {human_size(s['peak_memory_bytes'])}")
    if s.get("val_accuracy") is not None:
        before = s["val_accuracy_before"]
        print(f"held-out pairwise accuracy {s['val_accuracy']:.3f} on {s['val_pairs']} pairs"
              + (f" (before training {before:.3f})" if before is not None else ""))
    for name, path in s["outputs"].items():
        print(f"{name}: {path}")


def _conversation(record) -> list[dict]:
    """A record to score: {"messages": [...]} or {"prompt": text | messages, "response": text}."""
    from ..train.data import field_messages

    if not isinstance(record, dict):
        raise HerdError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return field_messages(record["messages"], "messages", "user")
    reply = record.get("response", record.get("completion"))
    if "prompt" not in record or reply is None:
        raise HerdError("expected a 'messages' list or a 'prompt' and a 'response' "
                        f"(keys found: {', '.join(sorted(record)) or 'none'})")
    return field_messages(record["prompt"], "prompt", "user") + field_messages(reply, "response", "assistant")


def cmd_reward(args) -> int:
    from ..train.reward import load_reward_model

    from ..train.data import read_records

    rows = read_records(args.data, lambda record: (record, _conversation(record)), "replies to score")
    records, conversations = [r for r, _ in rows], [c for _, c in rows]
    if args.batch_size < 1:
        raise HerdError(f"--batch-size must be at least 1, got {args.batch_size}")
    scores = load_reward_model(args.model).score(conversations, batch_size=args.batch_size)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for record, score in zip(records, scores):
                f.write(json.dumps({**record, "score": score}, ensure_ascii=False) + "\n")
        print(f"scored {len(scores)} replies: {args.out}", file=sys.stderr)
    else:
        for score in scores:
            print(f"{score:.6f}")
    return 0


def cmd_train_loop(args) -> int:
    from ..train.config import read_yaml, recipe_text, recipes
    from ..train.posttrain import LOOP_FLAGS, make_loop_config, run_round

    values = {}
    if args.config:
        if not Path(args.config).exists() and args.config in recipes():
            import yaml

            values = yaml.safe_load(recipe_text(args.config))
        else:
            values = read_yaml(args.config)
    for key, *_ in [*LOOP_FLAGS, ("progress",)]:
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    cfg = make_loop_config(values)
    try:
        summary = run_round(cfg)
    except KeyboardInterrupt:
        return 130
    for stage, info in summary["stages"].items():
        print(f"{stage}: {info['model']}" + (f"  ({info['note']})" if info.get("note") else ""))
    print(f"policy: {summary['policy']}")
    return 0

