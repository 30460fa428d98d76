"""Chat messages and tool calling: messages checked, tool definitions into the prompt, the
model's tool calls out of its reply.

Messages: a role among system, user, assistant, tool (ipython), developer (= system), and text
content — a string or OpenAI's list of text parts; images are refused (text-only models).

Into the prompt: a chat template that knows about tools (it mentions `tools`) gets them as its
`tools` variable, as transformers does. Any other model gets Meta's Llama 3.1 JSON tool-calling
instructions (llama-models `prompt_format.md`, "JSON based tool calling") in front of the first
user message:

    Given the following functions, please respond with a JSON for a function call with its proper
    arguments that best answers the given prompt.

    Respond in the format {"name": function name, "parameters": dictionary of argument name and
    its value}. Do not use variables.

    {"type": "function", "function": {...}}

An assistant message that carries `tool_calls` is written back in that same JSON form when the
template cannot render `tool_calls` itself; `tool` messages (results) keep their role (Llama 3's
own format calls it `ipython`).

Out of the reply: `parse_tool_calls` accepts one or more JSON objects `{"name", "parameters" |
"arguments"}` (also OpenAI's `{"type": "function", "function": {...}}`), optionally after
`<|python_tag|>`, inside `<tool_call>...</tool_call>` or a ```json fence, separated by `;` or
newlines — and only names of the tools offered. Anything else is ordinary content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import HerdError
from ..errors import Unsupported

LLAMA31_INSTRUCTIONS = (
    "Given the following functions, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    'value}. Do not use variables.\n\n')

# Text a tool call may begin with; while a reply could still become one, it is held back.
CALL_OPENERS = ("{", "[", "<|python_tag|>", "<tool_call>", "```")


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise Unsupported(f"{where}: only text content parts are supported")
        return "".join(parts)
    raise HerdError(f"{where}: content must be a string")


ROLES = ("system", "user", "assistant", "tool", "ipython", "developer")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validated chat messages with string content."""
    if not isinstance(messages, list) or not messages:
        raise HerdError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise HerdError(f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise HerdError(f"messages[{i}]: unknown role {role!r} (expected one of: {', '.join(ROLES)})")
        if m.get("images"):
            raise Unsupported(f"messages[{i}]: images are not supported by this model")
        m = {**m, "role": "system" if role == "developer" else role,
             "content": _text_content(m.get("content"), f"messages[{i}]")}
        out.append(m)
    return out


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools as OpenAI/Ollama define them: `{"type": "function", "function": {"name", ...}}`."""
    if not isinstance(tools, list):
        raise HerdError("tools must be a list")
    out = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise HerdError("each tool must be an object")
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise HerdError("each tool must be {\"type\": \"function\", \"function\": {...}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise HerdError("each tool function needs a name")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, Mapping) or params.get("type", "object") != "object"):
            raise HerdError(f"tool {fn['name']}: parameters must be a JSON schema of type object")
        out.append({"type": "function", "function": dict(fn)})
    return out


def required_call_schema(tools: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """A JSON schema that only a call of one of `tools` (or of the tool `name`) satisfies, in the
    form `parse_tool_calls` reads: `{"name": ..., "parameters": {...}}`. OpenAI's tool_choice
    "required" and a named tool_choice are this schema as the output's grammar."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise HerdError(f"tool_choice names {name!r}, which is not among the tools")
    options = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        "parameters": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "parameters"], "additionalProperties": False} for t in chosen]
    return options[0] if len(options) == 1 else {"anyOf": options}


def template_knows(template: str | None, word: str) -> bool:
    return template is not None and word in template


def call_as_json(call: Mapping[str, Any]) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return json.dumps({"name": fn.get("name"), "parameters": args})


def prepare_messages(messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None,
                     template: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages and the `tools` variable to render for a template (None: Meta's Llama 3 format).

    Returns:
        The messages (tool instructions added, tool calls written out where the template cannot
        render them) and the tools to pass to the template (None when they went into the messages).
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls") and not template_knows(template, "tool_calls"):
            calls = "\n".join(call_as_json(c) for c in m.pop("tool_calls"))
            m["content"] = (m.get("content") or "") + calls
        out.append(m)
    if not tools:
        return out, None
    if template_knows(template, "tools"):
        return out, tools
    listing = "\n\n".join(json.dumps(t) for t in tools)
    first_user = next((i for i, m in enumerate(out) if m.get("role") == "user"), None)
    if first_user is None:
        out.append({"role": "user", "content": LLAMA31_INSTRUCTIONS + listing})
    else:
        m = out[first_user]
        out[first_user] = {**m, "content": f"{LLAMA31_INSTRUCTIONS}{listing}\n\n{m.get('content') or ''}"}
    return out, None


def could_be_call(text: str) -> bool:
    """Whether `text` (the reply so far) may still turn out to be a tool call."""
    s = text.lstrip()
    return any(s.startswith(o) or o.startswith(s) for o in CALL_OPENERS)


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _objects(text: str) -> list[Any] | None:
    """Every JSON value in `text`, which holds nothing else but separators; None otherwise."""
    decoder = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.extend(value if isinstance(value, list) else [value])


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """The tool calls in a reply, as `[{"function": {"name", "arguments": {...}}}]`; None if the
    reply is not (only) tool calls of the offered tools."""
    names = {t["function"]["name"] for t in tools}
    s = text.strip().removeprefix("<|python_tag|>").strip()
    if (fence := _FENCE.match(s)) is not None:
        s = fence.group(1)
    if s.startswith("<tool_call>"):
        s = "\n".join(_TAGGED.findall(s))
    values = _objects(s)
    if not values:
        return None
    calls = []
    for v in values:
        if not isinstance(v, dict):
            return None
        if isinstance(v.get("function"), Mapping):
            v = v["function"]
        name = v.get("name")
        args = v.get("parameters", v.get("arguments", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if name not in names or not isinstance(args, dict):
            return None
        calls.append({"function": {"name": name, "arguments": args}})
    return calls
