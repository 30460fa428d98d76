"""Chat formats: a list of messages -> the token ids of a prompt.

Two ways to get there:
- `Llama3ChatFormat`, Meta's format built token by token (as in Meta's llama3 `chat_format.py`):
      <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
      <|start_header_id|>assistant<|end_header_id|>\\n\\n
- `JinjaChatTemplate`, the model's own Jinja template (GGUF `tokenizer.chat_template`, or
  `tokenizer_config.json`), rendered the way Hugging Face transformers renders it.

`format_prompt` picks one. Message content is never read as special tokens: a user who types
`<|eot_id|>` gets the text, not the end of their turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext

from ..errors import HerdError
from .sandbox import BoundedSandbox, render_bounded

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

Message = Mapping[str, Any]  # {"role": "user", "content": "Hi"}; templates may read more keys


class Llama3ChatFormat:
    """Meta's Llama 3 chat format, token by token.

    Args:
        tokenizer: a tokenizer with the Llama 3 special tokens (`<|start_header_id|>` ...).
    """

    # "tool" is the OpenAI name for a tool result; Llama 3 calls that role "ipython".
    ROLES = {"system": "system", "user": "user", "assistant": "assistant",
             "ipython": "ipython", "tool": "ipython"}

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        try:
            special = tokenizer.special_tokens
            self.begin_of_text = special["<|begin_of_text|>"]
            self.start_header = special["<|start_header_id|>"]
            self.end_header = special["<|end_header_id|>"]
            self.eot = special["<|eot_id|>"]
        except KeyError as e:
            raise HerdError(f"the tokenizer has no Llama 3 chat token {e}") from None

    def encode_header(self, message: Message) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n` as ids."""
        role = message.get("role")
        if role not in self.ROLES:
            raise HerdError(f"unknown chat role {role!r} (expected one of: "
                            f"{', '.join(self.ROLES)})")
        return [self.start_header, *self.tokenizer.encode(self.ROLES[role]), self.end_header,
                *self.tokenizer.encode("\n\n")]

    def encode_message(self, message: Message) -> list[int]:
        """Header, the content (stripped, as Meta does, and as plain text), then `<|eot_id|>`."""
        content = message.get("content")
        if not isinstance(content, str):
            raise HerdError(f"message content must be a string, not {type(content).__name__}")
        return [*self.encode_header(message), *self.tokenizer.encode(content.strip()), self.eot]

    def encode_dialog_prompt(self, messages: Sequence[Message],
                             add_generation_prompt: bool = True) -> list[int]:
        """BOS, every message, then (by default) an open assistant header for the model to fill."""
        tokens = [self.begin_of_text]
        for message in messages:
            tokens.extend(self.encode_message(message))
        if add_generation_prompt:
            tokens.extend(self.encode_header({"role": "assistant"}))
        return tokens


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation ("roles must alternate ...").
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' version: Jinja's own `tojson` HTML-escapes `<`, `>` and `&`, which would change
    # the prompt the model was trained on.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    # A chat template comes with the model file: untrusted code. The immutable sandbox blocks
    # attribute tricks (`''.__class__`) and mutating the inputs; ours also bounds sizes and time.
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise HerdError(f"invalid chat template: {e}") from None


def check_template(source: str) -> None:
    """`HerdError` if `source` is not a valid Jinja template (checked when a model is created,
    not at its first chat)."""
    _compile(source)


class JinjaChatTemplate:
    """A model's Jinja chat template, rendered as Hugging Face transformers renders it.

    Args:
        template: the template source.
        bos_token: the BOS token's text, for templates that write `{{ bos_token }}`.
        eos_token: the EOS token's text.
    """

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        self.template = _compile(template)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> str:
        """Render the conversation to prompt text.

        Args:
            messages: the conversation.
            add_generation_prompt: end with the opening of an assistant turn.
            tools: tool (function) definitions, for templates that support them.
            kwargs: more template variables (e.g. `enable_thinking`).
        Returns:
            The prompt text, special tokens still as text.
        Raises:
            HerdError: the template failed (bad syntax, `raise_exception`, a sandbox violation).
        """
        try:
            return render_bounded(
                self.template, messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)
        except jinja2.TemplateError as e:
            raise HerdError(f"chat template error: {e}") from None
        except (TypeError, ValueError, LookupError, ArithmeticError, RecursionError, MemoryError) as e:
            # The template's own code failed on these messages (e.g. `content + 1`).
            raise HerdError(f"chat template error: {type(e).__name__}: {e}") from None


