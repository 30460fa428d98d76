"""The one optimisation loop under every training recipe (SFT, DPO, reward model, pre-training).

A recipe builds two things and hands them to `fit`:

- a *wrapper* module whose `forward(**batch)` returns the batch's **summed** loss, or a pair
  `(summed loss, {name: summed metric})` — summed, not averaged, so that the loop can divide by the
  global batch's weight (its target tokens for a language-model loss, its pairs for a preference
  loss) and every example weighs the same whatever micro-batch or process it landed in;
- `Batches` of dict batches (each with a `tokens` tensor, counted for tokens/s).

`fit` runs AdamW with warm-up + cosine decay, gradient accumulation, clipping, bf16 autocast on
CUDA, periodic / final / Ctrl-C checkpoints and exact resume, validation, and the metrics file and
progress bar. It returns where it stopped; the recipe saves its own outputs.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import HerdError
from . import checkpoint
from .data import IGNORE
from .metrics import Metrics


def target_count(batch: dict) -> torch.Tensor:
    """The weight of a language-model batch: its tokens that are trained on."""
    return (batch["targets"] != IGNORE).sum()


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# Settings that may change on --resume (they change the trajectory of the run by rounding at most).
RESUME_FREE = {"resume", "progress", "save_every", "val_every", "device", "out", "compile"}


def begin(config: Any, overrides: dict[str, Any], cls: type, required: tuple[str, ...] = ("model", "data", "out")
          ) -> tuple[Any, int, int, str, Path]:
    """A recipe's start: its settings, this process's place, its device and the seed.

    Args:
        config: a `cls` (the recipe's dataclass) or a dict of its keys; `overrides` on top.
        required: the keys that must be set.
    Returns:
        (settings, rank, world size, device, output directory). The directory is not made here.
    Raises:
        HerdError: an unknown key, a bad value, a missing required key, or a --resume that does
            not continue the run in OUT.
    """
    from .config import make_config

    values = config.to_dict() if isinstance(config, cls) else dict(config or {})
    cfg = make_config({**values, **overrides}, cls)
    for key in required:
        if not getattr(cfg, key):
            raise HerdError(f"{key} is required")
    if cfg.resume:
        check_resume(cfg)
    rank, world = rank_world()
    device = cfg.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    return cfg, rank, world, device, Path(cfg.out)


def check_resume(cfg: Any) -> None:
    """--resume continues the same run: any setting that shapes its losses must be the same."""
    run_file = Path(cfg.out) / "train.json"
    if not run_file.exists():
        raise HerdError(f"nothing to resume: no checkpoint in {Path(cfg.out) / 'checkpoint'}")
    before = json.loads(run_file.read_text())
    for key, value in cfg.to_dict().items():
        if key not in RESUME_FREE and key in before and before[key] != value:
            raise HerdError(f"--resume continues the same run, but {key} was {before[key]!r} and is now {value!r}")


def peak_memory(device: str) -> int:
    """Peak bytes: CUDA's allocator peak on `device`, or this process's peak resident set on the CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, world: int = 1) -> torch.optim.AdamW:
    """AdamW (betas 0.9 / 0.95). One process: the fused kernel (one pass over each tensor, on the
    CPU ~6x faster than the for-each implementation; on CUDA one launch for many tensors). Sharded
    (DTensor) parameters: torch's default."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=world == 1 or None)


def autocast(device: str):
    """bf16 matmuls on CUDA (weights, gradients and optimizer state stay float32); plain float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else nullcontext()


