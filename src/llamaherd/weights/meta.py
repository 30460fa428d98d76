"""Meta's original checkpoints: `params.json` + `consolidated.00.pth` (… `consolidated.NN.pth` for
model-parallel shards). Loaded with `weights_only=True`: no pickled code from a user's file ever runs."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import FormatError
from .keymaps import FROM_META, map_key

# How Meta's model-parallel layers split their weights across shards (fairscale): column-parallel
# layers along the output dim (0), row-parallel ones along the input dim (1), the vocabulary-parallel
# embedding along the vocabulary (0); norms are replicated.
_SHARD_DIM = {
    "tok_embeddings": 0, "output": 0,
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
    "wo": 1, "w2": 1,
}


def _shard_dim(key: str) -> int | None:
    return _SHARD_DIM.get(key.split(".")[-2])


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path} is not a valid PyTorch checkpoint (or holds more than tensors): {first}") from None


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state dict from Meta's model-parallel shards."""
    if len(shards) == 1:
        return dict(shards[0])
    merged = {}
    for key in shards[0]:
        dim = _shard_dim(key)
        parts = [s[key] for s in shards]
        merged[key] = parts[0] if dim is None or parts[0].ndim < 2 else torch.cat(parts, dim=dim)
    return merged


def load_meta(directory: str | Path, dtype: torch.dtype | None = torch.float32):
    """Read a Meta checkpoint directory: returns (args, state_dict, params)."""
    directory = Path(directory)
    try:
        params = json.loads((directory / "params.json").read_text())
    except FileNotFoundError:
        raise FormatError(f"{directory} has no params.json") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{directory / 'params.json'} is not valid JSON: {e}") from None
    args = ModelArgs.from_params(params)
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise FormatError(f"no consolidated.*.pth weights in {directory}")
    raw = merge_shards([_load_pth(f) for f in files])
    state_dict = {}
    for name, tensor in raw.items():
        key = map_key(name, FROM_META)
        if key is not None:
            state_dict[key] = tensor if dtype is None else tensor.to(dtype)
    if "output.weight" not in state_dict:
        args = replace(args, tie_embeddings=True)
    return args, state_dict, params
