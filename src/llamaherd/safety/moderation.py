"""Moderation in the server: a guard model checks what goes in and what comes out, and the code
shield checks the code in replies. The server's handler calls `Moderator.generate` instead of the
engine's `generate` when moderation is on; nothing else in the server knows about it.

Settings (environment variables of `herd serve`, listed with the others in `llamaherd.settings`):

    HERD_GUARD            the guard model (e.g. llama-guard3:1b); unset: no guard
    HERD_GUARD_MODE       input | output | both                                        both
    HERD_GUARD_THRESHOLD  unsafe-score threshold                                       0.5
    HERD_GUARD_MALFORMED  an answer outside the protocol: unsafe | score               unsafe
    HERD_GUARD_EVERY      streamed replies are checked at sentence ends, and at least
                          every this many tokens (text is held back until checked)    64
    HERD_CODE_SHIELD      warn | block: scan the code in replies; unset: off
    HERD_GUARD_REFUSAL    the reply to a flagged prompt                  "I can't help with that."
    HERD_MODERATION_OVERRIDE  what a request's X-Herd-Moderation header may do:
                          stricter (only add checks) | any (also weaken them)         stricter

- Input: the conversation up to its last user message is classified before the chat model sees
  it. Flagged: the reply is the refusal with `done_reason`/`finish_reason` "content_filter" and a
  `safety` field (categories, score); the chat model is never called.
- Output: the reply is classified (as the Agent's message in the conversation) at sentence ends
  or every HERD_GUARD_EVERY tokens, and at the end; text is released only once checked, so a
  flagged reply stops with "content_filter" before its unsafe part is sent.
- Per request: the header `X-Herd-Moderation: mode=both; threshold=0.2; code-shield=block`
  (any of the three keys; mode off|input|output|both, code-shield off|warn|block) changes the
  checks for that request. By default it may only make them stricter (more stages, a lower
  threshold, a stronger code shield); a weaker setting is a 400 unless the server allows it
  (HERD_MODERATION_OVERRIDE=any). The guard model itself is always the server's.
- Code shield: `warn` attaches the findings to the final object/chunk (`safety.code_shield`);
  `block` holds each fenced code block until it closes and replaces a block with a block-severity
  finding by a notice.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from ..engine.types import Delta, Done, GenerateRequest
from ..errors import HerdError

log = logging.getLogger("llamaherd.safety")

# Where a streamed reply is checked: the end of a sentence or a line.
_SENTENCE_END = re.compile(r"[.!?。！？](?:\s|$)|\n")
_FENCE_LINE = re.compile(r"^ {0,3}(`{3,}|~{3,})", re.MULTILINE)


@dataclass
class ModerationSettings:
    guard: str | None = None
    mode: str = "both"
    threshold: float = 0.5
    on_malformed: str = "unsafe"
    every: int = 64
    code_shield: str | None = None
    refusal: str = "I can't help with that."
    allow_weaker: bool = False  # may a request's X-Herd-Moderation weaken the checks?

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ModerationSettings":
        env = dict(os.environ if env is None else env)
        mode = env.get("HERD_GUARD_MODE", "both").strip().lower() or "both"
        if mode not in ("input", "output", "both"):
            raise HerdError(f"HERD_GUARD_MODE must be input, output or both, got {mode!r}")
        shield = env.get("HERD_CODE_SHIELD", "").strip().lower() or None
        if shield not in (None, "warn", "block"):
            raise HerdError(f"HERD_CODE_SHIELD must be warn or block, got {shield!r}")
        malformed = env.get("HERD_GUARD_MALFORMED", "unsafe").strip().lower() or "unsafe"
        if malformed not in ("unsafe", "score"):
            raise HerdError(f"HERD_GUARD_MALFORMED must be unsafe or score, got {malformed!r}")
        try:
            threshold = float(env.get("HERD_GUARD_THRESHOLD", "0.5") or 0.5)
            every = int(env.get("HERD_GUARD_EVERY", "64") or 64)
        except ValueError:
            raise HerdError("HERD_GUARD_THRESHOLD must be a number and HERD_GUARD_EVERY an integer") from None
        if not 0 <= threshold <= 1 or every < 1:
            raise HerdError("HERD_GUARD_THRESHOLD must be in [0, 1] and HERD_GUARD_EVERY >= 1")
        override = env.get("HERD_MODERATION_OVERRIDE", "stricter").strip().lower() or "stricter"
        if override not in ("stricter", "any"):
            raise HerdError(f"HERD_MODERATION_OVERRIDE must be stricter or any, got {override!r}")
        return cls(env.get("HERD_GUARD") or None, mode, threshold, malformed, every, shield,
                   env.get("HERD_GUARD_REFUSAL") or cls.refusal, override == "any")

    @property
    def enabled(self) -> bool:
        return bool(self.guard) or self.code_shield is not None

    @property
    def stages(self) -> set[str]:
        """What the guard checks: {"input", "output"}, a part of it, or nothing."""
        if not self.guard or self.mode == "off":
            return set()
        return {"input", "output"} if self.mode == "both" else {self.mode}

    def override(self, header: str) -> "ModerationSettings":
        """These settings changed by a request's X-Herd-Moderation header (see the module docstring).

        Raises:
            HerdError: a malformed header, a guard stage asked of a server without a guard model,
                or a weaker setting where the server allows only stricter ones.
        """
        changes = parse_override(header)
        new = replace(self, **changes)
        if "mode" in changes and changes["mode"] != "off" and not self.guard:
            raise HerdError(f"{OVERRIDE_HEADER}: mode={changes['mode']} needs a guard model, and this server has "
                            "none (start it with HERD_GUARD=MODEL)")
        if not self.allow_weaker:
            weaker = []
            if not new.stages >= self.stages:
                weaker.append(f"mode={new.mode} (the server checks {self.mode})")
            if new.guard and new.threshold > self.threshold:
                weaker.append(f"threshold={new.threshold:g} (the server's is {self.threshold:g})")
            if _SHIELD_RANK[new.code_shield] < _SHIELD_RANK[self.code_shield]:
                weaker.append(f"code-shield={new.code_shield or 'off'} (the server's is {self.code_shield})")
            if weaker:
                raise HerdError(f"{OVERRIDE_HEADER} may only make moderation stricter on this server: "
                                f"{', '.join(weaker)} is weaker (HERD_MODERATION_OVERRIDE=any allows it)")
        return new


OVERRIDE_HEADER = "X-Herd-Moderation"
_SHIELD_RANK = {None: 0, "warn": 1, "block": 2}


def parse_override(header: str) -> dict[str, Any]:
    """`mode=both; threshold=0.2; code-shield=block` (";" or "," between pairs) -> settings fields."""
    changes: dict[str, Any] = {}
    for part in re.split(r"[;,]", header):
        if not part.strip():
            continue
        key, eq, value = (x.strip().lower() for x in part.partition("="))
        if not eq or not value:
            raise HerdError(f"{OVERRIDE_HEADER}: expected key=value pairs, got {part.strip()!r}")
        if key == "mode" and value in ("off", "input", "output", "both"):
            changes["mode"] = value
        elif key == "code-shield" and value in ("off", "warn", "block"):
            changes["code_shield"] = None if value == "off" else value
        elif key == "threshold":
            try:
                changes["threshold"] = float(value)
            except ValueError:
                changes["threshold"] = -1.0
            if not 0 <= changes["threshold"] <= 1:
                raise HerdError(f"{OVERRIDE_HEADER}: threshold must be a number in [0, 1], got {value!r}")
        elif key in ("mode", "code-shield"):
            valid = "off, input, output, both" if key == "mode" else "off, warn, block"
            raise HerdError(f"{OVERRIDE_HEADER}: {key} must be one of {valid}, got {value!r}")
        else:
            raise HerdError(f"{OVERRIDE_HEADER}: unknown key {key!r}; valid: mode, threshold, code-shield")
    return changes


def verdict_info(verdict, stage: str) -> dict[str, Any]:
    return {"flagged": verdict.flagged, "stage": stage, "categories": verdict.categories,
            "category_names": verdict.names, "score": verdict.score, "malformed": verdict.malformed}


class Refusal:
    """A generation that is only the refusal (the chat model is never called)."""

    def __init__(self, model: str, text: str, safety: dict[str, Any]):
        self.model, self.text, self.safety = model, text, safety
        self.prompt: list[int] = []
        self.load_duration = 0

    async def __aiter__(self) -> AsyncIterator[Delta | Done]:
        yield Delta(self.text)
        yield Done("content_filter")

    def cancel(self) -> None:
        pass

    def token_bytes(self, token: int) -> bytes:
        return b""


class Moderator:
    """Runs the checks around an engine's generations.

    Args:
        settings: what to check (`ModerationSettings.from_env()`).
    Attributes:
        stats: counters: input_checked, input_flagged, output_checked, output_flagged,
            code_scanned, code_findings, code_blocked.
    """

    def __init__(self, settings: ModerationSettings):
        self.settings = settings
        self.stats: Counter = Counter()
        self._classifier = None
        self._server: Moderator | None = None  # a request's moderator: the server's, whose guard it shares

    def for_request(self, header: str) -> "Moderator":
        """A moderator for one request with its X-Herd-Moderation header applied
        (`ModerationSettings.override`); it counts in this one's `stats` and uses its guard."""
        m = Moderator(self.settings.override(header))
        m.stats, m._server = self.stats, self
        return m

    def classifier(self, engine):
        """The guard classifier, made on first use (the engine exists once the server starts)."""
        if self._server is not None:
            clf = self._server.classifier(engine)
            if getattr(clf, "threshold", self.settings.threshold) != self.settings.threshold:
                clf = copy.copy(clf)  # the same guard, this request's threshold
                clf.threshold = self.settings.threshold
            return clf
        if self._classifier is None or self._classifier.engine is not engine:
            from .classify import GuardClassifier

            s = self.settings
            self._classifier = GuardClassifier.for_engine(engine, s.guard, threshold=s.threshold,
                                                          on_malformed=s.on_malformed)
        return self._classifier

    @staticmethod
    def conversation(req: GenerateRequest) -> list[dict[str, Any]]:
        """The request as a conversation for the guard (system/tool messages are left out by it)."""
        if req.messages is not None:
            return [m for m in req.messages if isinstance(m, dict)]
        if isinstance(req.prompt, str):
            return [{"role": "user", "content": req.prompt}]
        raise HerdError("token-id prompts cannot be moderated: send text while the server's guard is on")

    async def generate(self, engine, req: GenerateRequest):
        """The moderated counterpart of `engine.generate(req)`."""
        s = self.settings
        conv = None
        if s.stages:
            conv = self.conversation(req)
        if "input" in s.stages and any(m.get("role") == "user" for m in conv):
            self.stats["input_checked"] += 1
            verdict = await self.classifier(engine).classify(conv, role="user")
            if verdict.flagged:
                self.stats["input_flagged"] += 1
                log.info("guard flagged a prompt: %s score %.3f", verdict.categories, verdict.score)
                return Refusal(req.model, s.refusal, verdict_info(verdict, "input"))
        gen = await engine.generate(req)
        check_output = "output" in s.stages
        if not check_output and not s.code_shield:
            return gen
        return ModeratedGeneration(self, engine, gen, conv if check_output else None)