def train_step(wrapper: nn.Module, micro: list[dict], optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
               *, device: str, grad_clip: float, weight: Callable[[dict], torch.Tensor] = target_count,
               world: int = 1) -> tuple[dict[str, float], int, float]:
    """One optimizer step over the micro-batches of a global batch (gradient accumulation).

    Args:
        wrapper: returns a batch's summed loss (and summed metrics), see the module doc.
        micro: this process's micro-batches (dicts of tensors, on any device).
        params: the trainable parameters (clipped together).
        grad_clip: max gradient norm (0: no clipping).
        weight: a batch's weight, the divisor of the summed loss.
    Returns:
        ({name: the global batch's loss or metric per unit of weight}, tokens of the global
         batch, the gradient norm before clipping (nan without clipping)).
    """
    # Every example of the global batch weighs the same: divide the summed loss by their weight.
    counts = torch.stack([sum(weight(m) for m in micro).float().cpu(),
                          torch.tensor(float(sum(m["tokens"].numel() for m in micro)))]).to(device)
    if world > 1:
        dist.all_reduce(counts)
    n = counts[0].clamp(min=1)
    sums: dict[str, torch.Tensor] = {}
    for batch in micro:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device):
            loss, extra = _split_output(wrapper(**batch))
        # FSDP averages gradients over processes; each process's loss is its share of the
        # global sum, so scale by `world` to get the global batch's mean-loss gradient.
        (loss * world / n).backward()
        for name, value in {"loss": loss, **extra}.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
    names = sorted(sums)
    totals = torch.stack([sums[k] for k in names])
    if world > 1:
        dist.all_reduce(totals)
    if grad_clip > 0:
        norm = nn.utils.clip_grad_norm_(params, grad_clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    else:
        grad_norm = float("nan")
    # Read before the step: on CUDA this is where the host waits for the backward, so a Ctrl-C lands
    # here, before the weights move, rather than after a step the checkpoint would not record.
    means, tokens = (totals / n).tolist(), int(counts[1])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(zip(names, means)), tokens, grad_norm


def _split_output(output) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(output, tuple):
        return output[0], output[1]
    return output, {}


def fit(cfg: Any, wrapper: nn.Module, batches, *, out, device: str, val_batches=None,
        weight: Callable[[dict], torch.Tensor] = target_count,
        on_step: Callable[[dict], None] | None = None) -> dict:
    """Train `wrapper`'s trainable parameters over `batches` as `cfg` says.

    Args:
        cfg: the recipe's settings; read here: lr, weight_decay, warmup_steps, min_lr_ratio,
            grad_clip, grad_accum, epochs, max_steps, val_every, save_every, resume, progress.
        wrapper: the module returning a batch's summed loss (and summed metrics), see the module doc.
        batches: a `train.data.Batches` (its `epoch(epoch, start)` and length).
        out: the run's directory (checkpoint/, metrics.jsonl).
        device: where the batches go.
        val_batches: held-out `Batches`, evaluated as `cfg.val_every` says.
        weight: a batch's weight, the divisor of its summed loss (target tokens by default).
        on_step: called with each step's metrics record.
    Returns:
        {"position": {step, epoch, batch, tokens, seconds}, "val_before", "wall_seconds",
         "trainable_parameters", "peak_memory_bytes"}.
    Raises:
        KeyboardInterrupt: after a Ctrl-C, once the checkpoint is saved.
    """
    rank, world = rank_world()
    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay, world)
    steps_per_epoch = max(1, len(batches) // cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(min(cfg.warmup_steps, total // 2), total,
                                                                        cfg.min_lr_ratio))
    position = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "seconds": 0.0}
    if cfg.resume:
        position = checkpoint.load(out / "checkpoint", wrapper, optimizer, scheduler)

    def micro_batches():
        epoch, b = position["epoch"], position["batch"]
        while True:
            for batch in batches.epoch(epoch, b):
                b += 1
                yield epoch, b, batch
            epoch, b = epoch + 1, 0

    def evaluate() -> dict[str, float]:
        wrapper.eval()
        sums: dict[str, torch.Tensor] = {}
        n = torch.zeros((), device=device)
        with torch.no_grad(), autocast(device):
            for batch in val_batches.epoch(0):
                batch = {k: v.to(device) for k, v in batch.items()}
                loss, extra = _split_output(wrapper(**batch))
                for name, value in {"loss": loss, **extra}.items():
                    sums[name] = sums.get(name, 0) + value.detach().float()
                n += weight(batch)
        names = sorted(sums)
        totals = torch.stack([sums[k] for k in names] + [n])
        if world > 1:
            dist.all_reduce(totals)
        wrapper.train()
        return {f"val_{k}": float(totals[i] / totals[-1].clamp(min=1)) for i, k in enumerate(names)}

    metrics = Metrics(out, total, position["step"], show=cfg.progress and rank == 0, write=rank == 0)
    stream = micro_batches()
    # The held-out loss before any training, for the summary's before/after.
    val_before = evaluate() if val_batches is not None and position["step"] == 0 else None
    start_time = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while position["step"] < total:
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            lr = scheduler.get_last_lr()[0]
            means, tokens, grad_norm = train_step(wrapper, [m[2] for m in micro], optimizer, params, device=device,
                                                  grad_clip=cfg.grad_clip, weight=weight, world=world)
            scheduler.step()
            position.update(step=position["step"] + 1, epoch=micro[-1][0], batch=micro[-1][1],
                            tokens=position["tokens"] + tokens)
            seconds = time.perf_counter() - t0
            position["seconds"] += seconds
            record = {"step": position["step"], **means,
                      "lr": lr, "tokens": tokens, "tokens_per_s": tokens / seconds,
                      "grad_norm": grad_norm, "epoch": micro[-1][0]}
            end_of_epoch = micro[-1][1] == len(batches) or position["step"] == total
            if val_batches is not None and ((cfg.val_every and position["step"] % cfg.val_every == 0)
                                            or (not cfg.val_every and end_of_epoch)):
                record.update(evaluate())
            metrics.log(record)
            if on_step is not None:
                on_step(record)
            if cfg.save_every and position["step"] % cfg.save_every == 0:
                checkpoint.save(out / "checkpoint", wrapper, optimizer, scheduler, dict(position))
    except KeyboardInterrupt:
        metrics.close()
        checkpoint.save(out / "checkpoint", wrapper, optimizer, scheduler, dict(position))
        if rank == 0:
            print(f"interrupted at step {position['step']}: checkpoint saved in {out / 'checkpoint'}; "
                  "continue with --resume", flush=True)
        raise
    metrics.close()
    checkpoint.save(out / "checkpoint", wrapper, optimizer, scheduler, dict(position))
    return {"position": position, "val_before": val_before,
            "wall_seconds": round(time.perf_counter() - start_time, 2),
            "trainable_parameters": sum(p.numel() for p in params) * world,
            "peak_memory_bytes": peak_memory(device)}
