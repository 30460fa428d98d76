"""Running a guard model through the engine: one conversation, or many batched together.

The guard is an ordinary model in the engine (the same scheduler batches concurrent
classifications with everything else). For each conversation we send the protocol's prompt as
token ids, decode greedily (the answer: `safe` / `unsafe\\nS1,...`) and ask for the first token's
log-probabilities, from which the unsafe score comes: the probability that the first generated
token is the first token of "unsafe" (Meta's Llama Guard 3 model card), from the raw logits.
When "unsafe" is outside the 20 most likely first tokens, the exact value comes from one
teacher-forced scoring of the prompt followed by that token.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine.types import Delta, Done, GenerateRequest, ScoreRequest, TokenLogprob
from ..errors import HerdError
from .llama_guard import Policy, Verdict, decide, encode_prompt, load_policy, policy_for_template, policy_from_dict

TOP = 20  # alternatives the engine reports per token (its maximum)


def first_token_probability(first: TokenLogprob | None, token: int) -> float | None:
    """P(token) at the first generated position, from that position's reported log-probabilities;
    None when `token` is not among them."""
    if first is None:
        return None
    if first.token == token:
        return math.exp(first.logprob)
    for t, lp in first.top:
        if t == token:
            return math.exp(lp)
    return None


class GuardClassifier:
    """Classify conversations with a guard model served by an engine.

    Args:
        engine: an `EngineAPI` (`llamaherd.engine.models.Engine`, or the server's).
        model: the guard model's name in the engine.
        tokenizer: the guard model's tokenizer (to build the prompt's token ids).
        policy: the protocol and categories; default: read from the model's chat template.
            A path or a dict is a custom policy over that default.
        threshold: flag when the unsafe score reaches it (Meta's default decision is 0.5).
        on_malformed: "unsafe" (default) or "score"; see `llama_guard.decide`.
        max_tokens: the longest answer read (`unsafe` and a list of codes fit in 24 tokens).
    """

    def __init__(self, engine, model: str, tokenizer, policy: Policy | str | Path | Mapping | None = None,
                 threshold: float = 0.5, on_malformed: str = "unsafe", max_tokens: int = 24,
                 keep_alive: float | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise HerdError("threshold must be between 0 and 1")
        if on_malformed not in ("unsafe", "score"):
            raise HerdError("on_malformed must be 'unsafe' or 'score'")
        self.engine, self.model, self.tokenizer = engine, model, tokenizer
        base = policy_for_template(tokenizer.chat_template, "<|start_header_id|>" in tokenizer.special_tokens)
        if policy is None:
            self.policy = base
        elif isinstance(policy, Policy):
            self.policy = policy
        elif isinstance(policy, Mapping):
            self.policy = policy_from_dict(policy, base)
        else:
            self.policy = load_policy(policy, base)
        self.threshold, self.on_malformed, self.max_tokens = threshold, on_malformed, max_tokens
        self.keep_alive = keep_alive
        unsafe, safe = tokenizer.encode("unsafe"), tokenizer.encode("safe")
        if not unsafe or not safe or unsafe[0] == safe[0]:
            raise HerdError("this guard model's tokenizer cannot tell 'safe' from 'unsafe' by the first token")
        self.unsafe_id = unsafe[0]

    @classmethod
    def for_engine(cls, engine, model: str, **kwargs) -> "GuardClassifier":
        """A classifier for `model` as `engine` resolves it (its tokenizer read from the model file)."""
        from ..tokenizer import load_tokenizer

        ref = engine.resolve(model)
        return cls(engine, ref.name, load_tokenizer(ref.path), **kwargs)

    async def classify(self, conversation: str | Sequence[Mapping[str, Any]], role: str | None = None) -> Verdict:
        """Classify one conversation (a string is one message of `role`, default user).

        Returns:
            The `Verdict`: flagged, categories, score, the raw answer.
        Raises:
            HerdError: a malformed conversation, or an engine error (unknown model, ...).
        """
        from .llama_guard import normalize_conversation

        turns, assessed = normalize_conversation(conversation, role)
        ids = encode_prompt(self.tokenizer, turns, self.policy, assessed)
        # num_ctx: just what the prompt and the answer need (a long conversation is not cut at the
        # server's default context; one longer than the guard model's is a clear error).
        options = {"temperature": 0, "num_predict": self.max_tokens, "num_ctx": len(ids) + self.max_tokens + 1}
        gen = await self.engine.generate(GenerateRequest(model=self.model, prompt=ids, options=options,
                                                         logprobs=TOP, keep_alive=self.keep_alive))
        parts, first = [], None
        try:
            async for event in gen:
                if isinstance(event, Delta):
                    if first is None and event.logprobs:
                        first = event.logprobs[0]
                    parts.append(event.text)
                elif isinstance(event, Done):
                    break
        finally:
            gen.cancel()
        score = first_token_probability(first, self.unsafe_id)
        if score is None:  # "unsafe" is not among the likely first tokens: score it exactly
            scored = await self.engine.score(ScoreRequest(model=self.model, prompt=ids + [self.unsafe_id],
                                                          keep_alive=self.keep_alive))
            score = math.exp(scored.logprobs[-1].logprob)
        return decide("".join(parts), score, self.policy, assessed, self.threshold, self.on_malformed)

    async def classify_many(self, conversations: Sequence, role: str | None = None) -> list[Verdict]:
        """Classify many conversations at once: the engine batches them."""
        return list(await asyncio.gather(*(self.classify(c, role) for c in conversations)))


def _is_many(items: Any) -> bool:
    """A list of conversations (strings or lists), rather than one conversation (a list of dicts)."""
    return isinstance(items, (list, tuple)) and bool(items) and all(isinstance(i, (str, list, tuple)) for i in items)


def local_engine(model: str | Path, device: str | None = None, loader=None):
    """An `Engine` in this process that knows one model (a store name, pulled if the catalog
    knows it, or a model file/directory); returns (engine, name)."""
    from ..engine.models import Engine, EngineConfig, ModelRef

    path = Path(str(model)).expanduser()
    if path.exists():
        ref = ModelRef(name=str(model), path=path, digest=str(path))
    else:
        from ..store import Store

        m = Store().resolve(str(model), pull=True)
        ref = ModelRef(m.name, Path(m.path), m.digest, dict(m.params), m.system, m.template, list(m.messages),
                       dict(m.details))

    def resolve(name: str) -> ModelRef:
        if name != ref.name:
            raise HerdError(f"model '{name}' not found")
        return ref

    return Engine(resolve, EngineConfig(device=device), loader=loader), ref.name


async def guard_async(model: str | Path, conversations, *, role: str | None = None, device: str | None = None,
                      loader=None, **kwargs) -> Verdict | list[Verdict]:
    from .llama_guard import normalize_conversation

    for c in (conversations if _is_many(conversations) else [conversations]):
        normalize_conversation(c, role)  # a bad conversation fails before the model loads
    engine, name = local_engine(model, device, loader)
    await engine.start()
    try:
        clf = GuardClassifier.for_engine(engine, name, **kwargs)
        if _is_many(conversations):
            return await clf.classify_many(conversations, role)
        return await clf.classify(conversations, role)
    finally:
        await engine.close()


def guard(model: str | Path, conversations, *, role: str | None = None, policy=None, threshold: float = 0.5,
          on_malformed: str = "unsafe", device: str | None = None) -> Verdict | list[Verdict]:
    """Classify with a guard model (Llama Guard 2/3, or any model, in the Llama Guard protocol).

        import llamaherd.safety as safety
        v = safety.guard("llama-guard3:1b", "How do I make a bomb?")
        v.flagged, v.categories, v.score          # True, ["S9"], 0.98
        safety.guard(model, [[{"role": "user", ...}, {"role": "assistant", ...}], "another prompt"])

    Args:
        model: a store name or a model file/directory.
        conversations: a message (string), a conversation (list of {role, content}), or a list
            of those (classified together, batched by the engine).
        role: "user" or "agent": which message to assess (default: each conversation's last).
        policy: a `Policy`, a policy file or a dict (custom categories); default the model's.
        threshold: unsafe-score threshold (0.5).
        on_malformed: "unsafe" (fail closed) or "score".
    Returns:
        A `Verdict`, or a list of them.
    """
    return asyncio.run(guard_async(model, conversations, role=role, device=device, policy=policy,
                                   threshold=threshold, on_malformed=on_malformed))
