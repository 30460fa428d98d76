"""Direct Preference Optimization (Rafailov et al., 2023) as the Llama 3 paper runs it (section 4.1.4).

    from llamaherd.train.dpo import dpo
    summary = dpo(model="smollm2:135m", data="prefs.jsonl", out="runs/dpo", max_steps=100)

Each line of the data file is one preference pair:

    {"prompt": [{"role": "user", "content": "..."}, ...],   # messages (or one string: a user turn)
     "chosen": [{"role": "assistant", "content": "..."}],   # assistant message(s) (or one string)
     "rejected": [{"role": "assistant", "content": "..."}],
     "rating": "better"}                                     # optional

With `min_rating` ("better" by default) only pairs rated at least that strongly are kept
(RATINGS, strongest first: the paper trains DPO on "significantly better" and "better" pairs);
pairs without a rating are kept.

The loss of a pair, with log-probabilities summed over the response's tokens,

    sigmoid(β (log π(c)/π_ref(c) − log π(r)/π_ref(r)))   →   −log σ(·)  +  nll_coef · NLL(c)

differs from the usual DPO in two ways the paper gives (β = 0.1, lr 1e-5, nll_coef = 0.2):

- formatting tokens are masked out of both log-probability sums (`mask_format_tokens`). What a
  "formatting token" is, for any chat template: every token of the response that the template writes
  rather than the assistant — the end-of-turn token (Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`
  for SmolLM2) and, when a response has several messages, the whitespace after each end-of-turn and
  the next message's header (`<|start_header_id|>assistant<|end_header_id|>\\n\\n`,
  `<|im_start|>assistant\\n`). The first header is part of the prompt (the generation prompt), so it
  is never in the sums. Chosen and rejected responses share these tokens; the paper found that their
  contrastive pull makes the model repeat tails or stop abruptly.
- an NLL term on the chosen response: its mean per-token negative log-likelihood (over all its
  tokens, the end-of-turn included, exactly the tokens SFT would learn, so the model keeps learning
  where to stop), averaged over pairs. It keeps the chosen responses likely while DPO pushes the two
  apart (Pang et al., 2024).

The reference model is the starting policy. With LoRA / QLoRA it is the same model with its adapters
switched off (`lora.adapters_off`: no second copy); for a full fine-tune, the reference log-probs
are computed once before training (one no-grad pass) and carried in the batches, so the frozen
copy never has to sit in memory.

A micro-batch holds `batch_size` pairs. With `packing` (on), pairs are packed greedily into rows of
up to 2 × `max_seq_len` positions, so one forward computes both sides with no padding between them.
With `share_prompt` (on) a pair is one document: its prompt once, then the chosen reply, then the
rejected one, which sees the prompt but not the chosen reply (a branch in the document mask: see
`model.document_attention`), so the prompt is computed once, not twice. Without it, chosen and
rejected are two documents (positions restarting at 0). Without packing, rows are
[chosen_1..chosen_B, rejected_1..rejected_B], padded.
A pair whose prompt + response exceeds `max_seq_len + 1` tokens is dropped (and counted).

Outputs in OUT/ are SFT's (see `finetune`); metrics.jsonl has, per step: loss, dpo_loss,
reward_margin (β-scaled log-ratio margin), reward_accuracy (chosen reward > rejected reward),
chosen_nll, chosen_reward, rejected_reward (each a mean over the step's pairs), and val_* the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HerdError
from .config import SFTConfig
from .data import IGNORE, field_messages, read_records, read_split
from .loop import autocast, begin, fit
from .loss import matmul_dtype, token_losses

RATINGS = ("significantly better", "better", "slightly better", "marginally better")  # strongest first
LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass
class DPOConfig(SFTConfig):
    """SFT's keys (model, data, method, lr, batch_size, ...) with the paper's DPO defaults, plus:"""

    data: str = ""  # preference JSONL: {"prompt", "chosen", "rejected", "rating"?} per line
    method: str = "full"  # the paper fine-tunes every weight
    lr: float = 1e-5  # the paper's
    batch_size: int = 4  # pairs per process per micro-batch
    beta: float = 0.1  # strength of the KL constraint to the reference
    nll_coef: float = 0.2  # weight of the chosen responses' mean NLL
    mask_format_tokens: bool = True  # leave the template's tokens out of the log-prob sums
    loss_type: str = "sigmoid"  # sigmoid (DPO) | hinge (SLiC) | ipo
    min_rating: str | None = "better"  # keep pairs rated at least this (RATINGS); "any": all
    share_prompt: bool = True  # packed: a pair's prompt computed once for both replies

    def check(self) -> None:
        super().check()
        if self.beta <= 0:
            raise HerdError(f"beta must be positive, got {self.beta}")
        if self.nll_coef < 0:
            raise HerdError(f"nll_coef must be at least 0, got {self.nll_coef}")
        if self.loss_type not in LOSS_TYPES:
            raise HerdError(f"unknown loss_type {self.loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if self.min_rating not in (None, "", "any", *RATINGS):
            raise HerdError(f"unknown min_rating {self.min_rating!r}; valid: {', '.join(RATINGS)} or any")


# -- reading --------------------------------------------------------------------------------------

@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    rating: str | None = None



def pair_of(record: Any) -> Pair:
    """The preference pair a JSONL record stands for; HerdError (without a location) if malformed."""
    if not isinstance(record, dict):
        raise HerdError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise HerdError(f"missing {' and '.join(repr(k) for k in missing)} (a pair needs 'prompt', 'chosen' "
                        f"and 'rejected'; keys found: {', '.join(sorted(record)) or 'none'})")
    prompt = field_messages(record["prompt"], "prompt", "user")
    chosen = field_messages(record["chosen"], "chosen", "assistant")
    rejected = field_messages(record["rejected"], "rejected", "assistant")
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if any(m["role"] != "assistant" for m in response):
            raise HerdError(f"{key!r} must hold assistant messages only")
    if chosen == rejected:
        raise HerdError("'chosen' and 'rejected' are identical: the pair prefers nothing")
    rating = record.get("rating")
    if rating is not None:
        if not isinstance(rating, str) or rating.strip().lower() not in RATINGS:
            raise HerdError(f"unknown rating {rating!r}; valid: {', '.join(RATINGS)}")
        rating = rating.strip().lower()
    return Pair(prompt, chosen, rejected, rating)


def read_pairs(path: str | Path) -> list[Pair]:
    """The preference pairs of a JSONL file (blank lines skipped).

    Raises:
        HerdError: the file is missing or empty, or a line is malformed (named as FILE:LINE).
    """
    return read_records(path, pair_of, "pairs")


def keep_rated(pairs: Sequence[Pair], min_rating: str | None) -> list[Pair]:
    """The pairs rated at least `min_rating` (unrated pairs are kept; None, "" or "any": all)."""
    if min_rating in (None, "", "any"):
        return list(pairs)
    limit = RATINGS.index(min_rating)
    return [p for p in pairs if p.rating is None or RATINGS.index(p.rating) <= limit]


# -- tokenizing -----------------------------------------------------------------------------------

def encode_response(tokenizer, prompt: Sequence[dict], response: Sequence[dict], template: str | None = None
                    ) -> tuple[list[int], list[bool], list[bool]]:
    """The tokens of prompt + response, and per token: is it the response's, is it a formatting token.

    The response's tokens run from the end of the generation prompt to its last end-of-turn token
    (template whitespace after that is not generated by the model). Formatting tokens (see the
    module doc) are the template's inside that span: end-of-turn tokens, and between two messages
    what follows an end-of-turn up to the next message's content (found by rendering the
    conversation up to that message with the generation prompt).

    Raises:
        HerdError: the template does not render a conversation as a prefix of its continuation.
    """
    from ..chat.template import format_prompt

    def render(messages, open_turn):
        return format_prompt(tokenizer, messages, add_generation_prompt=open_turn, template=template)

    tokens = render([*prompt, *response], False)
    is_response, is_format = [False] * len(tokens), [False] * len(tokens)
    start = None  # where message j's span starts: the generation prompt's end, then the previous end-of-turn
    for j in range(len(response)):
        head = render([*prompt, *response[:j]], True)  # everything before message j's content
        through = render([*prompt, *response[:j + 1]], False)
        if tokens[:len(through)] != through or through[:len(head)] != head:
            raise HerdError("the chat template does not render a conversation as a prefix of its continuation; "
                            "cannot tell the response's tokens apart")
        start = len(head) if start is None else start
        end = next((k + 1 for k in range(len(head), len(through)) if through[k] in tokenizer.stop_ids), len(through))
        is_response[start:end] = [True] * (end - start)
        is_format[start:len(head)] = [True] * (len(head) - start)  # after the last end-of-turn: header (j > 0)
        is_format[len(head):end] = [t in tokenizer.stop_ids for t in tokens[len(head):end]]
        start = end
    return tokens, is_response, is_format


@dataclass
class Side:
    """One sequence of a pair: `inputs[i]` predicts `targets[i]` (IGNORE outside the response);
    `scored[i]`: that target counts in the DPO log-probability sum."""

    inputs: list[int]
    targets: list[int]
    scored: list[bool]

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class PairExample:
    chosen: Side
    rejected: Side
    ref: tuple[float, float] | None = None  # the reference's (chosen, rejected) log-probs, when precomputed


@dataclass
class PairStats:
    pairs: int = 0  # kept
    filtered_by_rating: int = 0
    dropped_too_long: int = 0
    tokens: int = 0  # input positions of both sides
    scored_tokens: int = 0  # targets in the log-prob sums

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def tokenize_pairs(tokenizer, pairs: Sequence[Pair], max_seq_len: int, mask_format_tokens: bool = True,
                   template: str | None = None) -> tuple[list[PairExample], PairStats]:
    """Pair examples; a pair with a side over `max_seq_len + 1` tokens is dropped (counted)."""
    examples, stats = [], PairStats()
    for pair in pairs:
        sides = []
        for response in (pair.chosen, pair.rejected):
            tokens, is_response, is_format = encode_response(tokenizer, pair.prompt, response, template)
            scored = [r and not (mask_format_tokens and f) for r, f in zip(is_response, is_format)]
            targets = [t if r else IGNORE for t, r in zip(tokens[1:], is_response[1:])]
            sides.append(Side(tokens[:-1], targets, scored[1:]))
        if max(len(s) for s in sides) > max_seq_len:
            stats.dropped_too_long += 1
            continue
        examples.append(PairExample(*sides))
        stats.pairs += 1
        stats.tokens += sum(len(s) for s in sides)
        stats.scored_tokens += sum(sum(s.scored) for s in sides)
    return examples, stats


# -- batching -------------------------------------------------------------------------------------

def shared_prefix(pair: PairExample) -> int:
    """How many input positions chosen and rejected share: their common tokens before either side's
    first target (the prompt, less its last token, which predicts each side's first reply token)."""
    c, r = pair.chosen, pair.rejected
    n = min(c.targets.index(next(t for t in c.targets if t != IGNORE)),
            r.targets.index(next(t for t in r.targets if t != IGNORE)))
    return next((i for i in range(n) if c.inputs[i] != r.inputs[i]), n)


def pair_pieces(pair: PairExample, p: int, share_prompt: bool) -> list[tuple[Side, int, int, int]]:
    """The parts of pair `p` in a packed row, in order: (part, its first position, branch, segment).
    Shared: the prompt (branch 0), then chosen (1) and rejected (2) from the prompt's last token on,
    each seeing the prompt but not the other. Else chosen and rejected whole, as two documents."""
    if not share_prompt:
        return [(pair.chosen, 0, 0, 2 * p), (pair.rejected, 0, 0, 2 * p + 1)]
    n = shared_prefix(pair)
    prompt = Side(pair.chosen.inputs[:n], [IGNORE] * n, [False] * n)
    tail = [Side(s.inputs[n:], s.targets[n:], s.scored[n:]) for s in (pair.chosen, pair.rejected)]
    return [(prompt, 0, 0, -1), (tail[0], n, 1, 2 * p), (tail[1], n, 2, 2 * p + 1)]


def collate_pairs(pairs: Sequence[PairExample], packing: bool, row_len: int, pad_id: int = 0,
                  share_prompt: bool = False, multiple: int = 1) -> dict[str, torch.Tensor]:
    """A micro-batch of pairs as tensors.

    Every position has a segment id `seg` = 2 * (pair index) + (0 chosen | 1 rejected), -1 on padding
    (and on a shared prompt). With `packing`, pairs go greedily into rows of at most `row_len`
    positions, each pair one document (`share_prompt`: its prompt once, then both replies as two
    branches; doc_ids (B, T, 2) document and branch, see `model.document_attention`) or two (chosen,
    then rejected); without it, one sequence per row, all chosen rows then all rejected rows.
    Returns tokens, targets, doc_ids, input_pos, seg (B, T), scored (B, T) bool, n_pairs (),
    and ref_logps (P, 2) when the reference log-probs were precomputed.
    """
    share_prompt = share_prompt and packing
    rows: list[list[tuple[Side, int, int, int]]] = []
    if packing:
        used = row_len  # start a new row at once
        for p, pair in enumerate(pairs):
            pieces = pair_pieces(pair, p, share_prompt)
            n = sum(len(part) for part, *_ in pieces)
            if used + n > row_len:
                rows.append([])
                used = 0
            rows[-1] += pieces
            used += n
    else:
        rows = [[(pair.chosen, 0, 0, 2 * p)] for p, pair in enumerate(pairs)]
        rows += [[(pair.rejected, 0, 0, 2 * p + 1)] for p, pair in enumerate(pairs)]
    T = -(-max(sum(len(part) for part, *_ in row) for row in rows) // multiple) * multiple  # padded up to a multiple
    out = {"tokens": torch.full((len(rows), T), pad_id), "targets": torch.full((len(rows), T), IGNORE),
           "doc_ids": torch.full((len(rows), T), -1), "input_pos": torch.zeros(len(rows), T, dtype=torch.long),
           "seg": torch.full((len(rows), T), -1), "scored": torch.zeros(len(rows), T, dtype=torch.bool)}
    branch = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        at, doc = 0, -1
        for part, first, part_branch, seg in row:
            doc += part_branch == 0  # a new document, unless this part is a branch of the last one
            span = slice(at, at + len(part))
            out["tokens"][b, span] = torch.tensor(part.inputs)
            out["targets"][b, span] = torch.tensor(part.targets)
            out["scored"][b, span] = torch.tensor(part.scored, dtype=torch.bool)
            out["doc_ids"][b, span] = doc
            out["input_pos"][b, span] = torch.arange(first, first + len(part))
            out["seg"][b, span] = seg
            branch[b, span] = part_branch
            at += len(part)
    if share_prompt:
        out["doc_ids"] = torch.stack([out["doc_ids"], branch], dim=-1)
    out["n_pairs"] = torch.tensor(len(pairs))
    if all(p.ref is not None for p in pairs):
        out["ref_logps"] = torch.tensor([p.ref for p in pairs], dtype=torch.float32)
    return out


class PairBatches:
    """Micro-batches of `batch_size` pairs, reshuffled every epoch from (seed, epoch) as `data.Batches`
    (resuming at (epoch, index) replays the order). The interface `loop.fit` reads: `len` and `epoch`.

    With several processes each takes every `world`-th pair of a global batch. Pairs that do not
    fill a last whole batch are left to the next epoch's shuffle, unless `drop_last` is off
    (validation: every pair, in order).
    """

    def __init__(self, pairs: Sequence[PairExample], batch_size: int, max_seq_len: int, packing: bool = True,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, rank: int = 0, world: int = 1,
                 share_prompt: bool = True, multiple: int = 1):
        self.pairs, self.batch_size, self.packing, self.share_prompt = list(pairs), batch_size, packing, share_prompt
        self.multiple = multiple  # see `collate_pairs`
        self.row_len, self.seed, self.shuffle, self.drop_last = 2 * max_seq_len, seed, shuffle, drop_last
        self.rank, self.world = rank, world
        if len(self.pairs) < batch_size * world:
            raise HerdError(f"only {len(self.pairs)} training pairs, fewer than one batch "
                            f"({batch_size} x {world} processes): lower --batch-size or add data")

    def __len__(self) -> int:
        step = self.batch_size * self.world
        return len(self.pairs) // step if self.drop_last else -(-len(self.pairs) // step)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.pairs)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.pairs), generator=g).tolist()

    def epoch(self, epoch: int, start: int = 0):
        order, step = self.order(epoch), self.batch_size * self.world
        for b in range(start, len(self)):
            chunk = order[b * step:(b + 1) * step][self.rank::self.world]
            if chunk:
                yield collate_pairs([self.pairs[i] for i in chunk], self.packing, self.row_len,
                                    share_prompt=self.share_prompt, multiple=self.multiple)


def n_pairs(batch: dict) -> torch.Tensor:
    """The weight of a preference batch (`loop.fit`'s `weight=`): its pairs."""
    return batch["n_pairs"]


# -- the loss -------------------------------------------------------------------------------------

def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The preference loss of each pair, from summed log-probabilities (all (P,)).

    Args:
        chosen_logps, rejected_logps: the policy's log-probs of each response.
        ref_chosen_logps, ref_rejected_logps: the reference model's.
        beta: β, the strength of the KL constraint.
        loss_type: sigmoid (DPO: −log σ(β Δ)), hinge (SLiC: relu(1 − β Δ)), or ipo
            ((Δ per token − 1/(2β))², with each side's log-ratio divided by its token count, as TRL).
        chosen_tokens, rejected_tokens: tokens in each sum (ipo only).
    Returns:
        (losses, chosen_rewards, rejected_rewards): the rewards are β × log-ratio, detached.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise HerdError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


class _ResponseLosses(torch.autograd.Function):
    """Per-token losses (N,) of `h @ weight.T` against targets, for a frozen output layer (LoRA,
    QLoRA): each token's gradient with respect to its hidden state, (softmax - onehot) @ weight,
    does not depend on the rest of the loss but for one scalar factor, so it is formed in the
    forward over blocks of tokens (each block's logits over the whole vocabulary, then dropped) and
    the backward only scales it: two matmuls, where the vocabulary-chunked path recomputes the
    logits in the backward (three)."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows):
        dtype = matmul_dtype(h)
        w, hm = weight.to(dtype), h.to(dtype)
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], rows):
            hc, tc = hm[start:start + rows], targets[start:start + rows]
            logp = torch.log_softmax((hc @ w.T).float(), dim=-1)  # (R, V)
            losses[start:start + rows] = -logp.gather(1, tc[:, None])[:, 0]
            d = logp.exp_()
            d[torch.arange(len(tc), device=h.device), tc] -= 1.0
            grad_h[start:start + rows] = d.to(dtype) @ w
        ctx.save_for_backward(grad_h)
        ctx.dtype = h.dtype
        return losses

    @staticmethod
    def backward(ctx, grad):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad[:, None]).to(ctx.dtype), None, None, None


def response_losses(h: torch.Tensor, output: nn.Module, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """−log p of each target (N,) from hidden states h (N, D) of response positions only."""
    weight = getattr(output, "weight", None)
    if (isinstance(output, nn.Linear) and not weight.requires_grad and torch.is_grad_enabled()
            and h.requires_grad):
        return _ResponseLosses.apply(h, weight, targets, max(1, chunk * 8192 // weight.shape[0]))
    return token_losses(h, output, targets, chunk)


def sequence_logps(model: nn.Module, batch: dict, chunk: int = 8192) -> dict[str, torch.Tensor]:
    """Per segment (pair × side) of a `collate_pairs` batch, each (P, 2) [chosen, rejected]:
    logps (summed over the scored targets), nll (summed −log p over all response targets),
    tokens (response targets), scored (scored targets)."""
    P = int(batch["n_pairs"])
    h = model.hidden_states(batch["tokens"], input_pos=batch["input_pos"], doc_ids=batch["doc_ids"])
    sel = batch["targets"] != IGNORE  # only the responses' positions reach the output layer
    nll = response_losses(h[sel], model.output, batch["targets"][sel], chunk)  # (N,)
    seg, scored = batch["seg"][sel], batch["scored"][sel]

    def per_segment(values):
        return torch.zeros(2 * P, device=values.device, dtype=values.dtype).index_add(0, seg, values).view(P, 2)

    return {"logps": per_segment(-nll * scored), "nll": per_segment(nll),
            "tokens": per_segment(torch.ones_like(nll)), "scored": per_segment(scored.float())}


class DPOLoss(nn.Module):
    """The model and its summed preference loss as one module (`loop.fit`'s wrapper).

    The reference log-probs come in the batch (`ref_logps`, precomputed) or, when absent, from the
    same model with its LoRA adapters switched off (the starting policy, no second copy).
    """

    def __init__(self, model: nn.Module, beta: float = 0.1, nll_coef: float = 0.2, loss_type: str = "sigmoid",
                 loss_chunk: int = 8192):
        super().__init__()
        self.model, self.beta, self.nll_coef, self.loss_type, self.loss_chunk = \
            model, beta, nll_coef, loss_type, loss_chunk

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(P, 2) log-probs of the starting policy: the model with its adapters off."""
        from .lora import adapters_off, lora_modules

        if not lora_modules(self.model):
            raise HerdError("a full fine-tune needs precomputed reference log-probs (ref_logps)")
        with adapters_off(self.model):
            return sequence_logps(self.model, batch, self.loss_chunk)["logps"]

    def forward(self, tokens, targets, doc_ids, input_pos, seg, scored, n_pairs, ref_logps=None):
        batch = {"tokens": tokens, "targets": targets, "doc_ids": doc_ids, "input_pos": input_pos, "seg": seg,
                 "scored": scored, "n_pairs": n_pairs}
        if ref_logps is None:
            ref_logps = self.reference_logps(batch)
        s = sequence_logps(self.model, batch, self.loss_chunk)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            s["logps"][:, 0], s["logps"][:, 1], ref_logps[:, 0], ref_logps[:, 1], self.beta, self.loss_type,
            s["scored"][:, 0], s["scored"][:, 1])
        chosen_nll = s["nll"][:, 0] / s["tokens"][:, 0].clamp(min=1)  # mean per token, per pair
        loss = (losses + self.nll_coef * chosen_nll).sum()
        margin = chosen_rewards - rejected_rewards
        return loss, {"dpo_loss": losses.detach().sum(), "chosen_nll": chosen_nll.detach().sum(),
                      "reward_margin": margin.sum(), "reward_accuracy": (margin > 0).float().sum(),
                      "chosen_reward": chosen_rewards.sum(), "rejected_reward": rejected_rewards.sum()}


@torch.no_grad()
def precompute_reference(model: nn.Module, examples: list[PairExample], batch_size: int, max_seq_len: int,
                         packing: bool, device: str, chunk: int = 8192, share_prompt: bool = True) -> None:
    """Store the model's (chosen, rejected) log-probs in every example (`ref`): the reference of a
    full fine-tune, computed before the first step (so no frozen copy of the weights is kept)."""
    was_training = model.training
    model.eval()
    with autocast(device):
        for i in range(0, len(examples), batch_size):
            chunk_pairs = examples[i:i + batch_size]
            for p in chunk_pairs:
                p.ref = None
            batch = {k: v.to(device) for k, v in collate_pairs(chunk_pairs, packing, 2 * max_seq_len,
                                                                  share_prompt=share_prompt).items()}
            logps = sequence_logps(model, batch, chunk)["logps"].float().cpu()
            for p, row in zip(chunk_pairs, logps.tolist()):
                p.ref = (row[0], row[1])
    model.train(was_training)


# -- the recipe -----------------------------------------------------------------------------------

def dpo(config: DPOConfig | dict | None = None, *, on_step: Callable[[dict], None] | None = None,
        **kwargs: Any) -> dict:
    """Align a model on preference pairs with DPO (see the module doc and `DPOConfig` for the keys).

    Args:
        config: a `DPOConfig`, or a dict of its keys; `kwargs` override it.
        on_step: called with each step's metrics record (after it is logged).
    Returns:
        The summary (also written to OUT/summary.json).
    Raises:
        HerdError: a bad setting, model or data file.
    """
    from .finetune import (_checkpoint_blocks, _distribute, _save_outputs, compile_blocks, load_for_training,
                           padded_multiple, resolve_model_path)
    from .lora import lora_llama3
    from .metrics import plot_loss

    cfg, rank, world, device, out = begin(config, kwargs, DPOConfig)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    # Data: pairs, rated strongly enough, tokenized with the model's template.
    pairs, val_pairs = read_split(read_pairs, cfg)
    kept = keep_rated(pairs, cfg.min_rating)
    if not kept:
        raise HerdError(f"no pair of {cfg.data} is rated at least {cfg.min_rating!r} (min_rating)")
    model_path = resolve_model_path(cfg.model)
    model, ckpt = load_for_training(model_path, cfg.method, device)
    if cfg.max_seq_len > ckpt.args.max_seq_len:
        raise HerdError(f"max_seq_len {cfg.max_seq_len} exceeds the model's context length {ckpt.args.max_seq_len}")
    examples, stats = tokenize_pairs(ckpt.tokenizer, kept, cfg.max_seq_len, cfg.mask_format_tokens)
    stats.filtered_by_rating = len(pairs) - len(kept)
    if not examples:
        raise HerdError(f"no pair of {cfg.data} fits max_seq_len {cfg.max_seq_len}")
    val_examples, _ = tokenize_pairs(ckpt.tokenizer, keep_rated(val_pairs, cfg.min_rating), cfg.max_seq_len,
                                     cfg.mask_format_tokens)

    # Model and reference: LoRA's is the model with its adapters off; a full fine-tune's is
    # precomputed here, from the starting weights (by every process, before sharding).
    if cfg.method == "full":
        precompute_reference(model, examples + val_examples, cfg.batch_size, cfg.max_seq_len, cfg.packing, device,
                             cfg.loss_chunk, cfg.share_prompt)
    else:
        lora_llama3(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    multiple = padded_multiple(cfg.compile, 2 * cfg.max_seq_len)
    batches = PairBatches(examples, cfg.batch_size, cfg.max_seq_len, cfg.packing, cfg.seed, rank=rank, world=world,
                          share_prompt=cfg.share_prompt, multiple=multiple)
    # Validation: every pair in one process; with several, one pair per process per batch (every
    # process must run the same number of forwards), the last len % world pairs left out.
    val_batches = None
    if len(val_examples) >= world:
        val_batches = PairBatches(val_examples, cfg.batch_size if world == 1 else 1, cfg.max_seq_len, cfg.packing,
                                  shuffle=False, drop_last=world > 1, rank=rank, world=world,
                                  share_prompt=cfg.share_prompt, multiple=multiple)
    if cfg.activation_checkpointing:
        _checkpoint_blocks(model)
    if cfg.compile:
        compile_blocks(model)
    model.train()
    wrapper = DPOLoss(model, cfg.beta, cfg.nll_coef, cfg.loss_type, cfg.loss_chunk)
    if world > 1:
        wrapper = _distribute(model, wrapper, cfg.activation_checkpointing)
    if rank == 0:
        run = {**cfg.to_dict(), "model_path": str(model_path), "resume": False, "recipe": "dpo"}
        (out / "train.json").write_text(json.dumps(run, indent=2))
    result = fit(cfg, wrapper, batches, out=out, device=device, val_batches=val_batches, weight=n_pairs,
                 on_step=on_step)
    position = result["position"]

    outputs = _save_outputs(cfg, wrapper, model, ckpt, model_path, out, rank, world)
    if rank != 0:
        return {}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1] if records else {}
    pairs_seen = position["step"] * cfg.batch_size * cfg.grad_accum * world
    summary = {
        "method": cfg.method, "steps": position["step"], "epochs": position["epoch"] + 1,
        "pairs_seen": pairs_seen, "tokens": position["tokens"], "seconds": round(position["seconds"], 2),
        "wall_seconds": result["wall_seconds"],
        "pairs_per_s": round(pairs_seen / max(position["seconds"], 1e-9), 2),
        "tokens_per_s": round(position["tokens"] / max(position["seconds"], 1e-9), 1),
        "peak_memory_bytes": result["peak_memory_bytes"], "trainable_parameters": result["trainable_parameters"],
        "processes": world, "data": stats.to_dict(), "val_pairs": len(val_examples),
        "val_before": result["val_before"],
        "val_after": {k: v for k, v in last.items() if k.startswith("val_")} or None,
        "final": {k: last[k] for k in ("loss", "dpo_loss", "reward_margin", "reward_accuracy", "chosen_nll")
                  if k in last},
        "outputs": outputs,
    }
    png = plot_loss(out)
    if png is not None:
        summary["outputs"]["loss_curve"] = str(png)
    summary["outputs"]["metrics"] = str(out / "metrics.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
