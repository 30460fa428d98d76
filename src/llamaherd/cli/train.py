"""`herd train`: fine-tuning, post-training and pre-training, one verb per recipe.

    herd train sft --model smollm2:135m --data chat.jsonl --out runs/mine [--method full|lora|qlora] ...
    herd train sft --config lora-smollm2 --data chat.jsonl --out runs/mine   # a shipped recipe or a YAML file
    herd train sft ... --nproc 2                                             # torchrun, FSDP2
    herd train reward --config reward-smollm2 --data prefs.jsonl --out runs/rm          (cli/reward.py)
    herd train sample --policy MODEL --reward RM --data prompts.jsonl -k 8 --out best.jsonl
    herd train dpo --config dpo-smollm2 --data prefs.jsonl --out runs/dpo [--beta 0.1 --nll-coef 0.2]
    herd train loop --config loop-smollm2 --out runs/round1                             (cli/reward.py)
    herd train pretrain --preset tiny --data shards/ --out runs/pt                      (cli/pretrain.py)
    herd train scaling --data shards/ --out runs/scaling                                (cli/pretrain.py)
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
    ("compile", "torch.compile each block: on CUDA faster steps after ~a minute's compile [off]"),
    ("resume", "continue from OUT/checkpoint (same data order, RNG and optimizer state)"),
    ("progress", "show the progress bar [on]"),
]


def register(sub, local) -> None:
    p = sub.add_parser("train", help="fine-tune, post-train or pre-train a model (herd train sft ...)",
                       description="Train a model. `herd train VERB --help` lists a recipe's settings.")
    p.add_argument("--list", action="store_true", help="list the shipped recipes")
    p.add_argument("--show", metavar="NAME", help="print a shipped recipe (a YAML to start from)")
    p.set_defaults(func=cmd_train, parser=p)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    s = verbs.add_parser("sft", help="supervised fine-tuning on chat data",
                         description="Supervised fine-tuning (full, LoRA or QLoRA) on JSONL chat data.")
    add_sft_arguments(s)
    s.set_defaults(func=cmd_sft)
    add_sample_parser(verbs)
    d = verbs.add_parser("dpo", help="DPO on preference pairs (the Llama 3 recipe)",
                         description="Direct Preference Optimization as the Llama 3 paper runs it: beta 0.1, "
                                     "an NLL term on the chosen responses, formatting tokens masked.")
    add_sft_arguments(d, DPO_FLAGS, DPO_BOOLS)
    d.set_defaults(func=cmd_dpo)
    # Verbs whose modules build on this one's flags (imported here: they import this module).
    from . import pretrain, reward

    reward.register_train_verbs(verbs)  # reward, loop
    pretrain.register_verbs(verbs)  # pretrain, scaling


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
        return launch(args.nproc, "sft", values)
    from ..train.finetune import sft

    try:
        summary = sft(values)
    except KeyboardInterrupt:
        return 130
    if summary.get("outputs"):
        print_summary(summary)
    return 0


# `herd train dpo`: SFT's flags (its defaults where the paper's differ) plus the preference keys (`DPOConfig`).
DPO_FLAGS = [(k, t, {"data": "preference JSONL: {\"prompt\", \"chosen\", \"rejected\", \"rating\"?} per line",
                     "method": "full | lora | qlora [full]", "lr": "peak learning rate [1e-5]",
                     "batch_size": "pairs per micro-batch [4]"}.get(k, h)) for k, t, h in FLAGS] + [
    ("beta", float, "beta, the strength of the KL constraint to the reference [0.1]"),
    ("nll_coef", float, "weight of the chosen responses' mean NLL term [0.2]"),
    ("loss_type", str, "sigmoid | hinge | ipo [sigmoid]"),
    ("min_rating", str, "keep pairs rated at least: significantly better, better, slightly better, "
                        "marginally better, or any [better]"),
]
DPO_BOOLS = BOOLS + [("mask_format_tokens", "leave the template's header and end-of-turn tokens out of the "
                                            "log-probability sums [on]"),
                     ("share_prompt", "packed: a pair's prompt computed once for both replies [on]")]


def cmd_dpo(args) -> int:
    from ..train.config import make_config
    from ..train.dpo import DPOConfig, dpo

    values = config_values(args, DPO_FLAGS, DPO_BOOLS)
    make_config(values, cls=DPOConfig)  # a bad key or value fails here, before anything is loaded
    if args.nproc > 1:
        return launch(args.nproc, "dpo", values)
    try:
        summary = dpo(values)
    except KeyboardInterrupt:
        return 130
    if summary:  # only the first process has one
        print_dpo_summary(summary)
    return 0


def print_dpo_summary(s: dict) -> None:
    from .common import human_size

    d = s["data"]
    print(f"trained {s['steps']} DPO steps ({s['method']}) in {s['wall_seconds']:.1f} s: {s['pairs_seen']} pairs, "
          f"{s['pairs_per_s']:.2f} pairs/s, peak memory {human_size(s['peak_memory_bytes'])}")
    print(f"data: {d['pairs']} pairs ({d['scored_tokens']} scored tokens), {d['filtered_by_rating']} below "
          f"min_rating, {d['dropped_too_long']} dropped as too long")
    f = s["final"]
    if f:
        print(f"last step: loss {f['loss']:.4f}, reward margin {f['reward_margin']:.4f}, "
              f"reward accuracy {f['reward_accuracy']:.2f}, chosen NLL {f['chosen_nll']:.4f}")
    if s.get("val_after"):
        v, b = s["val_after"], s["val_before"] or {}
        print(f"held out ({s['val_pairs']} pairs): reward margin {b.get('val_reward_margin', 0):.4f} -> "
              f"{v['val_reward_margin']:.4f}, chosen NLL {b.get('val_chosen_nll', float('nan')):.4f} -> "
              f"{v['val_chosen_nll']:.4f}")
    for name, path in s["outputs"].items():
        print(f"{name}: {path}")


def launch(nproc: int, verb: str, values: dict) -> int:
    """Run `verb` with these settings under torchrun, `nproc` processes (`python -m llamaherd.train VERB ...`)."""
    argv = [verb]
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


# -- herd train sample ------------------------------------------------------------------------

def add_sample_parser(verbs) -> None:
    s = verbs.add_parser("sample", help="rejection sampling: K replies per prompt, the best kept as SFT data",
                         description="Rejection sampling (Llama 3): K replies per prompt from the policy, "
                                     "scored by a reward model; the best (or the top quartile) written as "
                                     "SFT JSONL with their scores. The K replies share the prompt's prefill.")
    s.add_argument("--policy", required=True, help="the model to sample from: a store name, a .gguf file, a HF / "
                                                   "Meta directory or a training output")
    s.add_argument("--reward", required=True, help="the reward model (herd train reward's output)")
    s.add_argument("--data", required=True, help='prompts JSONL: {"messages": [...]} or {"prompt": "..."} per line '
                                                  "(a last assistant message is dropped)")
    s.add_argument("--out", required=True, help="the SFT JSONL to write")
    s.add_argument("-k", type=int, default=4, help="samples per prompt [4]")
    s.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 for greedy [0.8]")
    s.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold [0.9]")
    s.add_argument("--system", help="a system prompt for this round: steers the replies, not written out")
    s.add_argument("--keep", choices=["best", "top_quartile"], default="best",
                   help="the best reply per prompt, or the best quarter of the K [best]")
    s.add_argument("--max-tokens", type=int, default=256, help="the longest reply, in tokens [256]")
    s.add_argument("--seed", type=int, default=0, help="the samples' seeds are drawn from it [0]")
    s.add_argument("--parallel", type=int, default=16, help="replies decoded together (at least K) [16]")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show the progress bar (samples/s) [on]")
    s.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    import time

    from ..errors import HerdError
    from ..train.sample import read_prompts, rejection_sample, write_jsonl

    if args.k < 1:
        raise HerdError(f"-k must be at least 1 (got {args.k})")
    if args.max_tokens < 1 or args.parallel < 1:
        raise HerdError("--max-tokens and --parallel must be at least 1")
    from ..generate import SamplingOptions

    SamplingOptions.from_dict({"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed})
    prompts = read_prompts(args.data)  # bad options or data fail before anything is loaded
    try:
        from ..train.reward import load_reward_model
    except ModuleNotFoundError as e:
        if e.name != "llamaherd.train.reward":
            raise
        raise HerdError("this install has no reward models (llamaherd.train.reward)") from None
    scorer = load_reward_model(args.reward)
    from ..llm import Llama
    from ..train.finetune import resolve_model_path

    policy = Llama.load(resolve_model_path(args.policy))
    kept: list[dict] = []
    start = time.perf_counter()
    try:
        rejection_sample(policy, prompts, scorer.score, args.k, args.temperature, args.top_p, args.system, args.keep,
                         max_tokens=args.max_tokens, seed=args.seed, parallel=args.parallel, progress=args.progress,
                         on_rows=kept.extend)
    except KeyboardInterrupt:
        write_jsonl(sorted(kept, key=lambda r: (r["prompt"], -r["score"])), args.out)
        print(f"interrupted: the rows of {len({r['prompt'] for r in kept})} prompts written to {args.out}",
              file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    write_jsonl(sorted(kept, key=lambda r: (r["prompt"], -r["score"])), args.out)
    n = len(prompts) * args.k
    mean = sum(r["score"] for r in kept) / len(kept)
    print(f"sampled {n} replies to {len(prompts)} prompts in {seconds:.1f} s ({n / seconds:.1f} samples/s); "
          f"kept {len(kept)} ({args.keep}), mean score {mean:.4f}: {args.out}")
    return 0