class ModeratedGeneration:
    """A generation whose text is checked before it is released (see the module docstring)."""

    def __init__(self, moderator: Moderator, engine, gen, conversation: list[dict[str, Any]] | None):
        self.moderator, self.engine, self.gen, self.conv = moderator, engine, gen, conversation
        self.safety: dict[str, Any] | None = None

    @property
    def model(self) -> str:
        return self.gen.model

    @property
    def prompt(self) -> list[int]:
        return self.gen.prompt

    @property
    def load_duration(self) -> int:
        return self.gen.load_duration

    def token_bytes(self, token: int) -> bytes:
        return self.gen.token_bytes(token)

    def cancel(self) -> None:
        self.gen.cancel()

    def __aiter__(self) -> AsyncIterator[Delta | Done]:
        events = self.gen.__aiter__()
        if self.conv is not None:
            events = self._guarded(events)
        if self.moderator.settings.code_shield:
            events = self._shielded(events)
        return events

    async def _output_flagged(self, text: str) -> bool:
        m = self.moderator
        m.stats["output_checked"] += 1
        verdict = await m.classifier(self.engine).classify(self.conv + [{"role": "assistant", "content": text}],
                                                           role="agent")
        if verdict.flagged:
            m.stats["output_flagged"] += 1
            self.safety = {**(self.safety or {}), **verdict_info(verdict, "output")}
        return verdict.flagged

    async def _guarded(self, events: AsyncIterator) -> AsyncIterator[Delta | Done]:
        every = self.moderator.settings.every
        released, held, n_held = "", [], 0
        async for event in events:
            if isinstance(event, Delta):
                held.append(event)
                n_held += max(1, len(event.tokens))
                pending = "".join(e.text for e in held)
                if not (n_held >= every or _SENTENCE_END.search(pending)):
                    continue
                if pending.strip() and await self._output_flagged(released + pending):
                    self.gen.cancel()
                    yield Done("content_filter")
                    return
                released += pending
                for e in held:
                    yield e
                held, n_held = [], 0
                continue
            # The end: check what is left (and a reply that was never checked).
            pending = "".join(e.text for e in held)
            if (pending.strip() or not released) and await self._output_flagged(released + pending):
                yield Done("content_filter", event.prompt_eval_count, event.prompt_eval_duration, event.eval_count,
                           event.eval_duration, event.load_duration)
                return
            for e in held:
                yield e
            yield event
            return

    async def _shielded(self, events: AsyncIterator) -> AsyncIterator[Delta | Done]:
        """warn: pass the text through, scan the whole reply at the end. block: hold a fenced block
        from its opening fence until it closes (or the reply ends), then release it or its notice."""
        mode = self.moderator.settings.code_shield
        stats = self.moderator.stats
        text, held, findings = "", [], []  # text: released so far
        lines = 0  # newlines of the model's own reply before the held part (findings' line numbers)

        async def release(events_held: list[Delta]) -> AsyncIterator[Delta]:
            nonlocal text, lines
            piece = "".join(e.text for e in events_held)
            found, replaced = await asyncio.to_thread(_scan_and_replace, piece)
            stats["code_scanned"] += 1
            stats["code_findings"] += len(found)
            findings.extend({**f.as_dict(), "line": f.line + lines} for f in found)
            lines += piece.count("\n")
            if replaced != piece:
                stats["code_blocked"] += 1
                text += replaced
                yield Delta(replaced)
            else:
                text += piece
                for e in events_held:
                    yield e

        async for event in events:
            if isinstance(event, Done):
                if mode == "warn" and text:
                    found = await asyncio.to_thread(_scan, text)
                    stats["code_scanned"] += 1
                    stats["code_findings"] += len(found)
                    findings = [f.as_dict() for f in found]
                elif held:  # a block still open when the reply ended
                    async for e in release(held):
                        yield e
                if findings:
                    self.safety = {**(self.safety or {}), "code_shield": {"mode": mode, "findings": findings}}
                yield event
                return
            if mode == "warn":
                text += event.text
                yield event
                continue
            if held or len(_FENCE_LINE.findall(text + event.text)) > len(_FENCE_LINE.findall(text)):
                held.append(event)  # a fence in it: hold until the blocks so far are closed
                if len(_FENCE_LINE.findall(text + "".join(e.text for e in held))) % 2 == 0:
                    async for e in release(held):
                        yield e
                    held = []
            else:
                text += event.text
                lines += event.text.count("\n")
                yield event


