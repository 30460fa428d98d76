"""Checkpoint loading: every format becomes one canonical state dict in Meta's names.

    load_checkpoint(path) -> Checkpoint(args, state_dict, tokenizer, ...)
    build_model(checkpoint) -> Transformer with those weights

`path` is a `.gguf` file, a Hugging Face directory (`config.json`) or a Meta directory
(`params.json`); the kind is recognised from what is there, never from the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelArgs
from ..errors import FormatError, HerdError
from ..formats import GGUF_MAGIC


@dataclass
class Checkpoint:
    args: ModelArgs
    state_dict: dict[str, torch.Tensor]
    tokenizer: Any  # a llamaherd.tokenizer.Tokenizer
    format: str  # "gguf" | "hf" | "meta"
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    quantized: dict[str, str] = field(default_factory=dict)  # module name -> its kind (see load_gguf)


def detect_format(path: Path) -> str:
    if not path.exists():
        raise HerdError(f"{path} does not exist")
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf"
        if (path / "params.json").exists():
            return "meta"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        raise FormatError(f"{path} holds no model: expected config.json (Hugging Face), "
                          "params.json (Meta) or one .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return "gguf"
    raise FormatError(f"{path} is not a GGUF file (bad magic {magic!r}) nor a model directory")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, quantized: bool = False,
                    quantize: str | None = None, gpu: bool = False, float_blocks: bool = False) -> Checkpoint:
    """Read weights, config and tokenizer from any supported format, and check them.

    `quantized`: keep a GGUF file's quantized weights quantized (CPU inference; with `gpu`, its
    4-bit weights in torch's int4 layers and the rest in `dtype`: see `load_gguf`); other formats
    and float GGUF tensors are unaffected.
    `quantize`: q8_0 | q4_0 | q4_k: quantize the weights at load, whatever the format, into the GGUF
    blocks of that scheme (`weights.quantized`), for the native CPU kernels.
    `float_blocks`: a Hugging Face or Meta checkpoint stored in f16 / bf16 keeps those weights as
    stored, for the native CPU kernels' float path (`weights.quantized.float_blocks_state_dict`),
    where they build; other checkpoints load as without it.
    """
    if quantize is not None:
        from ..quantize.blocks import check_scheme

        quantize = check_scheme(quantize)  # a bad name fails before anything is read
        dtype, quantized = torch.float32, False
    from ..tokenizer import load_tokenizer
    from ..tokenizer.bpe import tokenizer_from_gguf

    path = Path(path).expanduser()
    kind = detect_format(path)
    kinds: dict[str, str] = {}
    if kind == "gguf":
        from .gguf import load_gguf

        if path.is_dir():
            path = sorted(path.glob("*.gguf"))[0]
        args, sd, meta, kinds = load_gguf(path, dtype, quantized, gpu)
        tokenizer = tokenizer_from_gguf(meta)
    elif kind == "hf":
        from .hf import load_hf

        args, sd, meta = load_hf(path, None if float_blocks else dtype)
        tokenizer = load_tokenizer(path)
    else:
        from .meta import load_meta

        args, sd, meta = load_meta(path, None if float_blocks else dtype)
        tok_file = next((p / "tokenizer.model" for p in (path, path.parent) if (p / "tokenizer.model").exists()), None)
        if tok_file is None:
            raise HerdError(f"no tokenizer found for {path}: expected tokenizer.model beside params.json")
        tokenizer = load_tokenizer(tok_file)
    if float_blocks and kind != "gguf":
        sd, kinds = _float_blocks(args, sd, dtype)
    if quantize is not None:
        from .quantized import quantize_state_dict

        check_state_dict(sd, args)
        sd, kinds = quantize_state_dict(args, sd, quantize)
    check_state_dict(sd, args, kinds)
    return Checkpoint(args, sd, tokenizer, kind, path, meta, kinds)


def _float_blocks(args: ModelArgs, sd: dict[str, torch.Tensor], dtype: torch.dtype):
    """A float checkpoint read as stored: its 16-bit weights kept for the native kernels when they
    build (`float_blocks_state_dict`), else every tensor in `dtype` as without `float_blocks`."""
    from ..quantize import native
    from .quantized import FLOAT_BLOCK_DTYPES, float_blocks_state_dict

    check_state_dict(sd, args)
    if sd["tok_embeddings.weight"].dtype in FLOAT_BLOCK_DTYPES and native.available():
        return float_blocks_state_dict(args, sd)
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in sd.items()}, {}


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a model of `args` needs (output omitted when tied)."""
    from ..model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        shapes.pop("output.weight")
    return shapes


def check_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs, quantized: dict[str, str] | None = None) -> None:
    """FormatError naming the first missing, unexpected or wrongly shaped tensor.

    Modules in `quantized` hold packed buffers whose shapes the packer already checked.
    """
    from ..model import FUSED_PROJECTIONS

    modules = set(quantized or ())
    for name in quantized or ():  # a fused wqkv / w13 replaces its parts
        parent, _, child = name.rpartition(".")
        modules.update(f"{parent}.{m}" for m in FUSED_PROJECTIONS.get(child, ()))

    def packed(name):  # a buffer of a quantized module, or a tensor such a module replaces
        return any(name.startswith(m + ".") for m in modules)

    expected = expected_shapes(args)
    for name in expected:
        if name not in sd and not packed(name):
            raise FormatError(f"checkpoint is missing tensor {name!r}")
    for name, tensor in sd.items():
        if packed(name):
            continue
        if name not in expected:
            raise FormatError(f"unexpected tensor {name!r} in checkpoint")
        if tuple(tensor.shape) != expected[name]:
            raise FormatError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected[name]}")


def build_model(args: ModelArgs, state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                quantized: dict[str, str] | None = None):
    """A `Transformer` holding `state_dict` (assigned, not copied), in eval mode.

    `quantized` names the modules whose buffers in `state_dict` are quantized (see `load_gguf`).
    Int4 layers are packed into their kernel's layout on `device` (`Int4Linear.pack`); GGUF blocks
    are reordered in place for the CPU kernels (`repack_block_layers`): the model takes over those
    buffers, and `state_dict` is not to be built from again.
    """
    from ..model import Transformer
    from ..quantize.linear import pack_int4_layers, repack_block_layers, swap_quantized_modules

    with torch.device("meta"):
        model = Transformer(args)
    if quantized:
        swap_quantized_modules(model, quantized)
    sd = dict(state_dict)
    if args.tie_embeddings and "output.weight" not in sd and "output" not in (quantized or {}):
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, assign=True, strict=True)
    if args.tie_embeddings and not quantized:  # assign=True replaced both parameters; share one again
        model.output.weight = model.tok_embeddings.weight
    if quantized:
        repack_block_layers(model)
    model.init_rope()  # built on the meta device with the rest
    model = model.to(device).eval()
    if quantized:
        pack_int4_layers(model)  # the layout is the device's own kernel's
    return model
