"""The pre-training recipe: a Llama 3 shape from random initialisation (or an existing model, for
continued pre-training) over `herd data prepare` shards, in one readable function.

    from llamaherd.train.pretrain import pretrain
    summary = pretrain(preset="tiny", data="prepared/", out="runs/tiny", tokens=2_000_000)

As the Llama 3 paper trains: AdamW (beta 0.9/0.95, weight decay 0.1), linear warm-up then cosine
decay to 10% of the peak rate, gradient clipping at 1.0, documents packed into sequences with a
document mask (no attention across documents, positions restarting at each document). The token
budget sets the steps. One process or several under `torchrun` (FSDP2, as `herd train sft`); the
optimisation loop is `train.loop.fit`, shared by every recipe. The outputs in OUT/ are those of a
full fine-tune (`model/` a Hugging Face directory, `train.json`, `metrics.jsonl`, `summary.json`,
`checkpoint/`), so `herd run`, `herd export` and `llamaherd.load` take them alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import HerdError
from .finetune import (CausalLMLoss, _checkpoint_blocks, _distribute, _full_state, compile_blocks,
                       load_for_training, resolve_model_path)
from .loop import begin, fit
from .metrics import plot_loss
from .presets import flops_per_token, non_embedding_params, preset_args


@dataclass
class PretrainConfig:
    preset: str = ""  # a Llama 3 shape to start from random weights (see train/presets.py)
    model: str = ""  # or a model to continue pre-training (store name, .gguf, HF / Meta directory): full training
    data: str = ""  # a `herd data prepare` output folder
    out: str = ""  # output directory (checkpoints, metrics.jsonl, loss.png, model/)
    tokenizer: str = ""  # with --preset: llama3, a model name or path; default: the one the data was prepared with
    tokens: int | None = None  # token budget: steps = tokens / (batch_size x processes x grad_accum x max_seq_len)
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps (instead of a token budget)
    lr: float = 3e-4
    warmup_steps: int = 100  # linear warm-up (at most half the run), then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 8  # sequences per process per micro-batch
    grad_accum: int = 1
    max_seq_len: int = 512  # tokens per packed sequence
    seed: int = 0  # the initial weights, the document order and nothing else
    val_split: float = 0.01  # fraction of the documents held out for the validation loss
    val_windows: int = 32  # sequences of held-out text per evaluation (at most)
    val_every: int = 0  # evaluate every N steps (0: at the end)
    save_every: int = 0  # checkpoint every N steps (always at the end and on Ctrl-C)
    resume: bool = False  # continue from OUT/checkpoint
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (on CUDA: faster steps after a compile of ~a minute)
    loss_chunk: int = 8192  # vocabulary rows per cross-entropy chunk
    device: str | None = None  # default: cuda when available, else cpu
    progress: bool = True

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if bool(self.preset) == bool(self.model):
            raise HerdError("give either --preset (random initialisation) or --model (continued pre-training)")
        if self.model and self.tokenizer:
            raise HerdError("--tokenizer goes with --preset; a --model brings its own tokenizer")
        for name in ("epochs", "batch_size", "grad_accum", "max_seq_len", "loss_chunk", "val_windows"):
            if getattr(self, name) < 1:
                raise HerdError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("tokens", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise HerdError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.tokens is not None and self.max_steps is not None:
            raise HerdError("give a token budget (--tokens) or --max-steps, not both")
        if self.lr <= 0:
            raise HerdError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.val_split < 1:
            raise HerdError(f"val_split must be in [0, 1), got {self.val_split}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- initialisation ---------------------------------------------------------------------------

@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Random weights as Meta's pre-training code (torchtitan's Llama 3) draws them.

    Truncated normals: q, k, v and the gate w1 with std 0.02; the projections that write into the
    residual stream (wo, w2) and the up projection w3 with 0.02 / sqrt(2 (layer + 1)), smaller with
    depth; the output with dim^-0.5 (cut at 3 std) so the first logits are of order 1; the
    embedding N(0, 1), or the output's init when the two are tied; norms 1.
    """
    args = model.args
    out_std = args.dim ** -0.5
    nn.init.trunc_normal_(model.output.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
    if not args.tie_embeddings:
        nn.init.normal_(model.tok_embeddings.weight)
    for i, layer in enumerate(model.layers):
        depth_std = 0.02 / (2 * (i + 1)) ** 0.5
        attn, ffn = layer.attention, layer.feed_forward
        for linear, std in ((attn.wq, 0.02), (attn.wk, 0.02), (attn.wv, 0.02), (attn.wo, depth_std),
                            (ffn.w1, 0.02), (ffn.w2, depth_std), (ffn.w3, depth_std)):
            nn.init.trunc_normal_(linear.weight, std=std, a=-2.0, b=2.0)
        layer.attention_norm.weight.fill_(1.0)
        layer.ffn_norm.weight.fill_(1.0)
    model.norm.weight.fill_(1.0)


def build_from_preset(name: str, vocab_size: int, device: str, seed: int) -> nn.Module:
    """A model of preset `name`, randomly initialised from `seed` (the same on every process)."""
    return build_random(preset_args(name, vocab_size), device, seed)


def build_random(args, device: str, seed: int) -> nn.Module:
    """A `Transformer` of shape `args` (a `ModelArgs`), made on `device` with `init_weights` from `seed`."""
    from ..model import Transformer

    with torch.device("meta"):  # no throw-away default init of the weights
        model = Transformer(args)
    model.to_empty(device=device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_rope()
    torch.manual_seed(seed)
    init_weights(model)
    return model


# -- data ------------------------------------------------------------------------------------

def positions(doc_ids: np.ndarray) -> np.ndarray:
    """(B, T) position of each token within its document: 0 where a document starts in the
    window (a document cut by the window's start also counts from 0, as it sees nothing before)."""
    T = doc_ids.shape[-1]
    index = np.broadcast_to(np.arange(T), doc_ids.shape)
    starts = np.concatenate([np.ones_like(doc_ids[:, :1], bool), doc_ids[:, 1:] != doc_ids[:, :-1]], axis=1)
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


class WindowBatches:
    """`data.loader.PackedDocuments` as `fit` reads batches: its length (per process) and
    `epoch(epoch, start)`. A global batch is windows [b * B * W, (b + 1) * B * W) of the epoch,
    each process taking every W-th: the same set whatever the number of processes W."""

    def __init__(self, docs, batch_size: int, limit: int | None = None):
        self.docs, self.batch_size = docs, batch_size
        n = len(docs) // (batch_size * docs.world_size)
        self.n = n if limit is None else min(n, limit)

    def __len__(self) -> int:
        return self.n

    def epoch(self, epoch: int, start: int = 0):
        windows = self.docs.batches(self.batch_size, epoch, start * self.batch_size * self.docs.world_size)
        for _, w in zip(range(self.n - start), windows):
            yield {"tokens": torch.from_numpy(w.tokens), "targets": torch.from_numpy(w.targets),
                   "doc_ids": torch.from_numpy(w.doc_ids), "input_pos": torch.from_numpy(positions(w.doc_ids))}


def read_report(data: str | Path) -> dict:
    """The `herd data prepare` report of folder `data` (HerdError when there is none)."""
    path = Path(data) / "report.json"
    if not Path(data).is_dir():
        raise HerdError(f"data folder {data} does not exist")
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        raise HerdError(f"{data} holds no prepared data (report.json): run `herd data prepare` first") from None
    if not report.get("tokens_out"):
        raise HerdError(f"{data} holds no tokens (every document was removed by `herd data prepare`)")
    return report


def load_named_tokenizer(spec: str):
    """A tokenizer from `llama3`, a path, or a model name in the store."""
    from ..tokenizer import load_tokenizer

    if spec == "llama3" or Path(spec).expanduser().exists():
        return load_tokenizer(str(Path(spec).expanduser()) if spec != "llama3" else spec)
    from ..cli.common import resolve_model

    return load_tokenizer(resolve_model(spec).path)


def check_tokenizer(tokenizer, report: dict, data: str, whose: str) -> None:
    """The shards must have been tokenized by this tokenizer (same vocabulary, BOS and EOS)."""
    theirs = report.get("tokenizer", {})
    for key, ours in (("vocab_size", tokenizer.n_words), ("bos_id", tokenizer.bos_id), ("eos_id", tokenizer.eos_id)):
        if theirs.get(key) != ours:
            raise HerdError(f"{data} was tokenized with {theirs.get('name', 'another tokenizer')!r} ({key} "
                            f"{theirs.get(key)}), not with {whose} ({key} {ours}): prepare the data again with "
                            f"its tokenizer")


def loaders(cfg: PretrainConfig, rank: int, world: int) -> tuple[WindowBatches, WindowBatches | None]:
    """Training and validation batches of the prepared folder."""
    from ..data.loader import PackedDocuments

    common = dict(val_fraction=cfg.val_split, seed=cfg.seed, rank=rank, world_size=world)
    train = PackedDocuments(cfg.data, cfg.max_seq_len, split="train", **common)
    batches = WindowBatches(train, cfg.batch_size)
    if len(batches) == 0:
        raise HerdError(f"{cfg.data} holds {train.tokens_per_epoch} training tokens, fewer than one batch of "
                        f"{cfg.batch_size} x {world} sequences of {cfg.max_seq_len}: lower --batch-size or "
                        f"--max-seq-len, or add data")
    if cfg.val_split == 0:
        return batches, None
    try:
        val = PackedDocuments(cfg.data, cfg.max_seq_len, split="val", **common)
    except HerdError:  # no document drew "val"
        raise HerdError(f"val_split {cfg.val_split} holds out no document of {cfg.data}: raise it, or "
                        f"--val-split 0 for no validation") from None
    size = max(1, min(cfg.batch_size, len(val) // world))
    val_batches = WindowBatches(val, size, limit=max(1, cfg.val_windows // (size * world)))
    if len(val_batches) == 0:
        raise HerdError(f"the held-out documents of {cfg.data} make less than one sequence of "
                        f"{cfg.max_seq_len} tokens per process: raise --val-split or lower --max-seq-len")
    return batches, val_batches


# -- the recipe -------------------------------------------------------------------------------

def pretrain(config: PretrainConfig | dict | None = None, *, on_step: Callable[[dict], None] | None = None,
             plot: bool = True, **kwargs: Any) -> dict:
    """Pre-train a preset from random weights, or continue pre-training a model (see the module doc).

    Args:
        config: a `PretrainConfig`, or a dict of its keys; `kwargs` override it.
        on_step: called with each step's metrics record (after it is logged).
        plot: draw OUT/loss.png (when matplotlib is installed).
    Returns:
        The summary (also written to OUT/summary.json): steps, tokens, time, parameters, MFU inputs,
        the validation loss and perplexity at each evaluation, the outputs.
    Raises:
        HerdError: a bad setting, preset, model, tokenizer or data folder.
    """
    cfg, rank, world, device, out = begin(config, kwargs, PretrainConfig, required=("data", "out"))
    report = read_report(cfg.data)

    # Model and tokenizer: a preset from random weights, or an existing model's float weights.
    if cfg.preset:
        preset_args(cfg.preset, 1)  # an unknown preset fails before the tokenizer is loaded
        tokenizer = load_named_tokenizer(cfg.tokenizer or report["tokenizer"]["name"])
        check_tokenizer(tokenizer, report, cfg.data, f"the tokenizer {cfg.tokenizer or report['tokenizer']['name']!r}")
        model = build_from_preset(cfg.preset, tokenizer.n_words, device, cfg.seed)
        model_path = None
    else:
        model_path = resolve_model_path(cfg.model)
        model, ckpt = load_for_training(model_path, "full", device)
        tokenizer = ckpt.tokenizer
        check_tokenizer(tokenizer, report, cfg.data, f"{cfg.model}'s tokenizer")
    args = model.args
    if cfg.max_seq_len > args.max_seq_len:
        raise HerdError(f"max_seq_len {cfg.max_seq_len} exceeds the model's context length {args.max_seq_len}")
    batches, val_batches = loaders(cfg, rank, world)
    tokens_per_step = cfg.batch_size * world * cfg.grad_accum * cfg.max_seq_len
    steps = math.ceil(cfg.tokens / tokens_per_step) if cfg.tokens else cfg.max_steps
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the same RNG state whichever way the model was made

    if cfg.activation_checkpointing:
        _checkpoint_blocks(model)
    if cfg.compile:
        compile_blocks(model)
    model.train()
    wrapper = CausalLMLoss(model, cfg.loss_chunk)
    if world > 1:
        wrapper = _distribute(model, wrapper, cfg.activation_checkpointing)
    final_model = out / "model"
    if rank == 0:
        run = {**cfg.to_dict(), "method": "full", "resume": False,
               "model_path": str(model_path if model_path is not None else final_model.resolve())}
        (out / "train.json").write_text(json.dumps(run, indent=2))

    validation: list[dict] = []

    def record(r: dict) -> None:
        if "val_loss" in r:
            validation.append({"step": r["step"], "val_loss": r["val_loss"], "val_perplexity": math.exp(r["val_loss"])})
        if on_step is not None:
            on_step(r)

    result = fit(replace(cfg, max_steps=steps), wrapper, batches, out=out, device=device,
                 val_batches=val_batches, on_step=record)
    position = result["position"]

    sd = _full_state(wrapper, world)
    if rank == 0:
        from ..export.hf import save_hf

        save_hf({k: v.float() for k, v in sd.items()}, args, hf_tokenizer(tokenizer), final_model)
    flops = flops_per_token(args, cfg.max_seq_len)
    seconds = max(position["seconds"], 1e-9)
    val_before = result["val_before"]["val_loss"] if result["val_before"] else None
    summary = {
        "preset": cfg.preset or None, "model": cfg.model or None, "steps": position["step"],
        "epochs": position["epoch"] + 1, "tokens": position["tokens"], "seconds": round(position["seconds"], 2),
        "wall_seconds": result["wall_seconds"], "tokens_per_s": round(position["tokens"] / seconds, 1),
        "parameters": args.n_params, "non_embedding_parameters": non_embedding_params(args),
        "flops_per_token": flops, "flops_per_s": round(flops * position["tokens"] / seconds),
        "peak_memory_bytes": result["peak_memory_bytes"], "processes": world,
        "data": {"folder": str(cfg.data), "tokens_per_epoch": batches.docs.tokens_per_epoch,
                 "tokenizer": report["tokenizer"].get("name")},
        "val_loss_before": val_before,
        "val_loss": validation[-1]["val_loss"] if validation else None,
        "val_perplexity": validation[-1]["val_perplexity"] if validation else None,
        "validation": validation,
        "outputs": {"model": str(final_model)} if rank == 0 else {},
    }
    if rank == 0:
        png = plot_loss(out) if plot else None
        if png is not None:
            summary["outputs"]["loss_curve"] = str(png)
        summary["outputs"]["metrics"] = str(out / "metrics.jsonl")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def hf_tokenizer(tokenizer):
    """The tokenizer as a `tokenizers` BPE (what a model directory saves): the Llama 3 tiktoken
    tokenizer is converted, a byte-level BPE is returned as it is."""
    if hasattr(getattr(tokenizer, "model", None), "save"):
        return tokenizer
    from ..tokenizer.convert import hf_from_tiktoken

    return hf_from_tiktoken(tokenizer)
