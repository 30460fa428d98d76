"""The reward model: a Llama whose final hidden state at a reply's last token goes through a linear
head to one scalar, trained with the Bradley–Terry loss on ranked replies (Llama 3 paper, §4.1.2).

    from llamaherd.train.reward import train_reward, load_reward_model
    summary = train_reward(model="smollm2:135m", data="prefs.jsonl", out="runs/rm", val_split=0.2)
    rm = load_reward_model("runs/rm")
    rm.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])  # [0.83]

Data: one JSON object per line,

    {"prompt": [messages] | "text",
     "chosen": "text" | {"role": "assistant", ...} | [messages],
     "rejected": ... (the same forms),
     "edited": ... (optional: the annotator's edit of the chosen reply)}

A row ranks its replies edited > chosen > rejected. Every ordered pair of a row takes the loss
-log σ(r_better - r_worse) (no margin term: the paper drops it), so a three-way row gives three
pairs and a plain row one. The paper concatenates the prompt and a row's replies into one row
(each reply attending to the prompt only); here each reply is its own document (prompt + reply)
packed into the same sequence with document masks. That recomputes the prompt per reply but needs
no new attention mask, and the reward of a training document is computed exactly as at scoring
time. A reply is scored at its end-of-turn token (template text after it is cut off).

The loss and metrics go through `train.loop.fit` weighted by the number of pairs: `loss` is the
mean -log σ per pair, `accuracy` the fraction of pairs ranked right, `margin` the mean reward
difference (and `val_*` of each on the held-out rows).

Outputs in OUT/: `model/`, a Hugging Face `LlamaForSequenceClassification` directory (LoRA merged,
`num_labels` 1, `pad_token_id` a token never scored, so transformers reads the last real token),
plus metrics.jsonl, summary.json, train.json and checkpoint/ as SFT writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HerdError
from .config import SFTConfig
from .data import Batches, encode_conversation, field_messages, read_records, read_split


@dataclass
class RewardConfig(SFTConfig):
    """`SFTConfig`'s keys, with the reward model's data and defaults (`method`: full or lora; the
    head always trains)."""

    data: str = ""  # preference JSONL: prompt, chosen, rejected (and optional edited) per line
    lr: float = 1e-4
    val_split: float = 0.1

    def check(self) -> None:
        if self.method not in ("full", "lora"):
            raise HerdError(f"a reward model trains with method full or lora, not {self.method!r}")
        super().check()


# -- data -------------------------------------------------------------------------------------

@dataclass
class Preference:
    """One ranked row: the prompt's messages and its replies, best first."""

    prompt: list[dict[str, str]]
    replies: list[list[dict[str, str]]]  # each: the assistant message(s) that follow the prompt



def preference_of(record: Any) -> Preference:
    """The ranked replies a JSONL record stands for (see the module doc).

    Raises:
        HerdError: a missing field, a malformed message, a reply not ending with the assistant's,
            or two replies of the row that are the same.
    """
    if not isinstance(record, dict):
        raise HerdError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise HerdError(f"missing field {missing[0]!r} (a preference row needs prompt, chosen and rejected)")
    prompt = field_messages(record["prompt"], "prompt", "user")
    names = (["edited"] if record.get("edited") is not None else []) + ["chosen", "rejected"]
    replies = []
    for name in names:
        reply = field_messages(record[name], name, "assistant")
        if reply[-1]["role"] != "assistant":
            raise HerdError(f"{name!r} must end with an assistant message")
        for other, earlier in zip(names, replies):
            if reply == earlier:
                raise HerdError(f"{other!r} and {name!r} are the same reply: nothing to prefer")
        replies.append(reply)
    return Preference(prompt, replies)


def read_preferences(path: str | Path) -> list[Preference]:
    """The rows of a preference JSONL file (blank lines skipped).

    Raises:
        HerdError: the file is missing or empty, or a line is malformed (named as FILE:LINE).
    """
    return read_records(path, preference_of, "preference rows")


