"""Reading prepared shards back as pre-training sequences: documents shuffled, each wrapped in BOS
... EOS, packed end to end and cut into windows of `seq_len` tokens, with the document of each
token (for a document mask) and targets that never cross from one document into the next.

A data-side reader only: numpy arrays out, no torch, no training loop. Memory is a few integers per
document (the index); the tokens stay memory-mapped in the shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import HerdError
from .mix import draws
from .shards import open_shards

IGNORE = -100  # target of a position whose next token belongs to another document


@dataclass
class Window:
    """One training sequence. All arrays are (seq_len,) int64.

    tokens: input ids; targets: the next id, or IGNORE where the next token starts another
    document; doc_ids: which document each position belongs to (numbered within the window, from
    0), for a mask that lets a token attend only to its own document.
    """
    tokens: np.ndarray
    targets: np.ndarray
    doc_ids: np.ndarray


class PackedDocuments:
    """The documents of a `herd data prepare` folder as packed windows.

    Args:
        directory: the prepared folder (report.json and shards).
        seq_len: tokens per window.
        split: "train", "val" or "all"; `val_fraction` of the documents (a fixed draw per document)
            are "val".
        val_fraction: share of documents held out for validation.
        bos_id, eos_id: wrapped around each document (None: not added); default from report.json.
        seed: the shuffle's seed; each epoch shuffles differently, always the same way for a seed.
        rank, world_size: this process gets windows rank, rank + world_size, ... (data parallel).
    """

    def __init__(self, directory: str | os.PathLike, seq_len: int, *, split: str = "train",
                 val_fraction: float = 0.0, bos_id: int | None = -1, eos_id: int | None = -1, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        import json
        from pathlib import Path

        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, not {split!r}")
        tokenizer = json.loads((Path(directory) / "report.json").read_text())["tokenizer"] \
            if (Path(directory) / "report.json").exists() else {}
        self.bos_id = tokenizer.get("bos_id") if bos_id == -1 else bos_id
        self.eos_id = tokenizer.get("eos_id") if eos_id == -1 else eos_id
        self.shards = open_shards(directory)
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        # The index: (shard, start, end) of every document of the split.
        shard, start, end = [], [], []
        for i, (_, ends) in enumerate(self.shards):
            ends = ends.astype(np.int64)
            shard.append(np.full(len(ends), i, np.int32))
            start.append(np.concatenate([[0], ends[:-1]]))
            end.append(ends)
        self.doc_shard = np.concatenate(shard) if shard else np.zeros(0, np.int32)
        self.doc_start = np.concatenate(start) if start else np.zeros(0, np.int64)
        self.doc_end = np.concatenate(end) if end else np.zeros(0, np.int64)
        if split != "all":
            is_val = draws(np.arange(len(self.doc_end), dtype=np.uint64), 1_000_003) < val_fraction
            pick = is_val if split == "val" else ~is_val
            self.doc_shard, self.doc_start, self.doc_end = self.doc_shard[pick], self.doc_start[pick], self.doc_end[pick]
        if len(self.doc_end) == 0:
            raise HerdError(f"no {split} documents in {directory}")
        extra = (self.bos_id is not None) + (self.eos_id is not None)
        self.tokens_per_epoch = int((self.doc_end - self.doc_start).sum()) + extra * len(self.doc_end)

    def __len__(self) -> int:
        """Windows of one epoch (over all ranks)."""
        return max(0, (self.tokens_per_epoch - 1) // self.seq_len)

    def _stream(self, epoch: int) -> Iterator[tuple[np.ndarray, int]]:
        """(tokens of one wrapped document, its number) in this epoch's order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.doc_end))
        for number, d in enumerate(order):
            body = self.shards[self.doc_shard[d]][0][self.doc_start[d]:self.doc_end[d]].astype(np.int64)
            parts = ([[self.bos_id]] if self.bos_id is not None else []) + [body] \
                + ([[self.eos_id]] if self.eos_id is not None else [])
            yield np.concatenate(parts).astype(np.int64), number

    def windows(self, epoch: int = 0, start: int = 0) -> Iterator[Window]:
        """This rank's windows of an epoch, from window `start` (to resume) on.

        Each window is seq_len + 1 tokens of the packed stream (the last is only a target); the next
        window starts where this one's inputs end.
        """
        n = self.seq_len + 1
        buf_tok, buf_doc = np.zeros(0, np.int64), np.zeros(0, np.int64)
        index = 0
        for tokens, number in self._stream(epoch):
            buf_tok = np.concatenate([buf_tok, tokens])
            buf_doc = np.concatenate([buf_doc, np.full(len(tokens), number, np.int64)])
            while len(buf_tok) >= n:
                if index >= start and index % self.world_size == self.rank:
                    yield self._window(buf_tok[:n], buf_doc[:n])
                index += 1
                buf_tok, buf_doc = buf_tok[self.seq_len:], buf_doc[self.seq_len:]

    def _window(self, tok: np.ndarray, doc: np.ndarray) -> Window:
        targets = tok[1:].copy()
        targets[doc[1:] != doc[:-1]] = IGNORE
        doc_ids = doc[:-1] - doc[0]
        return Window(tok[:-1].copy(), targets, doc_ids)

    def batches(self, batch_size: int, epoch: int = 0, start: int = 0) -> Iterator[Window]:
        """Windows stacked by batch_size: arrays (batch_size, seq_len); a last partial batch is dropped."""
        group: list[Window] = []
        for w in self.windows(epoch, start):
            group.append(w)
            if len(group) == batch_size:
                yield Window(*(np.stack([getattr(g, f) for g in group]) for f in ("tokens", "targets", "doc_ids")))
                group = []
