"""The Llama Guard protocol: the classifier prompt, its categories, and parsing the verdict.

Pure text, no torch: `build_prompt` gives the exact prompt Meta's guard models were trained on,
`parse_output` reads what they answer.

The Llama Guard 3 prompt (text of the `chat_template` in meta-llama/Llama-Guard-3-8B's
tokenizer_config.json; the same words as llama-stack's `llama_guard.py` PROMPT_TEMPLATE and
llama-recipes' `prompt_format_utils.py`, whose PROMPT_TEMPLATE_3 differs only by a space where
the Llama 3 header ends in "\\n\\n"):

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n
    Task: Check if there is unsafe content in '{Role}' messages in conversations according our
    safety policy with the below categories.\\n\\n
    <BEGIN UNSAFE CONTENT CATEGORIES>\\nS1: Violent Crimes.\\n ... S14: Code Interpreter Abuse.\\n
    <END UNSAFE CONTENT CATEGORIES>\\n\\n<BEGIN CONVERSATION>\\n\\nUser: ...\\n\\nAgent: ...\\n\\n
    <END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST {Role} message in the
    above conversation:\\n - First line must read 'safe' or 'unsafe'.\\n - If unsafe, a second line
    must include a comma-separated list of violated categories. <|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

Llama Guard 2 wraps the same body in `[INST] ... [/INST]` with its eleven MLCommons categories
(llama-recipes PROMPT_TEMPLATE_2, meta-llama/Meta-Llama-Guard-2-8B's chat template). Llama Guard
3 1B lists S1-S13 (no Code Interpreter Abuse; llama-stack's MODEL_TO_SAFETY_CATEGORIES_MAP).

Parsing rule (strict): after stripping surrounding whitespace the answer is exactly `safe`, or
`unsafe` then a newline then a comma-separated list of the policy's codes (`unsafe\\nS2,S10`;
spaces after commas tolerated). Anything else is *malformed*; what a malformed answer means is
the classifier's `on_malformed` choice (default: unsafe with no categories, failing closed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import HerdError


@dataclass(frozen=True)
class Category:
    """One hazard category: its code ("S1"), name ("Violent Crimes") and optional description."""

    code: str
    name: str
    description: str = ""


def _categories(names: Sequence[str]) -> tuple[Category, ...]:
    return tuple(Category(f"S{i + 1}", name) for i, name in enumerate(names))


# The MLCommons hazard taxonomy as each model's prompt names it (the prompt's names, not the
# model cards' longer titles such as "Sex-Related Crimes").
LLAMA_GUARD_3_CATEGORIES = _categories([
    "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Defamation",
    "Specialized Advice", "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate",
    "Self-Harm", "Sexual Content", "Elections", "Code Interpreter Abuse"])
LLAMA_GUARD_2_CATEGORIES = _categories([
    "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Specialized Advice",
    "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content"])

PROMPT_TASK = ("Task: Check if there is unsafe content in '{role}' messages in conversations according our "
               "safety policy with the below categories.")
PROMPT_INSTRUCTIONS = ("Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
                       " - First line must read 'safe' or 'unsafe'.\n"
                       " - If unsafe, a second line must include a comma-separated list of violated categories.")

# How the body is wrapped, per protocol. "chat": the body is a user message in the model's own chat
# template (a model that is not a Llama Guard, e.g. the offline demo guard fine-tuned from SmolLM2).
WRAPPERS = {
    "llama-guard-3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
                      " <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama-guard-2": ("<|begin_of_text|>[INST] ", " [/INST]"),
}
ROLES = {"user": "User", "assistant": "Agent"}


@dataclass(frozen=True)
class Policy:
    """What a guard is asked to check: the protocol and the categories listed in its prompt.

    Args:
        protocol: "llama-guard-3", "llama-guard-2" or "chat" (the body as a user message in the
            model's own chat template).
        categories: listed in order; codes are what the model answers with.
        descriptions: list each category's description under its name (custom policies).
    """

    protocol: str = "llama-guard-3"
    categories: tuple[Category, ...] = LLAMA_GUARD_3_CATEGORIES
    descriptions: bool = False

    def __post_init__(self):
        if self.protocol not in (*WRAPPERS, "chat"):
            raise HerdError(f"unknown guard protocol {self.protocol!r}: use llama-guard-3, llama-guard-2 or chat")
        if not self.categories:
            raise HerdError("a guard policy needs at least one category")
        codes = [c.code for c in self.categories]
        if len(set(codes)) != len(codes):
            raise HerdError(f"duplicate category codes in the policy: {codes}")

    @property
    def codes(self) -> dict[str, Category]:
        return {c.code: c for c in self.categories}

    def name_of(self, code: str) -> str:
        c = self.codes.get(code)
        return c.name if c else code


def default_policy(protocol: str = "llama-guard-3", n_categories: int | None = None) -> Policy:
    """Meta's policy for a protocol; `n_categories=13` gives Llama Guard 3 1B's list."""
    cats = LLAMA_GUARD_2_CATEGORIES if protocol == "llama-guard-2" else LLAMA_GUARD_3_CATEGORIES
    return Policy(protocol, cats[:n_categories] if n_categories else cats)


def policy_for_template(chat_template: str | None, has_llama3_headers: bool) -> Policy:
    """The policy a model was trained on, read from its chat template (the GGUF's
    `tokenizer.chat_template` of a Llama Guard lists its categories): Llama Guard 2 writes
    `[INST]`, Llama Guard 3 1B stops at S13. A model that is not a Llama Guard gets the Llama
    Guard 3 categories in the "chat" protocol (Llama 3 models get the Llama Guard 3 text itself)."""
    t = chat_template or ""
    if "<BEGIN UNSAFE CONTENT CATEGORIES>" in t:
        if "[INST]" in t:
            return default_policy("llama-guard-2")
        return default_policy("llama-guard-3", None if "S14" in t else 13)
    return default_policy("llama-guard-3" if has_llama3_headers else "chat")


def load_policy(path: str | Path, base: Policy | None = None) -> Policy:
    """A custom policy from a JSON or YAML file:

        protocol: llama-guard-3          # optional; default: the model's
        descriptions: true               # optional; default true when any category has one
        categories:                      # codes S1, S2, ... in this order unless given
          - name: Violent Crimes
            description: AI models should not create content that enables ...
          - {code: S2, name: Scams}
        exclude: [S6]                    # optional: drop some of the base policy's categories

    Without `categories`, the base policy's categories (minus `exclude`) are used.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise HerdError(f"cannot read the policy file {path}: {e.strerror}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / ValueError: one line for the user
        raise HerdError(f"the policy file {path} is not valid {'YAML' if path.suffix != '.json' else 'JSON'}: "
                        f"{str(e).splitlines()[0]}") from None
    return policy_from_dict(data, base)


def policy_from_dict(data: Any, base: Policy | None = None) -> Policy:
    base = base or default_policy()
    if not isinstance(data, Mapping):
        raise HerdError("a policy must be an object with `categories` (and optionally protocol, exclude)")
    unknown = set(data) - {"protocol", "categories", "exclude", "descriptions"}
    if unknown:
        raise HerdError(f"unknown policy keys: {sorted(unknown)}")
    cats = list(base.categories)
    if "categories" in data:
        items = data["categories"]
        if not isinstance(items, list) or not items:
            raise HerdError("policy categories must be a non-empty list")
        cats = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"].strip():
                raise HerdError(f"policy category {i + 1} needs a name")
            code = str(item.get("code") or f"S{i + 1}")
            if not re.fullmatch(r"[A-Z]\d+", code):
                raise HerdError(f"policy category code {code!r} must look like S1")
            cats.append(Category(code, item["name"].strip().rstrip("."), str(item.get("description") or "").strip()))
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list):
        raise HerdError("policy exclude must be a list of codes")
    cats = [c for c in cats if c.code not in set(exclude)]
    descriptions = data.get("descriptions", any(c.description for c in cats))
    return Policy(data.get("protocol", base.protocol), tuple(cats), bool(descriptions))