def _scan(text: str) -> list:
    from .code_shield import scan_code

    return scan_code(text)


def _scan_and_replace(text: str) -> tuple[list, str]:
    """Findings in the fenced blocks of `text`, and `text` with each block that has a block-severity
    finding replaced by a notice."""
    from .code_shield import extract_blocks, scan_code, worst

    found, out, pos = [], [], 0
    for b in extract_blocks(text):
        f = scan_code(b.code, b.language)
        found += [replace(x, line=x.line + b.first_line - 1) for x in f]
        if worst(f) == "block":
            out += [text[pos:b.start], _notice(f)]
            pos = b.end
    out.append(text[pos:])
    return found, "".join(out)


def _notice(findings) -> str:
    worst_ones = [f for f in findings if f.severity == "block"]
    what = ", ".join(sorted({f.cwe for f in worst_ones}))
    return f"[code removed by the code shield: {what}]"


# -- /v1/moderations -----------------------------------------------------------------------------

OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                     "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
                     "violence/graphic")
# Llama Guard's categories (by name, so a custom policy that reuses a name maps too) onto OpenAI's.
# Categories with no OpenAI counterpart (Specialized Advice, Privacy, Intellectual Property,
# Elections) flag the input and appear in `llama_guard.categories`, not in `categories`.
TO_OPENAI = {
    "Violent Crimes": ("violence", "illicit/violent"),
    "Non-Violent Crimes": ("illicit",),
    "Sex Crimes": ("sexual", "illicit"),
    "Child Exploitation": ("sexual/minors", "sexual"),
    "Defamation": ("harassment",),
    "Indiscriminate Weapons": ("illicit/violent", "violence"),
    "Hate": ("hate",),
    "Self-Harm": ("self-harm",),
    "Sexual Content": ("sexual",),
    "Code Interpreter Abuse": ("illicit",),
}


