"""The supervised fine-tuning recipe: setup -> train -> save -> summary, in one readable function.

    from llamaherd.train import sft
    summary = sft(model="smollm2:135m", data="chat.jsonl", out="runs/mine", method="lora", max_steps=100)

One process, or several under `torchrun` (then each block is sharded with FSDP2's `fully_shard`;
gloo on the CPU, NCCL on GPUs). The outputs in OUT/:

    metrics.jsonl   one record per step: step, loss, lr, tokens, tokens_per_s (+ val_loss)
    loss.png        the loss curve (when matplotlib is installed)
    summary.json    time, tokens, peak memory, data counts, where everything is
    checkpoint/     the latest resumable state (`resume=True` continues from it)
    model/          full fine-tune: a Hugging Face directory (herd and transformers load it)
    adapter/        LoRA / QLoRA: a PEFT adapter directory over the base model
    train.json      the settings of the run (what `herd export` reads)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import HerdError
from .config import SFTConfig
from .data import Batches, pack, read_jsonl, read_split, tokenize
from .lora import lora_llama3, parse_targets
from .loss import TiedLink, Workspace, cross_entropy_sum, tied_lookup
from .loop import begin, fit
from .metrics import plot_loss


class CausalLMLoss(nn.Module):
    """The model and its summed next-token loss as one module, so that under FSDP2 the root's
    forward (hooks that gather the embedding, final norm and output) wraps the whole computation."""

    def __init__(self, model: nn.Module, loss_chunk: int):
        super().__init__()
        self.model, self.loss_chunk = model, loss_chunk
        self.workspace = Workspace()  # the loss's logits block, reused step after step
        self.link_tied = True  # see `forward`; off under FSDP2 (`_distribute`)

    def forward(self, tokens, targets, doc_ids=None, input_pos=None):
        model, link, x = self.model, None, None
        weight = getattr(model.output, "weight", None)
        # A tied embedding that trains (pre-training, a full fine-tune of a small model) on the CPU:
        # its lookup's gradient goes straight into the loss's (V, D) one (`loss.tied_lookup`). Not
        # on CUDA: there a fresh gradient costs no page faults, and index_add_'s atomics would make
        # the weight's gradient vary from run to run.
        tied = weight is not None and weight is getattr(model.tok_embeddings, "weight", None)
        if self.link_tied and tied and weight.requires_grad and weight.device.type == "cpu" \
                and torch.is_grad_enabled():
            link = TiedLink()
            x = tied_lookup(weight, tokens, link)
        h = model.hidden_states(tokens, input_pos=input_pos, doc_ids=doc_ids, embeddings=x)
        return cross_entropy_sum(h, model.output, targets, self.loss_chunk, self.workspace, link)


# -- setup ------------------------------------------------------------------------------------

def resolve_model_path(name: str) -> Path:
    """A path from a store name or a path (a training output's model/ works too)."""
    path = Path(name).expanduser()
    if path.exists():
        if (path / "train.json").exists():  # a training output: its merged model
            if (path / "model").exists():
                return path / "model"
            raise HerdError(f"{path} is a LoRA training output: export it first (herd export {path} --format hf)")
        return path
    from ..cli.common import resolve_model

    return Path(resolve_model(name).path)


def load_for_training(path: Path, method: str, device: str, dtype=torch.float32, int4: bool | None = None):
    """The model (float weights, or the GGUF's quantized blocks for QLoRA) and its tokenizer,
    with no projection fusion (LoRA needs wq, wk, ... as separate modules).

    QLoRA's base stays quantized: on the CPU in the file's own blocks (`BlockLinear`, our kernels);
    on CUDA (`int4`, default: the device is CUDA) its Q4_0 / Q4_1 / Q4_K projections in torch's int4
    layers (`Int4Linear`: the file's 4-bit codes, as inference on CUDA loads them) and its other
    projections in `dtype`. `int4` on a CPU runs the int4 kernel's CPU twin (tests)."""
    from ..model import Transformer
    from ..quantize.linear import pack_int4_layers, swap_quantized_modules
    from ..weights import build_model, load_checkpoint

    quantized = method == "qlora"
    int4 = torch.device(device).type == "cuda" if int4 is None else int4
    ckpt = load_checkpoint(path, dtype, quantized=quantized, gpu=quantized and int4)
    if not quantized:
        return build_model(ckpt.args, ckpt.state_dict, device), ckpt
    kinds = {k: v for k, v in ckpt.quantized.items() if k.startswith("layers.")}
    if not kinds:
        need = "4-bit (Q4_0, Q4_1, Q4_K) projections on CUDA" if int4 else "a quantized GGUF model"
        raise HerdError(f"--method qlora needs {need}; {path} has none (use lora)")
    # build_model would fuse q/k/v and gate/up for inference; LoRA needs them apart, so the
    # quantized modules are put in here without fusing.
    with torch.device("meta"):
        model = Transformer(ckpt.args)
    swap_quantized_modules(model, kinds)
    # The embedding and output in float32: small next to the blocks, and the chunked loss reads the
    # output's weight.
    sd = {k: v for k, v in ckpt.state_dict.items() if not k.startswith(("tok_embeddings.", "output."))}
    sd.update(_float_tensors(ckpt.path, ("tok_embeddings.weight", "output.weight"), dtype))
    sd.setdefault("output.weight", sd["tok_embeddings.weight"])
    model.load_state_dict(sd, assign=True, strict=True)
    if ckpt.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_rope(ckpt.args.max_seq_len)  # as build_model does: the RoPE table is built, not loaded
    model = model.to(device)
    pack_int4_layers(model)  # into the layout of the device's own int4 kernel
    return model, ckpt


def _float_tensors(path: Path, names: tuple[str, ...], dtype) -> dict[str, torch.Tensor]:
    """Just these tensors of a GGUF file, dequantized (the rest of the file is not touched)."""
    from ..quantize.ggml import dequantize
    from ..formats.gguf import GGUFFile
    from ..weights.keymaps import FROM_GGUF, map_key

    out = {}
    for t in GGUFFile(path).tensors:
        key = map_key(t.name, FROM_GGUF)
        if key in names:
            out[key] = dequantize(t.data, t.tensor_type, t.shape, dtype=dtype)
    return out


def _distribute(model: nn.Module, wrapper: nn.Module, activation_checkpointing: bool) -> nn.Module:
    """FSDP2: each block its own shard group, the rest (embedding, norm, output) the root's."""
    from torch.distributed.fsdp import fully_shard

    if isinstance(wrapper, CausalLMLoss):
        wrapper.link_tied = False  # FSDP2 reduces each gradient autograd hands it: no hand-over
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(wrapper)
    return wrapper


def _checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing: each block's activations are recomputed in the backward."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        forward = layer.forward
        layer.forward = lambda *a, _f=forward: checkpoint(_f, *a, use_reentrant=False)


def padded_multiple(compile: bool, longest: int) -> int:
    """What a batch's length is rounded up to: with `--compile` a quarter of the longest row, so the
    blocks compile for at most ~4 lengths (dynamo compiles every new length again, and after 8
    stops compiling and runs them eagerly); without it, nothing (each batch as long as its rows)."""
    return max(64, longest // 4) if compile else 1


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block's forward (torchtitan's per-block compile): one graph, compiled once
    and shared by every block (their parameters are its inputs), forward and backward fused by
    inductor. The embedding, the final norm and the chunked loss stay eager; hooks (FSDP2's) run
    around the compiled forward, as `_checkpoint_blocks`' recomputation runs inside it."""
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, backend=backend)


# -- the recipe -------------------------------------------------------------------------------

def sft(config: SFTConfig | dict | None = None, *, on_step: Callable[[dict], None] | None = None,
        **kwargs: Any) -> dict:
    """Fine-tune a model on chat data (see the module doc and `SFTConfig` for the keys).

    Args:
        config: an `SFTConfig`, or a dict of its keys; `kwargs` override it.
        on_step: called with each step's metrics record (after it is logged).
    Returns:
        The summary (also written to OUT/summary.json).
    Raises:
        HerdError: a bad setting, model or data file.
    """
    cfg, rank, world, device, out = begin(config, kwargs, SFTConfig)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    # Data: everything deterministic from the seed, so every process builds the same sequences.
    conversations, val_conversations = read_split(read_jsonl, cfg)

    model_path = resolve_model_path(cfg.model)
    model, ckpt = load_for_training(model_path, cfg.method, device)
    tokenizer = ckpt.tokenizer
    if cfg.max_seq_len > ckpt.args.max_seq_len:
        raise HerdError(f"max_seq_len {cfg.max_seq_len} exceeds the model's context length {ckpt.args.max_seq_len}")
    examples, stats = tokenize(tokenizer, conversations, cfg.max_seq_len)
    if not examples:
        raise HerdError(f"no example of {cfg.data} fits max_seq_len {cfg.max_seq_len} with an assistant token left")
    multiple = padded_multiple(cfg.compile, cfg.max_seq_len)
    batches = Batches(pack(examples, cfg.max_seq_len, cfg.packing), cfg.batch_size, cfg.seed, rank=rank, world=world,
                      multiple=multiple)
    val_batches = None
    if val_conversations:
        val_examples, _ = tokenize(tokenizer, val_conversations, cfg.max_seq_len)
        val_seqs = pack(val_examples, cfg.max_seq_len, cfg.packing)
        val_batches = Batches(val_seqs, 1, shuffle=False, rank=rank, world=world, multiple=multiple) \
            if len(val_seqs) >= world else None

    # Model: what trains.
    if cfg.method in ("lora", "qlora"):
        lora_llama3(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    if cfg.activation_checkpointing:
        _checkpoint_blocks(model)
    if cfg.compile:
        compile_blocks(model)
    model.train()
    wrapper = CausalLMLoss(model, cfg.loss_chunk)
    if world > 1:
        wrapper = _distribute(model, wrapper, cfg.activation_checkpointing)
    if rank == 0:
        run = {**cfg.to_dict(), "model_path": str(model_path), "resume": False}
        (out / "train.json").write_text(json.dumps(run, indent=2))
    result = fit(cfg, wrapper, batches, out=out, device=device, val_batches=val_batches, on_step=on_step)
    position = result["position"]

    # Save: the merged model or the adapter (full tensors gathered from the shards).
    outputs = _save_outputs(cfg, wrapper, model, ckpt, model_path, out, rank, world)
    summary = {
        "method": cfg.method, "steps": position["step"], "epochs": position["epoch"] + 1,
        "tokens": position["tokens"], "seconds": round(position["seconds"], 2),
        "wall_seconds": result["wall_seconds"],
        "tokens_per_s": round(position["tokens"] / max(position["seconds"], 1e-9), 1),
        "peak_memory_bytes": result["peak_memory_bytes"], "trainable_parameters": result["trainable_parameters"],
        "processes": world,
        "data": stats.to_dict(), "val_examples": len(val_conversations),
        "val_loss_before": result["val_before"]["val_loss"] if result["val_before"] else None,
        "final_loss": (json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
                       if rank == 0 and (out / "metrics.jsonl").exists() else None),
        "outputs": outputs,
    }
    if rank == 0:
        png = plot_loss(out)
        if png is not None:
            summary["outputs"]["loss_curve"] = str(png)
        summary["outputs"]["metrics"] = str(out / "metrics.jsonl")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _full_state(wrapper: nn.Module, world: int) -> dict[str, torch.Tensor]:
    """The model's whole state dict on every rank (gathered from FSDP shards when distributed)."""
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = wrapper.state_dict()
    return {k.removeprefix("model."): v for k, v in sd.items()}


def _save_outputs(cfg: SFTConfig, wrapper, model, ckpt, model_path: Path, out: Path, rank: int, world: int) -> dict:
    from ..export.hf import save_hf, save_peft

    sd = _full_state(wrapper, world)
    if rank != 0:
        return {}
    if cfg.method == "full":
        float_sd = {k: v.float() for k, v in sd.items()}
        save_hf(float_sd, ckpt.args, ckpt.tokenizer, out / "model")
        return {"model": str(out / "model")}
    adapters = {k: v for k, v in sd.items() if ".lora_a." in k or ".lora_b." in k}
    save_peft(adapters, ckpt.args, parse_targets(cfg.lora_targets), cfg.lora_rank, cfg.lora_alpha,
              cfg.lora_dropout, str(model_path), out / "adapter")
    return {"adapter": str(out / "adapter")}
