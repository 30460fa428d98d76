"""The SFT recipe's settings: one dataclass, read from a YAML file and/or keyword arguments.

`herd train sft --config FILE.yaml --lr 1e-4` reads the file, then lets the command line override
it; the Python API (`llamaherd.train.sft(...)`) takes the same keys. An unknown key is an error
that lists the valid ones. Recipes shipped in the package (`herd train --list`) are such files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import HerdError

METHODS = ("full", "lora", "qlora")

@dataclass
class SFTConfig:
    model: str = ""  # model name in the store, a .gguf file, or a HF / Meta directory
    data: str = ""  # training JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...} per line
    out: str = ""  # output directory (checkpoints, metrics.jsonl, loss.png, the trained model or adapter)
    method: str = "lora"  # full | lora | qlora (LoRA over the GGUF's quantized blocks)
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    lr: float = 2e-4
    warmup_steps: int = 10  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    batch_size: int = 4  # sequences per process per micro-batch; global = batch x processes x grad_accum
    grad_accum: int = 1
    max_seq_len: int = 512
    packing: bool = True  # several examples per sequence, with document masks
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v,o,gate,up,down"
    seed: int = 0
    val_data: str | None = None  # held-out JSONL
    val_split: float = 0.0  # or this fraction of the training conversations held out
    val_every: int = 0  # evaluate every N steps (0: at the end of each epoch and of training)
    save_every: int = 0  # checkpoint every N steps (always at the end and on Ctrl-C)
    resume: bool = False  # continue from OUT/checkpoint
    activation_checkpointing: bool = False  # recompute each block in the backward (less memory)
    compile: bool = False  # torch.compile each block (on CUDA: faster steps after a compile of ~a minute)
    loss_chunk: int = 8192  # vocabulary rows per cross-entropy chunk
    device: str | None = None  # default: cuda when available, else cpu
    progress: bool = True  # the progress bar

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if self.method not in METHODS:
            raise HerdError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("epochs", "batch_size", "grad_accum", "max_seq_len", "lora_rank", "loss_chunk"):
            if getattr(self, name) < 1:
                raise HerdError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise HerdError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.lr <= 0:
            raise HerdError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.val_split < 1:
            raise HerdError(f"val_split must be in [0, 1), got {self.val_split}")
        if self.method != "full":
            from .lora import parse_targets

            parse_targets(self.lora_targets)
        if not 0 <= self.lora_dropout < 1:
            raise HerdError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

def make_config(values: dict[str, Any], cls: type = SFTConfig):
    """A `cls` (an `SFTConfig`, or another recipe's dataclass of the same kind) from a dict;
    HerdError for an unknown key (listing the valid ones) or a bad value."""
    types = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise HerdError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(types)}")
    clean = {}
    for key, value in values.items():
        kind = types[key]
        try:
            if value is None or kind == "str | None":
                clean[key] = value if value is None else str(value)
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError
                clean[key] = value
            elif kind in ("int", "int | None"):
                if isinstance(value, bool) or float(value) != int(value):
                    raise ValueError
                clean[key] = int(value)
            elif kind == "float":
                clean[key] = float(value)
            else:
                clean[key] = str(value)
        except (TypeError, ValueError):
            raise HerdError(f"config key {key!r}: bad value {value!r} (expected {kind})") from None
    return cls(**clean)

def read_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe file's keys (a YAML mapping); HerdError if it is missing or not a mapping."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise HerdError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise HerdError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HerdError(f"{path} must hold a mapping of config keys")
    return data

def recipes() -> dict[str, str]:
    """Shipped recipe name -> its first comment line (what it does)."""
    out = {}
    for f in sorted(resources.files("llamaherd.train.recipes").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            first = f.read_text(encoding="utf-8").splitlines()[0]
            out[f.name.removesuffix(".yaml")] = first.lstrip("# ").strip()
    return out

def recipe_text(name: str) -> str:
    """The YAML of a shipped recipe; HerdError naming the known ones."""
    known = recipes()
    if name not in known:
        raise HerdError(f"unknown recipe {name!r}; known: {', '.join(known)}")
    return (resources.files("llamaherd.train.recipes") / f"{name}.yaml").read_text(encoding="utf-8")
