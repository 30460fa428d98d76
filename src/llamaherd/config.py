"""Model hyper-parameters: one dataclass, presets, and constructors from each checkpoint format.

Importing this module does not import torch, so the CLI and the model store can read a model's
shape without paying for torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import FormatError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (see `model.precompute_rope`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 128256
    hidden_dim: int = 14336  # feed-forward inner size
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192  # the context length the model was trained for
    tie_embeddings: bool = False  # output projection shares tok_embeddings' weight
    head_dim: int | None = None  # None: dim // n_heads

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.n_heads % self.n_kv_heads:
            raise FormatError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise FormatError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def n_params(self) -> int:
        """Number of parameters (tied output counted once)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """A preset by name, e.g. `llama3.1-8b` or `smollm2-135m` (see `PRESETS`)."""
        key = name.lower()
        if key not in PRESETS:
            raise FormatError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[key]

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path) -> "ModelArgs":
        """From a Hugging Face `config.json` (a dict or its path) of a `LlamaForCausalLM`."""
        if not isinstance(config, dict):
            config = _read_json(Path(config))
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise FormatError(f"unsupported architecture {model_type!r} (llamaherd runs 'llama' models)")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise FormatError("unsupported Llama variant: attention or MLP biases")
        # transformers >= 5 moves rope_theta and rope_scaling into `rope_parameters`.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_seq_len=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type == "default":
            scaling = None
        else:
            raise FormatError(f"unsupported rope scaling type {rope_type!r}")
        try:
            return cls(
                dim=config["hidden_size"],
                n_layers=config["num_hidden_layers"],
                n_heads=config["num_attention_heads"],
                n_kv_heads=config.get("num_key_value_heads"),
                vocab_size=config["vocab_size"],
                hidden_dim=config["intermediate_size"],
                norm_eps=config.get("rms_norm_eps", 1e-5),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_seq_len=config.get("max_position_embeddings", 8192),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                head_dim=config.get("head_dim"),
            )
        except KeyError as e:
            raise FormatError(f"config.json is missing {e.args[0]!r}") from None

    @classmethod
    def from_params(cls, params: dict[str, Any] | str | Path) -> "ModelArgs":
        """From Meta's `params.json` (a dict or its path)."""
        if not isinstance(params, dict):
            params = _read_json(Path(params))
        try:
            dim = params["dim"]
            hidden = _meta_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
            scaling = None
            if params.get("use_scaled_rope"):
                scaling = RopeScaling(factor=float(params.get("rope_scaling_factor") or 8.0))
            return cls(
                dim=dim,
                n_layers=params["n_layers"],
                n_heads=params["n_heads"],
                n_kv_heads=params.get("n_kv_heads"),
                vocab_size=params["vocab_size"],
                hidden_dim=hidden,
                norm_eps=params.get("norm_eps", 1e-5),
                rope_theta=float(params.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
                max_seq_len=params.get("max_seq_len", 131072 if scaling else 8192),
                tie_embeddings=False,
            )
        except KeyError as e:
            raise FormatError(f"params.json is missing {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: set[str] | None = None) -> "ModelArgs":
        """From GGUF metadata (`{key: value}`) of a `llama` model.

        `tensor_names` tells whether an `output.weight` exists; without one the output is tied.
        """
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise FormatError(f"unsupported architecture {arch!r} (llamaherd runs 'llama' models)")

        def get(key, default=None):
            value = meta.get(f"llama.{key}", default)
            if value is None:
                raise FormatError(f"GGUF metadata is missing 'llama.{key}'")
            return value

        n_heads = int(get("attention.head_count"))
        dim = int(get("embedding_length"))
        vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
        if vocab is None:
            raise FormatError("GGUF metadata has neither 'llama.vocab_size' nor tokenizer tokens")
        # Llama 3.1 GGUF files carry their RoPE scaling as a `rope_freqs.weight` tensor, which the
        # GGUF loader turns into `rope_scaling`; metadata-declared scalings are other schemes.
        scaling_type = meta.get("llama.rope.scaling.type", "none")
        if scaling_type != "none":
            raise FormatError(f"unsupported rope scaling type {scaling_type!r}")
        rope_dim = int(meta.get("llama.rope.dimension_count", dim // n_heads))
        head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
        if rope_dim != head_dim:
            raise FormatError(f"partial rotary embeddings are not supported (rope {rope_dim} vs head {head_dim})")
        return cls(
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            hidden_dim=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            max_seq_len=int(get("context_length", 4096)),
            tie_embeddings=tensor_names is not None and "output.weight" not in tensor_names,
            head_dim=head_dim,
        )


def _meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule for the SwiGLU inner size: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from None


_LLAMA31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_LLAMA32 = replace(_LLAMA31, factor=32.0)

_llama3_8b = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336)
_llama3_70b = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672)
_smollm2 = dict(vocab_size=49152, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True)

PRESETS: dict[str, ModelArgs] = {
    "llama3-8b": _llama3_8b,
    "llama3-70b": _llama3_70b,
    "llama3.1-8b": replace(_llama3_8b, rope_scaling=_LLAMA31, max_seq_len=131072),
    "llama3.1-70b": replace(_llama3_70b, rope_scaling=_LLAMA31, max_seq_len=131072),
    "llama3.1-405b": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, hidden_dim=53248,
                               rope_scaling=_LLAMA31, max_seq_len=131072),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                             rope_scaling=_LLAMA32, max_seq_len=131072, tie_embeddings=True),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                             rope_scaling=_LLAMA32, max_seq_len=131072, tie_embeddings=True),
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, **_smollm2),
    "smollm2-360m": ModelArgs(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, **_smollm2),
    "smollm2-1.7b": ModelArgs(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192,
                              **{**_smollm2, "rope_theta": 130000.0}),
}

# Candidate Llama 3.1-style scalings, used to recognise a GGUF `rope_freqs.weight` tensor.
KNOWN_ROPE_SCALINGS = (_LLAMA31, _LLAMA32)
