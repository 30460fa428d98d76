"""Ollama's Modelfile: parse one into a `Modelfile`, and write one back (`herd show --modelfile`).

    FROM smollm2:135m                  # a model name, a .gguf file, or a HF / Meta directory
    PARAMETER temperature 0
    PARAMETER stop "<|im_end|>"        # repeatable: the stop strings accumulate
    SYSTEM You are a terse assistant.
    TEMPLATE \"\"\"{% for m in messages %}...{% endfor %}\"\"\"
    MESSAGE user Is Paris in France?   # a conversation that starts every chat
    MESSAGE assistant Yes.
    LICENSE \"\"\"Apache-2.0 ...\"\"\"
    ADAPTER ./lora.gguf

Commands are case-insensitive; `#` starts a comment line; a value is the rest of the line, a
"double-quoted" string, or a \"\"\"triple-quoted\"\"\" string that may span lines. As in llamaherd
everywhere, TEMPLATE is a Jinja chat template (the Hugging Face kind), not a Go template.
Every error names the line it is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import HerdError
from ..options import check_option, check_options

COMMANDS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "LICENSE", "ADAPTER")
ROLES = ("system", "user", "assistant", "tool")

# The generation options llamaherd applies (`generate.SamplingOptions`; a test keeps them in step),
# with their types. `stop` is a list: each PARAMETER stop line adds one.
PARAMETER_TYPES: dict[str, type] = {
    "temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
    "repeat_last_n": int, "presence_penalty": float, "frequency_penalty": float, "seed": int,
    "num_predict": int, "num_ctx": int, "stop": list, "speculate": int,
}


@dataclass
class Modelfile:
    """What a Modelfile says. `from_` is the FROM argument, as written."""

    from_: str
    from_line: int = field(default=0, compare=False)  # for error messages
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


def parse_parameter(name: str, raw: str, where: str = "") -> tuple[str, Any]:
    """Type a `PARAMETER name value`; `HerdError` for an unknown name or a bad value."""
    key = name.lower()
    kind = PARAMETER_TYPES.get(key)
    prefix = f"{where}: " if where else ""
    if kind is None:
        raise HerdError(f"{prefix}unknown parameter {name!r}; known: {', '.join(sorted(PARAMETER_TYPES))}")
    if kind is list:
        return key, raw
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise HerdError(f"{prefix}parameter {key} must be {what}, got {raw!r}") from None
    try:
        return key, check_option(key, value)  # the ranges every way of giving options shares
    except HerdError as e:
        raise HerdError(f"{prefix}{e}") from None


def check_parameters(params: Any, context_length: int | None = None) -> dict[str, Any]:
    """Parameters as they are stored with a model: known names and valid values only (the one
    option validation, `llamaherd.options`), num_ctx within the model's context. A bad value
    stored would break every later request for the model."""
    checked = check_options(params, unknown="error")
    if context_length and checked.get("num_ctx", 0) > context_length:
        raise HerdError(f"parameter num_ctx {checked['num_ctx']} exceeds the model's context length {context_length}")
    return checked


def check_definition(mf: Modelfile) -> None:
    """Check what a Modelfile (parsed, or built from `/api/create`'s JSON) would store: the
    parameters, the template's Jinja syntax, message roles and texts. `HerdError` if wrong."""
    from ..chat.template import check_template

    if not isinstance(mf.from_, str) or not mf.from_.strip():
        raise HerdError("FROM needs a model name or a path")
    check_parameters(mf.parameters)
    for what, text in (("template", mf.template), ("system", mf.system)):
        if text is not None and not isinstance(text, str):
            raise HerdError(f"{what} must be a string")
    if mf.template is not None:
        check_template(mf.template)
    for m in mf.messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise HerdError(f"a message needs a role ({', '.join(ROLES)}) and a string content")
    if not all(isinstance(t, str) for t in mf.licenses):
        raise HerdError("license must be a string or a list of strings")


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile text. `HerdError` naming the line for an unknown command or a bad value."""
    lines = text.splitlines()
    mf = Modelfile(from_="")
    i = 0
    while i < len(lines):
        lineno = i + 1
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if "\t" in word:  # "FROM\tx"
            word, _, more = word.partition("\t")
            rest = more + " " + rest
        command = word.upper()
        where = f"Modelfile line {lineno}"
        if command not in COMMANDS:
            raise HerdError(f"{where}: unknown command {word!r}; expected one of {', '.join(COMMANDS)}")
        rest = rest.strip()
        if command == "PARAMETER":
            name, _, value = rest.partition(" ")
            value, i = _value(value.strip(), lines, i, where)
            if not name or value == "":
                raise HerdError(f"{where}: PARAMETER needs a name and a value, e.g. PARAMETER temperature 0")
            key, typed = parse_parameter(name, value, where)
            if key == "stop":
                mf.parameters.setdefault("stop", []).append(typed)
            else:
                mf.parameters[key] = typed
            continue
        if command == "MESSAGE":
            role, _, content = rest.partition(" ")
            if role.lower() not in ROLES:
                raise HerdError(f"{where}: MESSAGE role must be one of {', '.join(ROLES)}, got {role!r}")
            content, i = _value(content.strip(), lines, i, where)
            mf.messages.append({"role": role.lower(), "content": content})
            continue
        value, i = _value(rest, lines, i, where)
        if command in ("FROM", "ADAPTER") and not value.strip():
            raise HerdError(f"{where}: {command} needs a model name or a path")
        if command == "FROM":
            if mf.from_line:
                raise HerdError(f"{where}: a second FROM (the first is on line {mf.from_line})")
            mf.from_, mf.from_line = value.strip(), lineno
        elif command == "ADAPTER":
            mf.adapters.append(value.strip())
        elif command == "TEMPLATE":
            mf.template = value
        elif command == "SYSTEM":
            mf.system = value
        elif command == "LICENSE":
            mf.licenses.append(value)
    if not mf.from_line:
        raise HerdError(f"Modelfile has no FROM line (it has {len(lines)} line(s)); "
                        "line 1 should name the base model, e.g. FROM smollm2:135m")
    return mf


def _value(rest: str, lines: list[str], i: int, where: str) -> tuple[str, int]:
    """The value that starts with `rest`, reading on through `lines[i:]` for a triple-quoted one.
    Returns (value, index of the next unread line)."""
    if rest.startswith('"""'):
        body = rest[3:]
        end = body.find('"""')
        if end >= 0:
            _nothing_after(body[end + 3:], where)
            return body[:end], i
        parts = [body]
        while i < len(lines):
            line = lines[i]
            i += 1
            end = line.find('"""')
            if end >= 0:
                _nothing_after(line[end + 3:], where)
                parts.append(line[:end])
                return "\n".join(parts), i
            parts.append(line)
        raise HerdError(f"{where}: a triple-quoted value is never closed (add \"\"\")")
    if len(rest) >= 2 and rest[0] == '"' and rest[-1] == '"':
        return rest[1:-1].replace('\\"', '"').replace("\\\\", "\\"), i
    return rest, i


def _nothing_after(tail: str, where: str) -> None:
    if tail.strip():
        raise HerdError(f"{where}: unexpected text after the closing \"\"\": {tail.strip()!r}")


def _quote(text: str) -> str:
    """A value as a Modelfile writes it: bare when that reads back the same, else triple-quoted."""
    if text and "\n" not in text and text == text.strip() and not text.startswith('"'):
        return text
    return f'"""{text}"""'


def format_modelfile(mf: Modelfile, comment: str | None = None) -> str:
    """Modelfile text that parses back to `mf`."""
    out = []
    if comment:
        out += [f"# {line}" if line else "#" for line in comment.splitlines()] + [""]
    out.append(f"FROM {mf.from_}")
    if mf.template is not None:
        out.append(f"TEMPLATE {_quote(mf.template)}")
    if mf.system is not None:
        out.append(f"SYSTEM {_quote(mf.system)}")
    for key, value in mf.parameters.items():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            v = format_value(v)
            out.append(f'PARAMETER {key} "{_escape(v)}"' if (not v or v != v.strip() or " " in v or '"' in v)
                       else f"PARAMETER {key} {v}")
    for adapter in mf.adapters:
        out.append(f"ADAPTER {adapter}")
    for m in mf.messages:
        out.append(f"MESSAGE {m['role']} {_quote(m['content'])}")
    for text in mf.licenses:
        out.append(f"LICENSE {_quote(text)}")
    return "\n".join(out) + "\n"


def format_value(value: Any) -> str:
    """A parameter value as text: `0` rather than `0.0` (it reads back as the same float)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