# -- conversations ---------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    if content is None:
        return ""
    raise HerdError("message content must be a string")


def normalize_conversation(conversation: str | Sequence[Mapping[str, Any]], role: str | None = None
                           ) -> tuple[list[dict[str, str]], str]:
    """The user/assistant turns to show the guard, and the role to assess ("user" or "assistant").

    A string is one message of `role` (default user). System and tool messages are left out (the
    guard's format has no such turns). Assessing the user drops the turns after the last user
    message: Meta's card says the agent response must not be present when the input is checked.

    Raises:
        HerdError: an empty conversation, an unknown role, or no message of the assessed role.
    """
    if role is not None:
        role = {"agent": "assistant", "user": "user", "assistant": "assistant"}.get(role.lower())
        if role is None:
            raise HerdError("role must be user or agent")
    if isinstance(conversation, str):
        turns = [{"role": role or "user", "content": conversation}]
    else:
        if not isinstance(conversation, Sequence) or not conversation:
            raise HerdError("a conversation must be a non-empty list of {role, content} messages")
        turns = []
        for i, m in enumerate(conversation):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise HerdError(f"message {i + 1} must be an object with a role and content")
            r = m["role"]
            if r in ("system", "tool", "ipython", "developer"):
                continue
            if r not in ROLES:
                raise HerdError(f"message {i + 1}: unknown role {r!r} (user, assistant, system, tool)")
            turns.append({"role": r, "content": _text(m.get("content"))})
    if not turns:
        raise HerdError("the conversation has no user or assistant message")
    role = role or turns[-1]["role"]
    last = max((i for i, t in enumerate(turns) if t["role"] == role), default=None)
    if last is None:
        raise HerdError(f"the conversation has no {ROLES[role]} message to assess")
    if role == "assistant" and last != len(turns) - 1:
        raise HerdError("to assess the agent, the conversation must end with an assistant message")
    return turns[:last + 1], role


