"""`herd train pretrain` and `herd train scaling`: the pre-training verbs of `herd train`.

    herd train pretrain --preset tiny --data prepared/ --out runs/tiny --tokens 2000000
    herd train pretrain --model smollm2:135m --data korean/ --out runs/ko --tokens 5000000   # continued
    herd train pretrain ... --nproc 2                                                         # torchrun, FSDP2
    herd train scaling --data prepared/ --out runs/scaling [--presets tiny,mini,small] [--flops 3e11,1e12,3e12]
"""

from __future__ import annotations

from .train import FLAGS as SFT_FLAGS
from .train import add_sft_arguments, config_values, launch

_SFT_HELP = dict((key, (kind, text)) for key, kind, text in SFT_FLAGS)

# `herd train pretrain`'s flags: (key, type, help), the keys `PretrainConfig`'s; the shared ones keep
# `herd train sft`'s help where their default is the same.
FLAGS = [
    ("preset", str, "a Llama 3 shape to train from random weights: tiny, mini, small, 20m, 100m, "
                    "llama3.2-1b, llama3.2-3b, llama3.1-8b"),
    ("model", str, "or a model to continue pre-training (store name, .gguf, HF / Meta directory)"),
    ("data", str, "a `herd data prepare` output folder"),
    ("out", str, "output directory"),
    ("tokenizer", str, "with --preset: llama3 or a model name/path (default: the data's tokenizer)"),
    ("tokens", int, "token budget (sets the steps)"),
    *[(key, *_SFT_HELP[key]) for key in ("epochs", "max_steps")],
    ("lr", float, "peak learning rate [3e-4]"),
    ("warmup_steps", int, "linear warm-up steps (at most half the run) before the cosine decay [100]"),
    ("weight_decay", float, "AdamW weight decay [0.1]"),
    ("grad_clip", float, "max gradient norm, 0 for none [1.0]"),
    ("batch_size", int, "sequences per process per micro-batch [8]"),
    ("grad_accum", int, "micro-batches per optimizer step [1]"),
    ("max_seq_len", int, "tokens per packed sequence [512]"),
    ("seed", int, "seed of the initial weights and the document order [0]"),
    ("val_split", float, "fraction of the documents held out for the validation loss [0.01]"),
    ("val_windows", int, "held-out sequences per evaluation, at most [32]"),
    *[(key, *_SFT_HELP[key]) for key in ("val_every", "save_every", "loss_chunk", "device")],
]
BOOLS = [
    ("activation_checkpointing", "recompute each block in the backward to save memory [off]"),
    ("compile", "torch.compile each block: on CUDA faster steps after ~a minute's compile [off]"),
    ("resume", "continue from OUT/checkpoint (same data order, RNG and optimizer state)"),
    ("progress", "show the progress bar [on]"),
]


def register_verbs(verbs) -> None:
    """Add `pretrain` and `scaling` to `herd train`'s verbs (and to `python -m llamaherd.train`'s)."""
    s = verbs.add_parser("pretrain", help="pre-train a Llama 3 shape (or continue pre-training a model)",
                         description="Pre-train from random weights (--preset) or continue pre-training "
                                     "(--model) on `herd data prepare` shards.")
    add_sft_arguments(s, FLAGS, BOOLS)
    s.set_defaults(func=cmd_pretrain)
    c = verbs.add_parser("scaling", help="fit compute-optimal model sizes on a grid of tiny presets",
                         description="Pre-train each preset at each compute budget (C = 6 N D), fit the "
                                     "IsoFLOP minimum per budget and the power law N_opt = k C^a.")
    c.add_argument("--data", required=True, help="a `herd data prepare` output folder")
    c.add_argument("--out", required=True, help="output directory (runs/, scaling.json, scaling.png)")
    c.add_argument("--presets", default=None, help="comma-separated presets [tiny,mini,small]")
    c.add_argument("--flops", default=None, help="comma-separated compute budgets in FLOPs [3e11,1e12,3e12]")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--max-seq-len", type=int, default=128)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--val-split", type=float, default=0.05)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--progress", action=__import__("argparse").BooleanOptionalAction, default=True)
    c.set_defaults(func=cmd_scaling)


def cmd_pretrain(args) -> int:
    from ..train.config import make_config
    from ..train.pretrain import PretrainConfig

    values = config_values(args, FLAGS, BOOLS)
    make_config(values, PretrainConfig)  # a bad key or value fails here, before anything is loaded or launched
    if args.nproc > 1:
        return launch(args.nproc, "pretrain", values)
    from ..train.pretrain import pretrain

    try:
        summary = pretrain(values)
    except KeyboardInterrupt:
        return 130
    if summary.get("outputs"):
        print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    from .common import human_size

    what = f"preset {s['preset']}" if s["preset"] else f"continued from {s['model']}"
    print(f"pre-trained {s['steps']} steps ({what}, {s['parameters'] / 1e6:.1f} M parameters, {s['processes']} "
          f"process{'es' if s['processes'] > 1 else ''}) in {s['wall_seconds']:.1f} s: {s['tokens']} tokens, "
          f"{s['tokens_per_s']:.0f} tokens/s, {s['flops_per_s'] / 1e9:.1f} GFLOP/s, "
          f"peak memory {human_size(s['peak_memory_bytes'])}")
    for v in s["validation"]:
        print(f"step {v['step']}: validation loss {v['val_loss']:.4f}, perplexity {v['val_perplexity']:.2f}")
    for name, path in s["outputs"].items():
        print(f"{name}: {path}")


def cmd_scaling(args) -> int:
    from ..errors import HerdError
    from ..train.scaling import DEFAULT_FLOPS, run_grid

    try:
        presets = args.presets.split(",") if args.presets else None
        flops = [float(f) for f in args.flops.split(",")] if args.flops else list(DEFAULT_FLOPS)
    except ValueError:
        raise HerdError(f"--flops must be comma-separated numbers, got {args.flops!r}") from None
    result = run_grid(args.data, args.out, presets=presets, flops=flops, batch_size=args.batch_size,
                      max_seq_len=args.max_seq_len, lr=args.lr, val_split=args.val_split, seed=args.seed,
                      progress=args.progress)
    for budget in result["budgets"]:
        print(f"C = {budget['flops']:.3g} FLOPs: " + ", ".join(
            f"{r['preset']} (N {r['params'] / 1e6:.2f} M, D {r['tokens']}) {r['val_loss']:.4f}" for r in budget["runs"])
            + (f" -> N_opt {budget['n_opt'] / 1e6:.3f} M" if budget.get("n_opt") else ""))
    law = result.get("law")
    if law:
        print(f"N_opt(C) = {law['k']:.4g} * C^{law['alpha']:.3f}")
    for name, path in result["outputs"].items():
        print(f"{name}: {path}")
    return 0
