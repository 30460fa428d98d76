"""A model's details (architecture, size, context, quantization, template) without loading it.

`herd list` and `herd show` must answer instantly, so the store computes these once, when a model
is pulled or created, from the GGUF header or `config.json` / `params.json`, and keeps them in the
manifest's config blob, reading a GGUF file's header with `formats.gguf.GGUFFile`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ModelArgs
from ..errors import FormatError, HerdError

def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    """(metadata, tensor names) of a GGUF file; `FormatError` if it is not one."""
    from ..formats.gguf import GGUFFile  # numpy only: reading details never imports torch

    f = GGUFFile(path)
    return f.metadata, [t.name for t in f.tensors]


def _human_params(n: int) -> str:
    """A parameter count as Ollama shows it: "134.52M", "8.03B"."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _gguf_quantization(meta: dict[str, Any]) -> str:
    file_type = meta.get("general.file_type")
    if file_type is None:
        return "unknown"
    try:
        from gguf import LlamaFileType

        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ImportError, ValueError):
        return f"file type {file_type}"


def gguf_details(path: Path) -> dict[str, Any]:
    """Details of a GGUF model file (see `model_details`)."""
    meta, names = read_gguf_header(path)
    arch = meta.get("general.architecture", "unknown")
    details: dict[str, Any] = {"format": "gguf", "family": arch, "architecture": arch,
                               "quantization": _gguf_quantization(meta)}
    if isinstance(meta.get("general.license"), str):
        details["license"] = meta["general.license"]
    if isinstance(meta.get("tokenizer.chat_template"), str):
        details["chat_template"] = meta["tokenizer.chat_template"]
    try:
        args = ModelArgs.from_gguf(meta, set(names))
    except FormatError:  # not a model llamaherd runs: store it, say what it is, `run` will refuse it
        return details
    return {**details, **_args_details(args)}


def _args_details(args: ModelArgs) -> dict[str, Any]:
    n = args.n_params
    return {"parameter_count": n, "parameter_size": _human_params(n), "context_length": args.max_seq_len,
            "embedding_length": args.dim, "block_count": args.n_layers, "head_count": args.n_heads,
            "head_count_kv": args.n_kv_heads}


def _dtype_name(dtype: str | None) -> str:
    names = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
    return names.get(str(dtype), str(dtype).upper() if dtype else "unknown")


def hf_details(directory: Path) -> dict[str, Any]:
    """Details of a Hugging Face model directory (`config.json`)."""
    config = json.loads((directory / "config.json").read_text())
    details: dict[str, Any] = {"format": "safetensors", "family": config.get("model_type", "unknown"),
                               "architecture": config.get("model_type", "unknown"),
                               "quantization": _dtype_name(config.get("torch_dtype") or config.get("dtype"))}
    tok_config = directory / "tokenizer_config.json"
    if tok_config.is_file():
        template = json.loads(tok_config.read_text()).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            details["chat_template"] = template
    elif (directory / "chat_template.jinja").is_file():
        details["chat_template"] = (directory / "chat_template.jinja").read_text()
    try:
        return {**details, **_args_details(ModelArgs.from_hf_config(config))}
    except FormatError:
        return details


def meta_details(directory: Path) -> dict[str, Any]:
    """Details of a Meta checkpoint directory (`params.json`)."""
    details = {"format": "meta", "family": "llama", "architecture": "llama", "quantization": "BF16"}
    return {**details, **_args_details(ModelArgs.from_params(directory / "params.json"))}


def model_details(path: Path) -> dict[str, Any]:
    """Details of a model file or directory, computed without loading the weights.

    Returns a dict with `format` ("gguf" | "safetensors" | "meta"), `family`, `architecture`,
    `quantization`, and for models llamaherd can run also `parameter_count`, `parameter_size`
    ("134.52M"), `context_length`, `embedding_length`, `block_count`, `head_count`, `head_count_kv`;
    `chat_template` and `license` when the files carry them.
    """
    try:
        if path.is_dir():
            if (path / "config.json").is_file():
                return hf_details(path)
            if (path / "params.json").is_file():
                return meta_details(path)
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return gguf_details(ggufs[0])
            raise FormatError(f"{path} holds no model: expected config.json (Hugging Face), params.json (Meta) "
                              "or one .gguf file")
        return gguf_details(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HerdError(f"cannot read the model at {path}: {e}") from None