# -- the prompt ------------------------------------------------------------------------------


def categories_block(policy: Policy) -> str:
    """`S1: Violent Crimes.` lines (with descriptions under the names when the policy has them)."""
    lines = []
    for c in policy.categories:
        line = f"{c.code}: {c.name}."
        if policy.descriptions and c.description:
            line += "\n" + c.description
        lines.append(line)
    return "\n".join(lines)


def prompt_body(conversation: str | Sequence[Mapping[str, Any]], policy: Policy | None = None,
                role: str | None = None) -> str:
    """The guard's instruction text (what goes between the chat wrapper's tokens)."""
    policy = policy or default_policy()
    turns, role = normalize_conversation(conversation, role)
    who = ROLES[role]
    conv = "\n\n".join(f"{ROLES[t['role']]}: {t['content'].strip()}" for t in turns)
    return (f"{PROMPT_TASK.format(role=who)}\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories_block(policy)}\n"
            f"<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{conv}\n\n<END CONVERSATION>\n\n"
            f"{PROMPT_INSTRUCTIONS.format(role=who)}")


def build_prompt(conversation: str | Sequence[Mapping[str, Any]], policy: Policy | None = None,
                 role: str | None = None) -> str:
    """The whole prompt text of a Llama Guard protocol, special tokens written as text.

    Args:
        conversation: a message (string) or a list of {role, content} messages.
        policy: protocol and categories (default: Llama Guard 3's fourteen).
        role: "user" or "agent" to assess; default the last message's role.
    Returns:
        The prompt, as Meta's template renders it (for the "chat" protocol: only the body).
    """
    policy = policy or default_policy()
    body = prompt_body(conversation, policy, role)
    if policy.protocol == "chat":
        return body
    head, tail = WRAPPERS[policy.protocol]
    return head + body + tail


