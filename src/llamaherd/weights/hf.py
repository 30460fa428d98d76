"""Hugging Face checkpoints: `config.json` + `model.safetensors` (or sharded `model-*.safetensors`
with `model.safetensors.index.json`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import FormatError
from .keymaps import FROM_HF, map_key, permute_hf_to_meta


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a HF model directory, from the shard index when there is one."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index} is not a valid safetensors index: {e}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FormatError(f"no .safetensors weights in {directory}")
    for f in files:
        if not f.exists():
            raise FormatError(f"missing weight shard {f}")
    return files


def load_hf(directory: str | Path, dtype: torch.dtype | None = torch.float32):
    """Read a HF Llama directory: returns (args, state_dict in Meta names, config)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").exists() else None
    if config is None:
        raise FormatError(f"{directory} has no config.json")
    args = ModelArgs.from_hf_config(config)
    state_dict = {}
    for file in safetensors_files(directory):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    key = map_key(name, FROM_HF)
                    if key is None:
                        continue
                    tensor = f.get_tensor(name)
                    if key.endswith("attention.wq.weight"):
                        tensor = permute_hf_to_meta(tensor, args.n_heads)
                    elif key.endswith("attention.wk.weight"):
                        tensor = permute_hf_to_meta(tensor, args.n_kv_heads)
                    state_dict[key] = tensor if dtype is None else tensor.to(dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FormatError(f"{file} is not a valid safetensors file (truncated or corrupt?): {e}") from None
    return args, state_dict, config
