"""Supervised fine-tuning data: JSONL conversations -> token ids with a loss mask -> packed batches.

Each line of the file is one JSON object, either a chat

    {"messages": [{"role": "system", "content": "..."},      # optional
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

or a prompt and its completion (a one-turn chat: user, then assistant)

    {"prompt": "...", "completion": "..."}

Conversations are rendered with the model's own chat template. The loss is taken only on the
assistant's tokens (its content and its end-of-turn token), as in the Llama 3 paper: the system
and user turns and every header the template writes are masked.

Over-long examples (more than `max_seq_len + 1` tokens, the +1 because a sequence of n tokens
gives n - 1 predictions) are truncated to their first `max_seq_len + 1` tokens; an example left
with no assistant token to learn from is dropped. Both are counted (`DataStats`).

Packing (on by default) puts several examples into one sequence of at most `max_seq_len`
positions, with a document id per position (no attention across examples) and positions that
restart at 0 for every example, so an example's logits do not depend on its neighbours.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import HerdError

IGNORE = -100  # the target of a position that takes no loss (torch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant", "tool", "ipython")


@dataclass
class Example:
    """One tokenized conversation: `inputs[i]` predicts `targets[i]` (IGNORE where masked)."""

    inputs: list[int]
    targets: list[int]


@dataclass
class DataStats:
    examples: int = 0  # kept
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0  # input positions kept
    trained_tokens: int = 0  # positions with a target

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# -- reading -------------------------------------------------------------------------------

def _messages_of(record: Any) -> list[dict[str, str]]:
    """The conversation a JSONL record stands for; HerdError (without a location) if malformed."""
    if not isinstance(record, dict):
        raise HerdError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise HerdError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise HerdError(f"messages[{i}] must be an object with a 'role' and a 'content'")
            if m["role"] not in ROLES:
                raise HerdError(f"messages[{i}] has unknown role {m['role']!r} (expected one of: {', '.join(ROLES)})")
            if not isinstance(m.get("content"), str):
                raise HerdError(f"messages[{i}] 'content' must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise HerdError("the conversation has no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise HerdError("'prompt' and 'completion' must both be strings")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    raise HerdError("expected a 'messages' list or 'prompt' and 'completion' strings "
                    f"(keys found: {', '.join(sorted(record)) or 'none'})")


def read_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file (blank lines skipped).

    Raises:
        HerdError: the file is missing or empty, or a line is malformed (named as FILE:LINE).
    """
    return read_records(path, _messages_of, "examples")


