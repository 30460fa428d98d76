"""Hugging Face outputs: a model directory `transformers` loads, and a PEFT adapter directory.

    save_hf(state_dict, args, tokenizer, out)      config.json, model.safetensors, tokenizer.json,
                                                   tokenizer_config.json, generation_config.json
    save_peft(adapters, args, lora, base, out)     adapter_config.json, adapter_model.safetensors

Meta's names become HF's through the inverse of `weights/keymaps.FROM_HF`, and q/k rows go back
to HF's rotate-half layout (`permute_meta_to_hf`). For a LoRA update on q or k only B's rows are
permuted: P (B A) = (P B) A.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import HerdError
from ..weights.keymaps import FROM_HF, permute_meta_to_hf

TO_HF = {v: k for k, v in FROM_HF.items() if v is not None}


def hf_name(meta_name: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    m = re.match(r"^layers\.(\d+)\.(.*)$", meta_name)
    key = f"layers.{{}}.{m.group(2)}" if m else meta_name
    if key not in TO_HF:
        raise HerdError(f"no Hugging Face name for tensor {meta_name!r}")
    return TO_HF[key].replace("{}", m.group(1)) if m else TO_HF[key]


def hf_config(args: ModelArgs, tokenizer=None, dtype: str = "float32") -> dict:
    """A `LlamaForCausalLM` config.json for `args`."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype,
    }
    if args.rope_scaling is not None:
        s = args.rope_scaling
        config["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                  "high_freq_factor": s.high_freq_factor,
                                  "original_max_position_embeddings": s.original_max_seq_len}
    if tokenizer is not None:
        config["bos_token_id"], config["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id
    return config


def hf_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta-named float tensors -> HF names and layout (a tied output is left out, as HF saves it)."""
    out = {}
    for name, t in state_dict.items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        if name.endswith("attention.wq.weight"):
            t = permute_meta_to_hf(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_meta_to_hf(t, args.n_kv_heads)
        out[hf_name(name)] = t.detach().contiguous()
    return out


def save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.json and tokenizer_config.json (BOS, EOS, add_bos, the chat template)."""
    model = getattr(tokenizer, "model", None)
    if model is None or not hasattr(model, "save"):
        raise HerdError("only byte-level BPE tokenizers (GGUF or tokenizer.json) can be exported")
    model.save(str(out / "tokenizer.json"))

    def text(i):
        return None if i is None else tokenizer.token_bytes(i).decode("utf-8", "replace")

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": text(tokenizer.bos_id),
              "eos_token": text(tokenizer.eos_id), "add_bos_token": bool(tokenizer.add_bos),
              "clean_up_tokenization_spaces": False}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def save_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs, tokenizer, out: str | Path,
            dtype: torch.dtype = torch.float32) -> Path:
    """Write a Hugging Face model directory.

    Args:
        state_dict: float weights in Meta's names (e.g. a trained model's, LoRA merged).
        args: the model's shape.
        tokenizer: its tokenizer (written as tokenizer.json + tokenizer_config.json).
        out: the directory (created).
        dtype: dtype of the saved weights.
    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype) for k, v in hf_state_dict(state_dict, args).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    dtype_name = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_config(args, tokenizer, dtype_name), indent=2))
    gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(tokenizer.stop_ids) or tokenizer.eos_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    save_tokenizer(tokenizer, out)
    return out


def save_peft(adapters: dict[str, torch.Tensor], args: ModelArgs, targets: list[str], rank: int,
              alpha: float, dropout: float, base: str, out: str | Path) -> Path:
    """Write a PEFT LoRA adapter directory (`PeftModel.from_pretrained` loads it).

    Args:
        adapters: `layers.{i}.<module>.lora_a.weight` / `.lora_b.weight` tensors (see `lora.adapter_state_dict`).
        targets: short target names ("q", "v", ...).
        base: the base model's name or path (adapter_config's base_model_name_or_path).
    """
    from safetensors.torch import save_file

    from ..train.lora import TO_HF as TARGET_TO_HF

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in adapters.items():
        module, _, rest = name.rpartition(".lora_")  # "layers.0.attention.wq", "a.weight"
        if module.endswith("attention.wq") and rest.startswith("b"):
            t = permute_meta_to_hf(t, args.n_heads)
        elif module.endswith("attention.wk") and rest.startswith("b"):
            t = permute_meta_to_hf(t, args.n_kv_heads)
        hf_module = hf_name(module + ".weight").removesuffix(".weight")
        tensors[f"base_model.model.{hf_module}.lora_{rest[0].upper()}.weight"] = t.detach().float().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none",
        "target_modules": sorted(TARGET_TO_HF[t] for t in targets), "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def load_peft(directory: str | Path, args: ModelArgs) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter directory: (adapter_config, tensors in our names and layout).

    Raises:
        HerdError: not a LoRA adapter directory, or its tensors do not fit `args`.
    """
    from safetensors.torch import load_file

    from ..weights.keymaps import FROM_HF, map_key, permute_hf_to_meta

    directory = Path(directory)
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HerdError(f"{directory} is not a PEFT adapter directory (adapter_config.json: {e})") from None
    if config.get("peft_type") != "LORA":
        raise HerdError(f"{directory}: only LoRA adapters are supported (peft_type {config.get('peft_type')!r})")
    tensors = {}
    for name, t in load_file(str(directory / "adapter_model.safetensors")).items():
        m = re.match(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$", name)
        if not m:
            raise HerdError(f"{directory}: unexpected adapter tensor {name!r}")
        module = map_key(m.group(1) + ".weight", FROM_HF)
        if module is None:
            raise HerdError(f"{directory}: unexpected adapter tensor {name!r}")
        module = module.removesuffix(".weight")
        if m.group(2) == "B" and module.endswith("attention.wq"):
            t = permute_hf_to_meta(t, args.n_heads)
        elif m.group(2) == "B" and module.endswith("attention.wk"):
            t = permute_hf_to_meta(t, args.n_kv_heads)
        tensors[f"{module}.lora_{m.group(2).lower()}.weight"] = t
    return config, tensors
