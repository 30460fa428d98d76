"""A LoRA `herd train` output over a tiny random Llama, for the tests of what is done with one
(test_lora_adapters: GGUF LoRA export and ADAPTER; test_llama_cpp_peer: the exports in llama.cpp)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch


def lora_training_output(root: Path, tokenizer, targets: str, rank: int, alpha: float,
                         init: Callable | None = None) -> Path:
    """root/base: a tiny random Llama as a Hugging Face directory with `tokenizer`; root/run: a LoRA
    training output over it (train.json naming the base, adapter/ in PEFT's format, B non-zero so the
    update shows). `init(hf_model)` may redraw the base's weights before they are saved.

    Returns:
        root/run.
    """
    import transformers

    from llamaherd.export.hf import save_peft, save_tokenizer
    from llamaherd.train.lora import adapter_state_dict, lora_llama3, parse_targets
    from llamaherd.weights import build_model
    from llamaherd.weights.hf import load_hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.n_words, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(config)
    if init is not None:
        init(hf)
    base = root / "base"
    hf.save_pretrained(base)
    save_tokenizer(tokenizer, base)
    model = build_model(*load_hf(base)[:2])
    lora_llama3(model, targets, rank=rank, alpha=alpha)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.3)
    run = root / "run"
    save_peft(adapter_state_dict(model), model.args, parse_targets(targets), rank, alpha, 0.0, str(base),
              run / "adapter")
    (run / "train.json").write_text(json.dumps({"model_path": str(base), "method": "lora"}))
    return run
