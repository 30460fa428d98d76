"""Export a training output (or any model herd loads) as a merged GGUF file or a Hugging Face
directory; LoRA adapters also as a PEFT adapter directory or a GGUF LoRA adapter (llama.cpp's `--lora`).

    herd export runs/mine --format gguf --quant q8_0 -o mine.gguf
    herd export runs/mine --format hf -o mine-hf/
    herd export runs/mine --format peft -o mine-adapter/      # LoRA runs only
    herd export runs/mine --format gguf-lora -o mine-lora.gguf  # LoRA runs (or a PEFT directory)

A training output is a directory with `train.json` (see `train/finetune.py`): a full fine-tune's
`model/`, or a LoRA run's `adapter/` over the base model named in train.json, merged here into
its float weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import HerdError

FORMATS = ("gguf", "hf", "peft", "gguf-lora")


@dataclass
class Merged:
    args: Any  # ModelArgs
    state_dict: dict[str, torch.Tensor]  # float32, Meta names, LoRA merged
    tokenizer: Any
    base_metadata: dict[str, Any]  # the base GGUF's metadata ({} when the base is not a GGUF)
    name: str


def load_merged(source: str | Path) -> Merged:
    """The float weights of a training output (LoRA merged) or of any model path."""
    from ..weights import build_model, load_checkpoint

    source = Path(source)
    run_file = source / "train.json"
    if not run_file.exists():
        ckpt = load_checkpoint(source)
        return Merged(ckpt.args, ckpt.state_dict, ckpt.tokenizer, _gguf_meta(ckpt), source.name)
    run = json.loads(run_file.read_text())
    base = load_checkpoint(run["model_path"])
    if (source / "model").exists():  # a full fine-tune
        ckpt = load_checkpoint(source / "model")
        return Merged(ckpt.args, ckpt.state_dict, ckpt.tokenizer, _gguf_meta(base), source.name)
    if not (source / "adapter").exists():
        raise HerdError(f"{source} holds no trained model or adapter yet (did the run finish?)")
    model = merge_adapters(build_model(base.args, base.state_dict), [source / "adapter"])
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return Merged(base.args, sd, base.tokenizer, _gguf_meta(base), source.name)


def merge_adapters(model, adapters: list[str | Path]):
    """Merge LoRA adapters (PEFT directories or GGUF LoRA files) into a float model, one after the
    other (in place).

    Raises:
        HerdError: not a LoRA adapter, or an adapter whose shapes do not fit the model.
    """
    from ..train.lora import lora_llama3, merge_lora
    from .gguf_lora import load_gguf_lora
    from .hf import load_peft

    for adapter in map(Path, adapters):
        config, tensors = load_gguf_lora(adapter) if adapter.is_file() else (None, None)
        try:
            if config is None:
                config, tensors = load_peft(adapter, model.args)
            targets = [t.removesuffix("_proj") for t in config["target_modules"]]
            lora_llama3(model, targets, config["r"], config["lora_alpha"])
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except (RuntimeError, KeyError):  # sizes that do not fit: an adapter trained on another base
            missing, unexpected = [], ["shape"]
        if unexpected or any("lora_" in k for k in missing):
            raise HerdError(f"the adapter {adapter.name} does not fit this base model (trained on another one?)")
        merge_lora(model)
    return model


def _peft_config(adapter: Path) -> dict:
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise HerdError(f"ADAPTER {adapter.name}: not a PEFT LoRA adapter directory")
    return config


def load_with_adapters(path: str | Path, adapters: list[str | Path], device: str = "cpu", cls=None):
    """A `Llama` (or `cls`, e.g. the engine's `LoadedModel`) of the model at `path` with LoRA
    adapters (PEFT directories or GGUF LoRA files) merged into its float weights (the quantized
    fast path does not apply: the merged weights are float32)."""
    if cls is None:
        from ..llm import Llama as cls
    from ..weights import build_model, load_checkpoint
    from .gguf_lora import load_gguf_lora

    for adapter in map(Path, adapters):  # fail on a bad adapter before loading the base
        if adapter.is_file():
            load_gguf_lora(adapter)
        elif adapter.is_dir():
            _peft_config(adapter)
        else:
            raise HerdError(f"ADAPTER {adapter.name}: no such file or directory")
    ckpt = load_checkpoint(path)
    model = merge_adapters(build_model(ckpt.args, ckpt.state_dict), adapters).to(device).eval()
    return cls(model, ckpt.tokenizer, path=ckpt.path, format=ckpt.format, metadata=ckpt.metadata)


def _gguf_meta(ckpt) -> dict[str, Any]:
    return dict(ckpt.metadata) if ckpt.format == "gguf" else {}


def export(source: str | Path, format: str, out: str | Path, quant: str | None = None) -> Path:
    """Write `source` (a training output or a model path) as `format` to `out`; returns `out`.
    `quant`: gguf f32 | f16 | q8_0 | q4_0 (default f16); gguf-lora f32 | f16 (default f32)."""
    from .gguf import QUANTS, save_gguf
    from .hf import save_hf

    if format not in FORMATS:
        raise HerdError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise HerdError(f"{source} does not exist")
    if format == "peft":
        adapter = source / "adapter"
        if not (adapter / "adapter_config.json").exists():
            raise HerdError(f"{source} is not a LoRA training output (no adapter/)")
        shutil.copytree(adapter, out, dirs_exist_ok=True)
        return out
    if format == "gguf-lora":
        return _export_gguf_lora(source, out, quant or "f32")
    quant = quant or "f16"
    if format == "gguf" and quant not in QUANTS:
        raise HerdError(f"unknown quantization {quant!r}; valid: {', '.join(QUANTS)}")
    merged = load_merged(source)
    if format == "gguf":
        return save_gguf(merged.state_dict, merged.args, merged.tokenizer, out, quant, merged.name,
                         merged.base_metadata)
    return save_hf(merged.state_dict, merged.args, merged.tokenizer, out)


def _export_gguf_lora(source: Path, out: Path, dtype: str) -> Path:
    """A LoRA training output's adapter (or a PEFT adapter directory whose base model is on this
    disk) as a GGUF LoRA adapter file."""
    from ..weights import load_checkpoint
    from .gguf_lora import DTYPES, save_gguf_lora
    from .hf import load_peft

    if dtype not in DTYPES:
        raise HerdError(f"a GGUF LoRA adapter is written as {' or '.join(DTYPES)}, not {dtype!r}")
    adapter = source / "adapter" if (source / "train.json").exists() else source
    config = _peft_config(adapter) if (adapter / "adapter_config.json").exists() else None
    if config is None:
        raise HerdError(f"{source} is neither a LoRA training output nor a PEFT LoRA adapter directory")
    if (source / "train.json").exists():
        base = json.loads((source / "train.json").read_text())["model_path"]
    else:
        base = config.get("base_model_name_or_path") or ""
        if not Path(base).exists():
            raise HerdError(f"{source}: its base model {base!r} is not on this disk (export the training output "
                            "directory instead)")
    args = load_checkpoint(base).args  # the heads, to put q/k rows back into GGUF's layout
    _, tensors = load_peft(adapter, args)
    return save_gguf_lora(tensors, config["lora_alpha"], out, dtype, name=f"{source.name} (LoRA)")
