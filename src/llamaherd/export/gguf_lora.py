"""LoRA adapters as GGUF files: llama.cpp's adapter format (`llama-cli -m base.gguf --lora FILE`,
Ollama's `ADAPTER`), written and read.

The layout is what llama.cpp's `convert_lora_to_gguf.py` writes and `llama-adapter.cpp` reads:
`general.architecture` = llama, `general.type` = adapter, `adapter.type` = lora,
`adapter.lora.alpha` (float32), and for every adapted projection two tensors named after its base
weight, `blk.N.attn_q.weight.lora_a` (rank × in) and `blk.N.attn_q.weight.lora_b` (out × rank).
The update is `B A` scaled by alpha / rank (llama.cpp: by 1 when alpha is 0). GGUF keeps q and k
in Meta's interleaved RoPE layout, which is ours, so our B rows go in as they are; from a PEFT
(Hugging Face layout) adapter they are the converter's permuted rows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FormatError, HerdError
from .gguf import gguf_name

DTYPES = ("f32", "f16")
_TENSOR = re.compile(r"^(blk\.\d+\.\w+\.weight)\.lora_(a|b)$")


def save_gguf_lora(tensors: dict[str, torch.Tensor], alpha: float, out: str | Path, dtype: str = "f32",
                   name: str = "llamaherd adapter") -> Path:
    """Write LoRA matrices as a GGUF LoRA adapter.

    Args:
        tensors: `layers.{i}.<module>.lora_a.weight` (rank × in) and `.lora_b.weight` (out × rank), in
            Meta's names and layout (`lora.adapter_state_dict`, or `hf.load_peft`'s tensors).
        alpha: LoRA alpha (the update is scaled by alpha / rank).
        out: the .gguf path.
        dtype: f32 | f16 (llama.cpp's converter: f32 by default).
        name: general.name.
    Returns:
        The path.
    """
    import gguf

    if dtype not in DTYPES:
        raise HerdError(f"a GGUF LoRA adapter is written as {' or '.join(DTYPES)}, not {dtype!r}")
    if not tensors:
        raise HerdError("the adapter has no LoRA tensors")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    np_dtype = np.float32 if dtype == "f32" else np.float16
    for key in sorted(tensors, key=_order):
        module, _, which = key.removesuffix(".weight").rpartition(".lora_")  # "layers.0.attention.wq", "a"
        data = tensors[key].detach().float().cpu().numpy().astype(np_dtype)
        writer.add_tensor(f"{gguf_name(module + '.weight')}.lora_{which}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def load_gguf_lora(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a GGUF LoRA adapter: (config with `r`, `lora_alpha`, `target_modules` (HF names) as in
    a PEFT adapter_config, tensors in our names and layout).

    Raises:
        HerdError: not a llama LoRA adapter GGUF, or tensors that do not pair up.
    """
    from ..formats.gguf import GGUFFile
    from ..quantize.ggml import dequantize
    from ..train.lora import TARGETS, TO_HF
    from ..weights.keymaps import FROM_GGUF, map_key

    path = Path(path)
    try:
        f = GGUFFile(path)
    except FormatError as e:
        raise HerdError(f"ADAPTER {path.name}: {e}") from None
    meta = f.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise HerdError(f"ADAPTER {path.name}: not a GGUF LoRA adapter (general.type {meta.get('general.type')!r}, "
                        f"adapter.type {meta.get('adapter.type')!r})")
    if meta.get("general.architecture") != "llama":
        raise HerdError(f"ADAPTER {path.name}: an adapter for {meta.get('general.architecture')!r}, not llama")
    short = {module: short for short, module in TARGETS.items()}  # "attention.wq" -> "q"
    tensors, targets, ranks = {}, set(), set()
    for t in f.tensors:
        m = _TENSOR.match(t.name)
        try:
            module = map_key(m.group(1), FROM_GGUF).removesuffix(".weight") if m else None
        except FormatError:
            module = None
        target = short.get(module.split(".", 2)[2]) if module else None
        if target is None:
            raise HerdError(f"ADAPTER {path.name}: unexpected tensor {t.name!r} in a LoRA adapter")
        w = dequantize(t.data, t.tensor_type, t.shape).float()
        tensors[f"{module}.lora_{m.group(2)}.weight"] = w
        targets.add(target)
        ranks.add(w.shape[0] if m.group(2) == "a" else w.shape[1])
    pairs = {k.rpartition(".lora_")[0] for k in tensors}
    if not tensors or len(ranks) != 1 or len(tensors) != 2 * len(pairs):
        raise HerdError(f"ADAPTER {path.name}: its lora_a/lora_b tensors do not pair up with one rank")
    rank = ranks.pop()
    alpha = float(meta.get("adapter.lora.alpha", 0.0)) or float(rank)  # llama.cpp: alpha 0 scales by 1
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(TO_HF[t] for t in targets)}, tensors


def _order(name: str) -> tuple:
    parts = name.split(".")
    return (int(parts[1]), name) if parts[0] == "layers" else (-1, name)