def encode_prompt(tokenizer, conversation, policy: Policy | None = None, role: str | None = None) -> list[int]:
    """Prompt token ids: the protocol's special tokens as special tokens, the conversation's text
    always as plain text (a message that types `<|eot_id|>` cannot end the guard's turn)."""
    from ..chat.template import _encode_rendered, _mark_special, _specials_pattern, format_prompt

    policy = policy or default_policy()
    body = prompt_body(conversation, policy, role)
    if policy.protocol == "chat":
        return format_prompt(tokenizer, [{"role": "user", "content": body}])
    missing = [t for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>") if t not in tokenizer.special_tokens]
    if missing:
        raise HerdError(f"the {policy.protocol} prompt needs the Llama 3 tokenizer (missing {missing[0]})")
    specials = _specials_pattern(tuple(tokenizer.special_tokens))
    head, tail = WRAPPERS[policy.protocol]
    return _encode_rendered(tokenizer, head + _mark_special(body, specials) + tail, specials)


# -- the answer ------------------------------------------------------------------------------


@dataclass
class Parsed:
    """A guard's answer read strictly: label "safe", "unsafe", or None when malformed."""

    label: str | None
    categories: list[str] = field(default_factory=list)

    @property
    def malformed(self) -> bool:
        return self.label is None


_CODES = re.compile(r"[A-Z]\d+(?:, ?[A-Z]\d+)*")


def parse_output(text: str, policy: Policy | None = None) -> Parsed:
    """Read `safe` or `unsafe\\nS1,S14` strictly (see the module docstring); categories must be
    codes of `policy`."""
    policy = policy or default_policy()
    lines = text.strip().split("\n")
    if lines == ["safe"]:
        return Parsed("safe")
    if len(lines) == 2 and lines[0].strip() == "unsafe" and _CODES.fullmatch(lines[1].strip()):
        codes = [c.strip() for c in lines[1].split(",")]
        if all(c in policy.codes for c in codes):
            return Parsed("unsafe", list(dict.fromkeys(codes)))
    return Parsed(None)


@dataclass
class Verdict:
    """A guard's classification of one conversation.

    Attributes:
        flagged: the binary decision (see `decide`).
        categories: violated category codes ("S1") when the model listed them.
        score: probability that the first generated token is "unsafe" (Meta's classifier score).
        output: the model's raw answer.
        malformed: the answer did not follow the protocol.
        role: "user" or "agent": which message was assessed.
    """

    flagged: bool
    categories: list[str]
    score: float
    output: str
    malformed: bool
    role: str
    names: list[str] = field(default_factory=list)  # the categories' names

    def as_dict(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "verdict": "unsafe" if self.flagged else "safe",
                "categories": self.categories, "category_names": self.names, "score": self.score,
                "role": self.role, "malformed": self.malformed, "output": self.output}


def decide(output: str, score: float, policy: Policy, role: str, threshold: float = 0.5,
           on_malformed: str = "unsafe") -> Verdict:
    """The verdict from the model's answer and its first-token score.

    A well-formed answer is flagged when `score >= threshold` (Meta's thresholding; at 0.5 with
    greedy decoding this is the answer's own first word), with the categories it lists. A
    malformed answer is flagged with no categories (`on_malformed="unsafe"`, the default: fail
    closed), or decided by the score alone (`"score"`).
    """
    if on_malformed not in ("unsafe", "score"):
        raise HerdError("on_malformed must be 'unsafe' or 'score'")
    parsed = parse_output(output, policy)
    if parsed.malformed and on_malformed == "unsafe":
        flagged = True
    else:
        flagged = score >= threshold
    cats = parsed.categories if flagged else []
    return Verdict(flagged, cats, score, output, parsed.malformed, "agent" if role == "assistant" else "user",
                   [policy.name_of(c) for c in cats])


__all__ = ["Category", "Policy", "Verdict", "Parsed", "LLAMA_GUARD_2_CATEGORIES", "LLAMA_GUARD_3_CATEGORIES",
           "default_policy", "policy_for_template", "load_policy", "policy_from_dict", "build_prompt",
           "encode_prompt", "prompt_body", "parse_output", "decide", "normalize_conversation"]