def encode_scored(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversation's tokens up to and including the end-of-turn token of its last (assistant)
    message: the token whose hidden state is scored."""
    if not messages or messages[-1].get("role") != "assistant":
        raise HerdError("a conversation to score must end with an assistant message")
    tokens, learn = encode_conversation(tokenizer, messages)
    last = max(i for i, keep in enumerate(learn) if keep) if any(learn) else len(tokens) - 1
    return tokens[:last + 1]


@dataclass
class PairSequence:
    """One training sequence: the documents (prompt + reply) of one or more rows, packed."""

    tokens: list[int] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # each document's last position (where it is scored)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (better, worse) document indices

    def add_row(self, docs: list[list[int]]) -> None:
        """A row's documents, best first; every ordered pair of them is a training pair."""
        first = len(self.ends)
        for doc in docs:
            self.doc_ids += [len(self.ends)] * len(doc)
            self.positions += list(range(len(doc)))
            self.tokens += doc
            self.ends.append(len(self.tokens) - 1)
        n = len(docs)
        self.pairs += [(first + i, first + j) for i in range(n) for j in range(i + 1, n)]


def pack_preferences(tokenizer, rows: list[Preference], max_seq_len: int, packing: bool = True
                     ) -> tuple[list[PairSequence], dict[str, int]]:
    """Sequences of whole rows (greedy, in order), and counts: rows kept, pairs, rows dropped
    because their documents do not fit in one sequence of `max_seq_len` tokens."""
    sequences: list[PairSequence] = []
    stats = {"rows": 0, "pairs": 0, "dropped": 0, "tokens": 0}
    for row in rows:
        docs = [encode_scored(tokenizer, row.prompt + reply) for reply in row.replies]
        size = sum(map(len, docs))
        if size > max_seq_len:
            stats["dropped"] += 1
            continue
        if not packing or not sequences or len(sequences[-1].tokens) + size > max_seq_len:
            sequences.append(PairSequence())
        sequences[-1].add_row(docs)
        n = len(docs)
        stats["rows"] += 1
        stats["pairs"] += n * (n - 1) // 2
        stats["tokens"] += size
    return sequences, stats


def collate_pairs(sequences: list[PairSequence], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A batch: tokens, doc_ids (padding -1), input_pos (B, T); `ends` (N,) the flat (B*T) index of
    each document's last token; `pairs` (P, 2) indices into `ends`, better first."""
    T = max(len(s.tokens) for s in sequences)
    ends, pairs = [], []
    for b, s in enumerate(sequences):
        pairs += [(len(ends) + i, len(ends) + j) for i, j in s.pairs]
        ends += [b * T + e for e in s.ends]

    def padded(values, fill):
        return torch.tensor([v + [fill] * (T - len(v)) for v in values], dtype=torch.long)

    return {"tokens": padded([s.tokens for s in sequences], pad_id),
            "doc_ids": padded([s.doc_ids for s in sequences], -1),
            "input_pos": padded([s.positions for s in sequences], 0),
            "ends": torch.tensor(ends, dtype=torch.long),
            "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)}


class PairBatches(Batches):
    """`train.data.Batches` (seeded order, exact resume, one share per process) of `PairSequence`s."""

    def epoch(self, epoch: int, start: int = 0):
        order = self.order(epoch)
        step = self.batch_size * self.world
        for b in range(start, len(self)):
            chunk = order[b * step:(b + 1) * step]
            yield collate_pairs([self.sequences[i] for i in chunk[self.rank::self.world]])


def pair_count(batch: dict) -> torch.Tensor:
    """The weight of a preference batch: its pairs."""
    return torch.tensor(float(batch["pairs"].shape[0]))


# -- the model ----------------------------------------------------------------------------------

def pad_token(tokenizer) -> int:
    """A token id that never ends a scored conversation (those end with an end-of-turn token), so
    that transformers, which scores the last token that is not `pad_token_id`, reads the same one."""
    stops = set(tokenizer.stop_ids)
    for i in (getattr(tokenizer, "pad_id", None), tokenizer.bos_id, 0, 1):
        if i is not None and i not in stops:
            return i
    raise HerdError("the tokenizer has no token to pad with (every candidate ends a turn)")


class RewardModel(nn.Module):
    """A Llama `Transformer` and a linear head (dim -> 1) on its final hidden state.

    Args:
        model: the backbone (its `output` layer is not used).
        tokenizer: its tokenizer (for `score`).
        pad_id: the padding token (see `pad_token`); default from the tokenizer.
    """

    def __init__(self, model: nn.Module, tokenizer=None, pad_id: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = pad_id if pad_id is not None else (pad_token(tokenizer) if tokenizer is not None else 0)
        self.head = nn.Linear(model.args.dim, 1, bias=False, device=model.device)
        nn.init.normal_(self.head.weight, std=model.args.dim ** -0.5)  # rewards of order 1 at the start

    def forward(self, tokens, input_pos, doc_ids, ends) -> torch.Tensor:
        """The rewards (N,) of the documents whose last tokens are at the flat indices `ends`."""
        h = self.model.hidden_states(tokens, input_pos=input_pos, doc_ids=doc_ids)  # (B, T, D)
        return self.head(h.flatten(0, 1)[ends]).squeeze(-1).float()

    @torch.no_grad()
    def score(self, conversations: list[list[dict[str, str]]], batch_size: int = 8) -> list[float]:
        """The reward of each conversation's last (assistant) message.

        Args:
            conversations: each the prompt's messages and the reply as the last message.
            batch_size: conversations per forward (padded to the longest of the batch).
        Returns:
            One float per conversation, in order.
        Raises:
            HerdError: a conversation that does not end with an assistant message, or is longer
                than the model's context.
        """
        was_training = self.training
        self.eval()
        docs = []
        for i, messages in enumerate(conversations):
            try:
                docs.append(encode_scored(self.tokenizer, [dict(m) for m in messages]))
            except HerdError as e:
                raise HerdError(f"conversation {i}: {e}") from None
            if len(docs[-1]) > self.model.args.max_seq_len:
                raise HerdError(f"conversation {i} has {len(docs[-1])} tokens, more than the reward model's "
                                f"context ({self.model.args.max_seq_len})")
        order = sorted(range(len(docs)), key=lambda i: len(docs[i]))  # similar lengths pad less
        scores = [0.0] * len(docs)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            seqs = []
            for i in chunk:
                seqs.append(PairSequence())
                seqs[-1].add_row([docs[i]])
            batch = collate_pairs(seqs, self.pad_id)
            batch.pop("pairs")
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            for i, r in zip(chunk, self(**batch).tolist()):
                scores[i] = r
        self.train(was_training)
        return scores

    def check_tokenizer(self, tokenizer, what: str = "the policy") -> None:
        """HerdError unless `tokenizer` is this reward model's (same vocabulary, ids and chat ends):
        a reward model reads the policy's replies as its own tokens."""
        mine = self.tokenizer
        probe = "Hello, world! 1234 ünïcödé <|im_end|> <|eot_id|>"
        if (mine.n_words != tokenizer.n_words or mine.encode(probe) != tokenizer.encode(probe)
                or set(mine.stop_ids) != set(tokenizer.stop_ids)):
            raise HerdError(f"the reward model's tokenizer ({mine.n_words} tokens) is not {what}'s "
                            f"({tokenizer.n_words} tokens): train the reward model from the same base")


class BradleyTerryLoss(nn.Module):
    """The summed Bradley–Terry loss of a batch's pairs, with summed accuracy and margin (what
    `train.loop.fit` divides by the number of pairs)."""

    def __init__(self, reward: RewardModel):
        super().__init__()
        self.reward = reward

    def forward(self, tokens, input_pos, doc_ids, ends, pairs):
        r = self.reward(tokens, input_pos, doc_ids, ends)
        margin = r[pairs[:, 0]] - r[pairs[:, 1]]
        loss = -F.logsigmoid(margin).sum()
        return loss, {"accuracy": (margin > 0).sum().float(), "margin": margin.sum().detach()}


# -- saving and loading ---------------------------------------------------------------------

def merged_state(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict with LoRA folded in: `m.base.weight + scaling * m.lora_b @ m.lora_a` -> `m.weight`."""
    out = {}
    for key, value in state_dict.items():
        if ".lora_a." in key or ".lora_b." in key:
            continue
        if key.endswith(".base.weight"):
            module = key.removesuffix(".base.weight")
            value = value.float() + scaling * (state_dict[module + ".lora_b.weight"].float()
                                               @ state_dict[module + ".lora_a.weight"].float())
            key = module + ".weight"
        out[key] = value.detach().float()
    return out


def save_reward_model(state_dict: dict[str, torch.Tensor], head: torch.Tensor, args, tokenizer,
                      out: str | Path, pad_id: int) -> Path:
    """Write a Hugging Face `LlamaForSequenceClassification` directory.

    Args:
        state_dict: the backbone's float weights in Meta's names (`output.weight` is left out).
        head: the head's weight (1, dim), saved as `score.weight`.
        args: the backbone's `ModelArgs`.
        tokenizer: written as tokenizer.json + tokenizer_config.json.
        out: the directory (created).
        pad_id: config.json's `pad_token_id` (see `pad_token`).
    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    from ..export.hf import hf_config, hf_state_dict, save_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict({k: v for k, v in state_dict.items() if k != "output.weight"}, args)
    tensors["score.weight"] = head.detach().float().reshape(1, args.dim).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(args, tokenizer)
    config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0}, pad_token_id=pad_id)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(tokenizer, out)
    return out


def reward_dir(path: str | Path) -> Path:
    """The `LlamaForSequenceClassification` directory of a path (a `herd train reward` output's
    model/, or such a directory itself); HerdError if it is neither."""
    path = Path(path).expanduser()
    if (path / "train.json").exists() and (path / "model").is_dir():
        path = path / "model"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = None
    if (not isinstance(config, dict) or "LlamaForSequenceClassification" not in config.get("architectures", [])
            or len(config.get("id2label", {"0": 0})) != 1):
        raise HerdError(f"{path} is not a reward model (expected a `herd train reward` output or a Hugging Face "
                        "LlamaForSequenceClassification directory with one label)")
    return path


def load_reward_model(path: str | Path, device: str = "cpu") -> RewardModel:
    """A reward model from a `herd train reward` output or a HF `LlamaForSequenceClassification`
    directory (one label, tokenizer.json beside it).

    Raises:
        HerdError: not such a directory, or its tensors do not fit its config.
    """
    from safetensors import SafetensorError, safe_open

    from ..config import ModelArgs
    from ..tokenizer import load_tokenizer
    from ..weights import build_model, check_state_dict
    from ..weights.hf import safetensors_files
    from ..weights.keymaps import FROM_HF, map_key, permute_hf_to_meta

    directory = reward_dir(path)
    config = json.loads((directory / "config.json").read_text())
    args = ModelArgs.from_hf_config(config)
    sd, head = {}, None
    for file in safetensors_files(directory):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name).float()
                    if name == "score.weight":
                        head = tensor
                        continue
                    key = map_key(name, FROM_HF)
                    if key is None:
                        continue
                    if key.endswith("attention.wq.weight"):
                        tensor = permute_hf_to_meta(tensor, args.n_heads)
                    elif key.endswith("attention.wk.weight"):
                        tensor = permute_hf_to_meta(tensor, args.n_kv_heads)
                    sd[key] = tensor
        except (SafetensorError, OSError, RuntimeError) as e:
            raise HerdError(f"{file} is not a valid safetensors file: {e}") from None
    if head is None or tuple(head.shape) != (1, args.dim):
        raise HerdError(f"{directory}: expected a score.weight of shape (1, {args.dim})")
    if not args.tie_embeddings and "output.weight" not in sd and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]  # a classifier has no LM head; never used here
    check_state_dict(sd, args)
    model = build_model(args, sd, device)
    reward = RewardModel(model, load_tokenizer(directory), pad_id=config.get("pad_token_id"))
    with torch.no_grad():
        reward.head.weight.copy_(head)
    return reward.eval()


# -- the recipe -------------------------------------------------------------------------------

def train_reward(config: RewardConfig | dict | None = None, *, on_step: Callable[[dict], None] | None = None,
                 **kwargs: Any) -> dict:
    """Train a reward model on preference rows (see the module doc and `RewardConfig`).

    Args:
        config: a `RewardConfig`, or a dict of its keys; `kwargs` override it.
        on_step: called with each step's metrics record.
    Returns:
        The summary (also written to OUT/summary.json): steps, rows, pairs, val accuracy before
        and after, time, peak memory, outputs.
    Raises:
        HerdError: a bad setting, model or data file.
    """
    from .finetune import _distribute, _full_state, load_for_training, resolve_model_path
    from .lora import lora_llama3
    from .loop import begin, fit

    cfg, rank, world, device, out = begin(config, kwargs, RewardConfig)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    rows, val_rows = read_split(read_preferences, cfg)
    model_path = resolve_model_path(cfg.model)
    model, ckpt = load_for_training(model_path, cfg.method, device)
    if cfg.max_seq_len > ckpt.args.max_seq_len:
        raise HerdError(f"max_seq_len {cfg.max_seq_len} exceeds the model's context length {ckpt.args.max_seq_len}")
    sequences, stats = pack_preferences(ckpt.tokenizer, rows, cfg.max_seq_len, cfg.packing)
    if not sequences:
        raise HerdError(f"no row of {cfg.data} fits max_seq_len {cfg.max_seq_len} (all its replies with the prompt)")
    batches = PairBatches(sequences, cfg.batch_size, cfg.seed, rank=rank, world=world)
    val_batches, val_stats = None, {"rows": 0, "pairs": 0}
    if val_rows:
        val_seqs, val_stats = pack_preferences(ckpt.tokenizer, val_rows, cfg.max_seq_len, cfg.packing)
        if len(val_seqs) >= world:
            val_batches = PairBatches(val_seqs, 1, shuffle=False, rank=rank, world=world)

    if cfg.method == "lora":
        lora_llama3(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    reward = RewardModel(model, ckpt.tokenizer)  # the head is made after the freeze: it always trains
    model.train()
    wrapper = BradleyTerryLoss(reward)
    if world > 1:
        wrapper = _distribute(model, wrapper, False)
    if rank == 0:
        run = {**cfg.to_dict(), "model_path": str(model_path), "resume": False}
        (out / "train.json").write_text(json.dumps(run, indent=2))
    last = {}

    def step(record):
        last.update({k: v for k, v in record.items() if k.startswith("val_")})
        if on_step is not None:
            on_step(record)

    result = fit(cfg, wrapper, batches, out=out, device=device, val_batches=val_batches,
                 weight=pair_count, on_step=step)
    position = result["position"]

    sd = {k.removeprefix("reward."): v for k, v in _full_state(wrapper, world).items()}
    summary = {}
    if rank == 0:
        head = sd.pop("head.weight")
        backbone = merged_state({k.removeprefix("model."): v for k, v in sd.items()},
                                cfg.lora_alpha / cfg.lora_rank)
        model_dir = save_reward_model(backbone, head, ckpt.args, ckpt.tokenizer, out / "model", reward.pad_id)
        before = result["val_before"] or {}
        summary = {
            "method": cfg.method, "steps": position["step"], "epochs": position["epoch"] + 1,
            "tokens": position["tokens"], "seconds": round(position["seconds"], 2),
            "wall_seconds": result["wall_seconds"],
            "peak_memory_bytes": result["peak_memory_bytes"],
            "trainable_parameters": result["trainable_parameters"], "processes": world,
            "data": stats, "val_rows": val_stats["rows"], "val_pairs": val_stats["pairs"],
            "val_accuracy_before": before.get("val_accuracy"), "val_accuracy": last.get("val_accuracy"),
            "val_loss_before": before.get("val_loss"), "val_loss": last.get("val_loss"),
            "final_loss": json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"],
            "outputs": {"model": str(model_dir), "metrics": str(out / "metrics.jsonl")},
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