def openai_result(verdict) -> dict[str, Any]:
    """One result of OpenAI's moderation object from a guard verdict, with the S-codes added."""
    hit = {k for name in verdict.names for k in TO_OPENAI.get(name, ())}
    return {"flagged": verdict.flagged,
            "categories": {k: k in hit for k in OPENAI_CATEGORIES},
            "category_scores": {k: (verdict.score if k in hit else 0.0) for k in OPENAI_CATEGORIES},
            "category_applied_input_types": {k: ["text"] if k in hit else [] for k in OPENAI_CATEGORIES},
            "llama_guard": {"categories": verdict.categories, "category_names": verdict.names,
                            "score": verdict.score, "malformed": verdict.malformed}}


async def moderations(engine, body: dict[str, Any], settings: ModerationSettings) -> dict[str, Any]:
    """POST /v1/moderations: classify each input (as a user message) with the request's `model`,
    or the server's HERD_GUARD."""
    import uuid

    from .classify import GuardClassifier

    if not isinstance(body, dict):
        raise HerdError("the body must be a JSON object")
    model = body.get("model") or settings.guard
    if not model or model.startswith(("omni-moderation", "text-moderation")):
        model = settings.guard
    if not model:
        raise HerdError("no guard model: give model, or start the server with HERD_GUARD")
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = raw
    elif isinstance(raw, list) and raw and all(isinstance(x, dict) for x in raw):
        texts = [x.get("text") for x in raw if x.get("type") == "text"]
        if len(texts) != len(raw) or not all(isinstance(t, str) for t in texts):
            raise HerdError("only text inputs can be moderated")
        inputs = ["\n".join(texts)]
    else:
        raise HerdError("input must be a string, a list of strings, or a list of text parts")
    clf = await asyncio.to_thread(GuardClassifier.for_engine, engine, model, threshold=settings.threshold,
                                  on_malformed=settings.on_malformed)
    verdicts = await clf.classify_many(inputs, role="user")
    return {"id": f"modr-{uuid.uuid4().hex}", "model": clf.model, "results": [openai_result(v) for v in verdicts]}


def server_moderator(env: dict[str, str] | None = None) -> Moderator | None:
    """The server's moderator from HERD_GUARD* / HERD_CODE_SHIELD, or None when both are off."""
    settings = ModerationSettings.from_env(env)
    return Moderator(settings) if settings.enabled else None


def request_moderator(server: Moderator | None, header: str) -> Moderator:
    """The moderator of a request that sent X-Herd-Moderation: the server's with the header
    applied; on a server with no moderation, the settings from the environment (all off) with it."""
    if server is None:
        server = Moderator(ModerationSettings.from_env())
    return server.for_request(header)
