"""GGUF output: a merged model that llama.cpp (and herd, and Ollama) load unchanged.

Written with the `gguf` package's `GGUFWriter` (llama.cpp's own Python writer): the `llama`
architecture keys, the tokenizer (`tokenizer.ggml.*`, copied from the base GGUF when there is one,
otherwise rebuilt from tokenizer.json) and the chat template in the metadata. Tensors keep Meta's
interleaved q/k layout, which is GGUF's. Quantization (`gguf.quants.quantize`, llama.cpp's
reference rounding): f32, f16, q8_0, or q4_0 (blocks as q4_0, the embedding and output as q8_0,
as they show most in the logits); q4_k is llama.cpp's Q4_K_M mix (`quantize.blocks.scheme_type`);
norms always stay f32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelArgs
from ..errors import HerdError
from ..weights.keymaps import FROM_GGUF

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k")
TO_GGUF = {v: k for k, v in FROM_GGUF.items() if v is not None}
# GGUF token types (llama.cpp `llama_token_type`)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def gguf_name(meta_name: str) -> str:
    parts = meta_name.split(".")
    if parts[0] == "layers":
        return TO_GGUF["layers.{}." + ".".join(parts[2:])].replace("{}", parts[1])
    return TO_GGUF[meta_name]


def tokenizer_fields(tokenizer, base_metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The `tokenizer.*` metadata: the base GGUF's own when given, else rebuilt from the BPE model."""
    if base_metadata and base_metadata.get("tokenizer.ggml.tokens"):
        fields = {k: v for k, v in base_metadata.items() if k.startswith("tokenizer.")}
        if tokenizer.chat_template:
            fields["tokenizer.chat_template"] = tokenizer.chat_template
        return fields
    model = getattr(tokenizer, "model", None)
    if model is None or not hasattr(model, "to_str"):
        raise HerdError("only byte-level BPE tokenizers can be written to GGUF")
    spec = json.loads(model.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [""] * tokenizer.n_words
    for text, i in vocab.items():
        tokens[i] = text
    types = [NORMAL] * len(tokens)
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    pre_json = json.dumps(spec.get("pre_tokenizer"))
    pre = "smollm" if '"Digits"' in pre_json else "llama-bpe" if "(?i:'s|'t|'re" in pre_json else "gpt2"
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
              "tokenizer.ggml.add_bos_token": bool(tokenizer.add_bos)}
    if tokenizer.bos_id is not None:
        fields["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
    if tokenizer.eos_id is not None:
        fields["tokenizer.ggml.eos_token_id"] = tokenizer.eos_id
    if tokenizer.chat_template:
        fields["tokenizer.chat_template"] = tokenizer.chat_template
    return fields


def _add_field(writer, key: str, value: Any) -> None:
    import gguf

    setters = {
        "tokenizer.ggml.model": writer.add_tokenizer_model, "tokenizer.ggml.pre": writer.add_tokenizer_pre,
        "tokenizer.ggml.tokens": writer.add_token_list, "tokenizer.ggml.token_type": writer.add_token_types,
        "tokenizer.ggml.merges": writer.add_token_merges, "tokenizer.ggml.scores": writer.add_token_scores,
        "tokenizer.chat_template": writer.add_chat_template,
    }
    if key in setters:
        setters[key](list(value) if isinstance(value, (list, tuple)) else value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise HerdError(f"cannot write metadata {key!r} of type {type(value).__name__} to GGUF ({gguf.__name__})")


def _tensor_type(name: str, tensor: torch.Tensor, quant: str, n_layers: int = 0):
    from gguf import GGMLQuantizationType as Q

    if quant == "q4_k" and tensor.ndim == 2 and tensor.shape[-1] % 32 == 0:
        from ..quantize.blocks import scheme_type

        return scheme_type(quant, name.removesuffix(".weight"), tensor.shape[-1], n_layers)
    if tensor.ndim == 1 or quant == "f32":
        return Q.F32
    if quant == "f16" or tensor.shape[-1] % 32:
        return Q.F16
    if quant == "q4_0" and name.startswith("layers."):
        return Q.Q4_0
    return Q.Q8_0


def save_gguf(state_dict: dict[str, torch.Tensor], args: ModelArgs, tokenizer, out: str | Path,
              quant: str = "f16", name: str = "llamaherd fine-tune",
              base_metadata: dict[str, Any] | None = None) -> Path:
    """Write a `llama` GGUF file.

    Args:
        state_dict: float weights in Meta's names (LoRA merged).
        args: the model's shape.
        tokenizer: its tokenizer.
        out: the .gguf path.
        quant: f32 | f16 | q8_0 | q4_0.
        name: general.name.
        base_metadata: the base model's GGUF metadata, to copy its tokenizer fields exactly.
    Returns:
        The path.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    if quant not in QUANTS:
        raise HerdError(f"unknown quantization {quant!r}; valid: {', '.join(QUANTS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside it, then renamed over it: a model loaded from `out` maps the old file's pages
    # (quantize.linear.file_bytes), which must not change under it.
    part = out.with_name(f"{out.name}.partial{os.getpid()}")
    writer = None
    try:  # a failure (a quantize error, a full disk, Ctrl-C) leaves no partial file behind
        writer = gguf.GGUFWriter(str(part), "llama")
        writer.add_name(name)
        writer.add_context_length(args.max_seq_len)
        writer.add_embedding_length(args.dim)
        writer.add_block_count(args.n_layers)
        writer.add_feed_forward_length(args.hidden_dim)
        writer.add_head_count(args.n_heads)
        writer.add_head_count_kv(args.n_kv_heads)
        writer.add_rope_dimension_count(args.head_dim)
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
        writer.add_layer_norm_rms_eps(args.norm_eps)
        writer.add_rope_freq_base(args.rope_theta)
        writer.add_vocab_size(args.vocab_size)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                              "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M}[quant])
        for key, value in tokenizer_fields(tokenizer, base_metadata).items():
            _add_field(writer, key, value)

        tensors = dict(state_dict)
        if args.tie_embeddings:
            tensors.pop("output.weight", None)  # GGUF ties by leaving output.weight out
        if args.rope_scaling is not None:  # Llama 3.1: per-frequency divisors, as llama.cpp's converter writes
            from ..model import rope_frequencies

            base = rope_frequencies(args.head_dim, args.rope_theta)
            tensors["rope_freqs.weight"] = base / rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
        for key in sorted(tensors, key=_order):
            t = tensors[key].detach().float().cpu()
            gname = "rope_freqs.weight" if key == "rope_freqs.weight" else gguf_name(key)
            tied = key == "tok_embeddings.weight" and args.tie_embeddings  # also the output projection: its type
            qtype = _tensor_type("output.weight" if tied else key, t, quant, args.n_layers)
            data = t.numpy()
            if qtype == Q.F32:
                writer.add_tensor(gname, data.astype(np.float32))
            elif qtype == Q.F16:
                writer.add_tensor(gname, data.astype(np.float16))
            else:
                from ..quantize.blocks import quantize

                writer.add_tensor(gname, quantize(t, qtype).numpy(), raw_dtype=qtype)  # bytes; shape from them
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        if writer is not None:
            writer.close()
        part.unlink(missing_ok=True)
        raise
    os.replace(part, out)
    return out


def _order(name: str) -> tuple:
    """llama.cpp's order: embedding, then block by block, then the final norm and output."""
    if name.startswith("layers."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith(("tok_embeddings", "rope_freqs")) else 2, 0, name)
