"""Training checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG, data position.

One process: `OUT/checkpoint/state.pt`, written to a temporary name and renamed (a crash while
saving leaves the previous checkpoint whole), read back with `weights_only=True` (tensors, numbers
and strings only, never arbitrary pickled objects). Several processes (FSDP2): the sharded weights
and optimizer go through `torch.distributed.checkpoint` (each rank writes its shards to
`OUT/checkpoint/dcp/`), and the small rest (`meta.pt`) is written by rank 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import HerdError


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (all of them for a full fine-tune, the adapters for LoRA)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def save(directory: Path, model, optimizer, scheduler, position: dict) -> None:
    """Write the checkpoint for `position` ({"step", "epoch", "batch", ...})."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"position": position, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        meta["cuda_rng"] = torch.cuda.get_rng_state()
    if _distributed():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        model_sd = {k: v for k, v in model_sd.items() if k in _trainable_names(model)}
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / "dcp"))
        if dist.get_rank() == 0:
            _atomic_save(meta, directory / "meta.pt")
        dist.barrier()
        return
    _atomic_save({**meta, "model": trainable_state(model), "optim": optimizer.state_dict()}, directory / "state.pt")


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def exists(directory: Path) -> bool:
    return (directory / "state.pt").exists() or (directory / "meta.pt").exists()


def load(directory: Path, model, optimizer, scheduler) -> dict:
    """Restore everything `save` wrote; returns the position to continue from."""
    if not exists(directory):
        raise HerdError(f"nothing to resume: no checkpoint in {directory}")
    if _distributed():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        model_sd = {k: v for k, v in model_sd.items() if k in _trainable_names(model)}
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(directory / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_strict_off())
        meta = torch.load(directory / "meta.pt", weights_only=True)
    else:
        meta = torch.load(directory / "state.pt", weights_only=True)
        missing = set(trainable_state(model)) - set(meta["model"])
        if missing:
            raise HerdError(f"the checkpoint in {directory} does not fit this model/method "
                            f"(no {sorted(missing)[0]!r})")
        model.load_state_dict(meta["model"], strict=False)
        optimizer.load_state_dict(meta["optim"])
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(meta["rng"])
    if "cuda_rng" in meta and torch.cuda.is_available():
        torch.cuda.set_rng_state(meta["cuda_rng"])
    return meta["position"]


def _strict_off():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)