# Private-use characters put around special-token text found in messages before rendering, so the
# rendered prompt shows which special tokens the template wrote (kept) and which came from the
# messages (encoded as text). The same markers as transformers' `sanitize_control_tokens`.
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def _mark_special(value: Any, specials: re.Pattern) -> Any:
    """Copy messages/tools, wrapping the special-token text in every string in the markers."""
    if isinstance(value, str):
        # Markers typed by the user would forge a mark: drop them first.
        value = value.replace(_MARK_START, "").replace(_MARK_END, "")
        return specials.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, value)
    if isinstance(value, Mapping):
        return {k: _mark_special(v, specials) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark_special(v, specials) for v in value]
    return value


def _encode_rendered(tokenizer: Tokenizer, text: str, specials: re.Pattern) -> list[int]:
    """Encode a rendered prompt: the template's special tokens as ids, everything else as text.

    Text between two template special tokens is encoded in one piece, marked message text
    included, so it tokenizes exactly as the same text typed plainly (no extra cuts at the marks).
    """
    start, end = re.escape(_MARK_START), re.escape(_MARK_END)
    # A lone marker is left where the template cut a marked token apart: drop it.
    pieces = re.compile(f"{start}(?P<marked>{specials.pattern}){end}|{start}|{end}"
                        f"|(?P<special>{specials.pattern})")
    ids: list[int] = []
    plain: list[str] = []
    pos = 0
    for m in pieces.finditer(text):
        plain.append(text[pos:m.start()])
        pos = m.end()
        if m["marked"] is not None:
            plain.append(m["marked"])
        elif m["special"] is not None:
            ids.extend(tokenizer.encode("".join(plain)))
            plain.clear()
            ids.append(tokenizer.special_tokens[m["special"]])
    plain.append(text[pos:])
    ids.extend(tokenizer.encode("".join(plain)))
    return ids


@lru_cache(maxsize=8)
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern:
    # Longest first, so a special token wins over one that is its prefix. "(?!)" never matches.
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or "(?!)")


def format_prompt(tokenizer: Tokenizer, messages: Sequence[Message],
                  add_generation_prompt: bool = True, template: str | None = None,
                  tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """Turn a conversation into prompt token ids.

    Uses `template` if given, else the model's own Jinja template (`tokenizer.chat_template`),
    else the Llama 3 format if the tokenizer has its header tokens.

    Args:
        tokenizer: the model's tokenizer.
        messages: the conversation, e.g. `[{"role": "user", "content": "Hi"}]`.
        add_generation_prompt: end with the opening of an assistant turn.
        template: a Jinja chat template to use instead of the model's.
        tools: tool definitions, passed to Jinja templates.
    Returns:
        The prompt's token ids, starting with BOS when the model wants one.
    Raises:
        HerdError: no way to format a chat for this model, or the template failed.
    """
    source = template if template is not None else tokenizer.chat_template
    if source is not None:
        def token_text(id: int | None) -> str:
            return "" if id is None else tokenizer.token_bytes(id).decode("utf-8", "replace")

        jinja = JinjaChatTemplate(source, token_text(tokenizer.bos_id), token_text(tokenizer.eos_id))
        specials = _specials_pattern(tuple(tokenizer.special_tokens))
        text = jinja.render(_mark_special(list(messages), specials), add_generation_prompt,
                            tools=_mark_special(tools, specials))
        ids = _encode_rendered(tokenizer, text, specials)
        # Most templates write `{{ bos_token }}` themselves; add BOS only where they did not.
        bos = tokenizer.bos_id
        if tokenizer.add_bos and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids
    if "<|start_header_id|>" in tokenizer.special_tokens:
        return Llama3ChatFormat(tokenizer).encode_dialog_prompt(messages, add_generation_prompt)
    raise HerdError("this model has no chat template and is not Llama 3: "
                    "pass a template to format the chat")