def read_records(path: str | Path, parse: Callable[[Any], Any], what: str, kind: str = "data file") -> list:
    """`parse(record)` for each record of a JSONL file (blank lines skipped): the reader of every
    recipe's data (conversations, prompts, preference pairs).

    Args:
        parse: a record (the line's JSON value) to an item; raises HerdError for a bad one.
        what: the items' name for the empty-file error ("examples", "pairs"...).
        kind: the file's name for the missing-file error.
    Raises:
        HerdError: the file is missing or empty, or a line is malformed (named as FILE:LINE).
    """
    path = Path(path)
    if not path.is_file():
        raise HerdError(f"{kind} {path} does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(parse(json.loads(line)))
            except json.JSONDecodeError as e:
                raise HerdError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except HerdError as e:
                raise HerdError(f"{path}:{lineno}: {e}") from None
    if not items:
        raise HerdError(f"{path} holds no {what}")
    return items


def split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out): `fraction` of the items held out, drawn by `seed`, order kept."""
    if fraction <= 0:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(items) * fraction)))
    if n_val >= len(items):
        raise HerdError(f"val_split {fraction} leaves no training examples")
    held = set(order[:n_val])
    return [c for i, c in enumerate(items) if i not in held], [c for i, c in enumerate(items) if i in held]


def read_split(read: Callable[[str], list], cfg: Any) -> tuple[list, list]:
    """A recipe's data and held-out data: `read(cfg.data)` and `read(cfg.val_data)`, or
    `cfg.val_split` of the data held out."""
    items = read(cfg.data)
    if cfg.val_data:
        return items, read(cfg.val_data)
    return split(items, cfg.val_split, cfg.seed)


def field_messages(value: Any, key: str, default_role: str) -> list[dict[str, str]]:
    """A record's field as a message list: a string is one message of `default_role`, a message
    a list of one (preference data writes `"chosen": "..."` or a whole conversation)."""
    if isinstance(value, str):
        value = [{"role": default_role, "content": value}]
    elif isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise HerdError(f"{key!r} must be a string, a message or a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise HerdError(f"{key}[{i}] must be a message: {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


# -- tokenizing and masking -------------------------------------------------------------------

def encode_conversation(tokenizer, messages: Sequence[dict[str, str]], template: str | None = None
                        ) -> tuple[list[int], list[bool]]:
    """Tokens of a whole conversation and, per token, whether it is an assistant token to learn.

    An assistant turn's tokens are found by rendering the conversation up to it with the
    generation prompt (everything before, the assistant header included) and through it: the
    tokens between are the turn, up to and including its first end-of-turn token (template
    whitespace after that is masked, as the model never generates it).

    Raises:
        HerdError: the template does not render conversations prefix by prefix (then the
            assistant's tokens cannot be told apart).
    """
    from ..chat.template import format_prompt

    tokens = format_prompt(tokenizer, messages, add_generation_prompt=False, template=template)
    learn = [False] * len(tokens)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = format_prompt(tokenizer, messages[:i], add_generation_prompt=True, template=template) if i else []
        through = format_prompt(tokenizer, messages[:i + 1], add_generation_prompt=False, template=template)
        if through[:len(before)] != before or tokens[:len(through)] != through:
            raise HerdError("the chat template does not render a conversation as a prefix of its continuation; "
                            "cannot tell the assistant's tokens apart")
        end = len(through)
        for j in range(len(before), len(through)):
            if through[j] in tokenizer.stop_ids:
                end = j + 1
                break
        learn[len(before):end] = [True] * (end - len(before))
    return tokens, learn


def tokenize(tokenizer, conversations: Sequence[Sequence[dict[str, str]]], max_seq_len: int,
             template: str | None = None) -> tuple[list[Example], DataStats]:
    """Examples from conversations, over-long ones truncated or dropped (see the module doc)."""
    examples, stats = [], DataStats()
    for messages in conversations:
        tokens, learn = encode_conversation(tokenizer, messages, template)
        if len(tokens) > max_seq_len + 1:
            tokens, learn = tokens[:max_seq_len + 1], learn[:max_seq_len + 1]
            if not any(learn[1:]):
                stats.dropped += 1
                continue
            stats.truncated += 1
        targets = [t if keep else IGNORE for t, keep in zip(tokens[1:], learn[1:])]
        examples.append(Example(tokens[:-1], targets))
        stats.examples += 1
        stats.tokens += len(targets)
        stats.trained_tokens += sum(t != IGNORE for t in targets)
    return examples, stats


# -- packing and batching -------------------------------------------------------------------

@dataclass
class Packed:
    """One training sequence: one example, or several packed (`doc_ids` tells them apart)."""

    inputs: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    def add(self, example: Example) -> None:
        doc = self.doc_ids[-1] + 1 if self.doc_ids else 0
        n = len(example.inputs)
        self.inputs += example.inputs
        self.targets += example.targets
        self.doc_ids += [doc] * n
        self.positions += list(range(n))


def pack(examples: Sequence[Example], max_seq_len: int, packed: bool = True) -> list[Packed]:
    """Sequences of at most `max_seq_len` positions: examples in order, each put in the current
    sequence while it fits (greedy, deterministic), or one example per sequence if not `packed`."""
    sequences: list[Packed] = []
    for ex in examples:
        if not packed or not sequences or len(sequences[-1].inputs) + len(ex.inputs) > max_seq_len:
            sequences.append(Packed())
        sequences[-1].add(ex)
    return sequences


def collate(sequences: Sequence[Packed], pad_id: int = 0, multiple: int = 1) -> dict[str, torch.Tensor]:
    """A batch of tensors (B, T), right-padded to the longest sequence (rounded up to a `multiple`).
    Padding takes no loss and forms its own document (id -1), so real tokens never attend to it."""
    T = -(-max(len(s.inputs) for s in sequences) // multiple) * multiple

    def padded(values, fill):
        return torch.tensor([v + [fill] * (T - len(v)) for v in values], dtype=torch.long)

    return {
        "tokens": padded([s.inputs for s in sequences], pad_id),
        "targets": padded([s.targets for s in sequences], IGNORE),
        "doc_ids": padded([s.doc_ids for s in sequences], -1),
        "input_pos": padded([s.positions for s in sequences], 0),
    }


class Batches:
    """Batches of sequences, reshuffled every epoch by a generator seeded with (seed, epoch), so
    the order is a pure function of the seed: resuming at (epoch, index) replays it exactly.

    With several processes, each takes every `world`-th sequence of the epoch's order (a
    distributed sampler); a global batch is then the same set of sequences whatever `world` is.
    Sequences that do not fill a last whole batch on every process are left for the next epoch's
    shuffle (dropped from this one).
    """

    def __init__(self, sequences: Sequence[Packed], batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, multiple: int = 1):
        self.sequences, self.batch_size, self.seed, self.shuffle = list(sequences), batch_size, seed, shuffle
        self.rank, self.world, self.multiple = rank, world, multiple  # multiple: see `collate`
        if len(self.sequences) < batch_size * world:
            raise HerdError(f"only {len(self.sequences)} training sequences, fewer than one batch "
                            f"({batch_size} x {world} processes): lower --batch-size or add data")

    def __len__(self) -> int:
        """Batches per epoch (per process)."""
        return len(self.sequences) // (self.batch_size * self.world)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.sequences)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.sequences), generator=g).tolist()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of `epoch` from batch index `start` on."""
        order = self.order(epoch)
        step = self.batch_size * self.world
        for b in range(start, len(self)):
            chunk = order[b * step:(b + 1) * step]  # the global batch; this process takes its share
            yield collate([self.sequences[i] for i in chunk[self.rank::self.world]], multiple=self.multiple)
