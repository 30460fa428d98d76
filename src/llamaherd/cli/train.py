"""`herd train`: fine-tuning.

    herd train sft --model smollm2:135m --data chat.jsonl --out runs/mine [--method full|lora|qlora] ...
    herd train sft --config lora-smollm2 --data chat.jsonl --out runs/mine   # a shipped recipe or a YAML file
    herd train sft ... --nproc 2                                             # torchrun, FSDP2
    herd train --list | --show NAME
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


# Command-line flags of `herd train sft`: (key, type, help). The keys are `SFTConfig`'s.
FLAGS = [
    ("model", str, "model name in the store, a .gguf file, or a HF / Meta directory"),
    ("data", str, "training JSONL: {\"messages\": [...]} or {\"prompt\", \"completion\"} per line"),
    ("out", str, "output directory"),
    ("method", str, "full | lora | qlora (LoRA over the GGUF's quantized blocks) [lora]"),
    ("epochs", int, "passes over the data [1]"),
    ("max_steps", int, "optimizer steps (overrides --epochs)"),
    ("lr", float, "peak learning rate [2e-4]"),
    ("warmup_steps", int, "linear warm-up steps before the cosine decay [10]"),
    ("weight_decay", float, "AdamW weight decay [0]"),
    ("grad_clip", float, "max gradient norm, 0 for none [1.0]"),
    ("batch_size", int, "sequences per process per micro-batch [4]"),
    ("grad_accum", int, "micro-batches per optimizer step [1]"),
    ("max_seq_len", int, "tokens per sequence; longer examples are truncated, or dropped if no answer is left [512]"),
    ("lora_rank", int, "LoRA rank [8]"),
    ("lora_alpha", float, "LoRA alpha (the update is scaled by alpha/rank) [16]"),
    ("lora_dropout", float, "dropout on the LoRA input [0]"),
    ("lora_targets", str, "comma-separated: q,k,v,o,gate,up,down or all [all seven]"),
    ("seed", int, "seed of the data order, the split and the adapters' init [0]"),
    ("val_data", str, "held-out JSONL for a validation loss"),
    ("val_split", float, "or hold out this fraction of --data [0]"),
    ("val_every", int, "validate every N steps (default: at the end of each epoch)"),
    ("save_every", int, "checkpoint every N steps (always at the end and on Ctrl-C)"),
    ("loss_chunk", int, "vocabulary rows per cross-entropy chunk [8192]"),
    ("device", str, "cpu or cuda (default: cuda when available)"),
]
BOOLS = [
    ("packing", "pack several examples per sequence with document masks [on]"),
    ("activation_checkpointing", "recompute each block in the backward to save memory [off]"),
    ("resume", "continue from OUT/checkpoint (same data order, RNG and optimizer state)"),
    ("progress", "show the progress bar [on]"),
]


def register(sub, local) -> None:
    p = sub.add_parser("train", help="fine-tune a model (herd train sft ...)",
                       description="Fine-tune a model. `herd train sft --help` lists the settings.")
    p.add_argument("--list", action="store_true", help="list the shipped recipes")
    p.add_argument("--show", metavar="NAME", help="print a shipped recipe (a YAML to start from)")
    p.set_defaults(func=cmd_train, parser=p)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    s = verbs.add_parser("sft", help="supervised fine-tuning on chat data",
                         description="Supervised fine-tuning (full, LoRA or QLoRA) on JSONL chat data.")
    add_sft_arguments(s)
    s.set_defaults(func=cmd_sft)
    from .pretrain import register_verbs  # herd train pretrain / scaling

    register_verbs(verbs)


def add_sft_arguments(s: argparse.ArgumentParser, flags=FLAGS, bools=BOOLS) -> None:
    """The recipe's keys as flags (`flags`: (key, type, help); `bools`: (key, help) on/off pairs)."""
    s.add_argument("--config", metavar="FILE", help="a YAML file of these keys (or a shipped recipe's name); "
                                                    "flags override it")
    for key, kind, text in flags:
        s.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None, help=text)
    for key, text in bools:
        s.add_argument("--" + key.replace("_", "-"), dest=key, action=argparse.BooleanOptionalAction,
                       default=None, help=text)
    s.add_argument("--nproc", type=int, default=1, help="processes to launch with torchrun (FSDP2) [1]")


def cmd_train(args) -> int:
    from ..train.config import recipe_text, recipes

    if args.show:
        print(recipe_text(args.show), end="")
        return 0
    if args.list:
        for name, text in recipes().items():
            print(f"{name:<16} {text}")
        return 0
    args.parser.print_help()
    return 2


def config_values(args, flags=FLAGS, bools=BOOLS) -> dict:
    """The recipe's keys: the --config file's, then every flag given on the command line."""
    from ..train.config import read_yaml, recipe_text, recipes

    values = {}
    if args.config:
        path = Path(args.config)
        if not path.exists() and args.config in recipes():
            import yaml

            values = yaml.safe_load(recipe_text(args.config))
        else:
            values = read_yaml(path)
    for key, *_ in [*flags, *bools]:
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return values


def cmd_sft(args) -> int:
    from ..train.config import make_config

    values = config_values(args)
    make_config(values)  # a bad key or value fails here, before anything is loaded or launched
    if args.nproc > 1:
        return launch(args.nproc, values)
    from ..train.finetune import sft

    try:
        summary = sft(values)
    except KeyboardInterrupt:
        return 130
    if summary.get("outputs"):
        print_summary(summary)
    return 0


def launch(nproc: int, values: dict) -> int:
    """Run the same settings under torchrun with `nproc` processes (`python -m llamaherd.train sft ...`)."""
    argv = ["sft"]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llamaherd.train", *argv]
    return subprocess.call(cmd, env=os.environ.copy())


def print_summary(s: dict) -> None:
    from .common import human_size

    d = s["data"]
    print(f"trained {s['steps']} steps ({s['method']}, {s['processes']} process{'es' if s['processes'] > 1 else ''}) "
          f"in {s['wall_seconds']:.1f} s: {s['tokens']} tokens, {s['tokens_per_s']:.0f} tokens/s, "
          f"peak memory {human_size(s['peak_memory_bytes'])}")
    print(f"data: {d['examples']} examples ({d['trained_tokens']} trained tokens), "
          f"{d['truncated']} truncated, {d['dropped']} dropped as too long")
    if s.get("final_loss") is not None:
        print(f"final loss {s['final_loss']:.4f}")
    for name, path in s["outputs"].items():
        print(f"{name}: {path}")
