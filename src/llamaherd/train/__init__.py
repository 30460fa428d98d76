"""Fine-tuning: components (data, LoRA, chunked cross-entropy, checkpoints, metrics) and the SFT
recipe that wires them (`sft`). `herd train sft ...` and `torchrun -m llamaherd.train sft ...`
run the same recipe."""

from __future__ import annotations

from typing import Any

__all__ = ["sft", "SFTConfig"]


def sft(config=None, **kwargs: Any) -> dict:
    """Supervised fine-tuning; see `llamaherd.train.finetune.sft` (keys: `SFTConfig`)."""
    from .finetune import sft as _sft

    return _sft(config, **kwargs)


def __getattr__(name: str):
    if name == "SFTConfig":
        from .config import SFTConfig

        return SFTConfig
    raise AttributeError(name)
