"""LoRA (Hu et al., 2021): a frozen linear layer plus a trainable low-rank update.

    y = base(x) + (alpha / rank) * B(A(dropout(x)))      A: (rank, in), B: (out, rank), B = 0 at start

`lora_llama3(model, targets, ...)` wraps the chosen projections of every block (a builder, as
torchtune's `lora_llama3`, not a subclass). The base may be an `nn.Linear` or one of the quantized
layers of `quantize/linear.py` (QLoRA: the forward and backward go through the frozen quantized
weight). Initialisation follows PEFT's: A Kaiming-uniform, B zero, so training starts from the
base model exactly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import HerdError

# Short target names -> the Meta module path inside a block; HF names are accepted too.
TARGETS = {
    "q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
    "gate": "feed_forward.w1", "down": "feed_forward.w2", "up": "feed_forward.w3",
}
HF_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
              "gate_proj": "gate", "down_proj": "down", "up_proj": "up"}
TO_HF = {v: k for k, v in HF_TARGETS.items()}


def parse_targets(targets: str | list[str]) -> list[str]:
    """Short names ("q", "v", ...) from a comma-separated string or a list; "all" means all seven.

    Raises:
        HerdError: an unknown target, naming the valid ones.
    """
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = []
    for item in (t.strip() for t in items):
        if item == "all":
            names += list(TARGETS)
            continue
        name = HF_TARGETS.get(item, {v.rpartition(".")[2]: k for k, v in TARGETS.items()}.get(item, item))
        if name not in TARGETS:
            raise HerdError(f"unknown LoRA target {item!r}; valid: {', '.join(TARGETS)} (or all)")
        names.append(name)
    if not names:
        raise HerdError(f"no LoRA targets given; valid: {', '.join(TARGETS)} (or all)")
    return list(dict.fromkeys(names))


class LoRALinear(nn.Module):
    """A frozen `base` linear layer with a trainable low-rank update (see the module doc).

    Args:
        base: the layer to adapt (`nn.Linear` or a quantized layer with in/out_features).
        rank: r, the inner size of the update.
        alpha: the update is scaled by alpha / rank.
        dropout: dropout on the update's input only (as PEFT).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        owner = getattr(base, "fused", base)  # a FusedSlice holds no tensors: its fused projection does
        device = next(iter(owner.buffers()), next(iter(owner.parameters()), None))
        device = device.device if device is not None and device.device.type != "meta" else None
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True  # False: the base layer alone (the DPO reference, see `adapters_off`)
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) default
        nn.init.zeros_(self.lora_b.weight)

    def delta(self) -> torch.Tensor:
        """The update to the weight, (out, in): scaling * B @ A."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Linear):
            y = self.base(x)
        else:  # QLoRA: a quantized base, differentiable in x (see qlora.py)
            from .qlora import frozen_quantized_linear

            y = frozen_quantized_linear(self.base, x)
        if self.merged or not self.enabled:
            return y
        # y + scaling * B(A(x)) as one addmm: the scaling on the (tokens, rank) product rather than
        # the (tokens, out) one, and the sum done by the matmul (two fewer passes over the output).
        a = self.lora_a(self.dropout(x)) * self.scaling
        out = torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1]), self.lora_b.weight.t())
        return out.view(y.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (then the forward is one matmul)."""
        if not isinstance(self.base, nn.Linear):
            raise HerdError("merging into a quantized base needs it dequantized first (see export)")
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again."""
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def lora_llama3(model: nn.Module, targets: str | list[str] = "q,v", rank: int = 8, alpha: float = 16.0,
                dropout: float = 0.0) -> nn.Module:
    """Freeze `model` and wrap the `targets` projections of every block in `LoRALinear` (in place).

    Returns:
        The model; only the LoRA matrices require gradients.
    Raises:
        HerdError: an unknown target, or one the model lacks (e.g. fused projections).
    """
    names = parse_targets(targets)
    if rank < 1:
        raise HerdError(f"LoRA rank must be at least 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(model.layers):
        for name in names:
            parent_name, _, child = TARGETS[name].rpartition(".")
            parent = layer.get_submodule(parent_name)
            base = getattr(parent, child, None)
            if base is None or not hasattr(base, "in_features"):
                raise HerdError(f"the model has no {name!r} projection to adapt (layers.{i}.{TARGETS[name]})")
            setattr(parent, child, LoRALinear(base, rank, alpha, dropout))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_off(model: nn.Module):
    """Within this block the model computes as its frozen base (every unmerged adapter skipped):
    the starting policy, with no second copy of the weights (DPO's reference model)."""
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise HerdError("adapters_off needs unmerged adapters")
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA matrices, by their names in the model (`layers.0.attention.wq.lora_a.weight`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_a." in k or ".lora_b." in k}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base layers back: a model with Meta's names again."""
    for name, module in lora_modules(model).items():
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.base)
    return model
