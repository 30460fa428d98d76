"""Model names: `model`, `model:tag`, `namespace/model:tag` and `hf.co/user/repo:tag`, as Ollama.

A name is checked before it is used to build a path: every part is a short run of letters, digits,
`.`, `_` and `-` that starts with a letter or digit, so `..`, absolute paths, hidden files and
shell or path metacharacters can never reach the disk. Names are case-insensitive (the store keys
them in lower case, so `Foo` and `foo` can't be two models on a case-insensitive file system); the
name as typed is kept for the source, because a Hugging Face repo id keeps its case in URLs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import HerdError

DEFAULT_TAG = "latest"
DEFAULT_NAMESPACE = "library"
DEFAULT_HOST = "local"  # names that are not on a hub; a folder name under manifests/, never a network host
HF_HOST = "hf.co"
HF_HOSTS = {"hf.co", "huggingface.co"}

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ModelName:
    """A parsed, validated model name. `str(name)` is its short display form."""

    host: str  # DEFAULT_HOST or HF_HOST
    namespace: str  # DEFAULT_NAMESPACE, a user's namespace, or a Hugging Face user / org
    model: str
    tag: str

    @property
    def is_hf(self) -> bool:
        return self.host == HF_HOST

    @property
    def repo_id(self) -> str:
        """`user/repo` for a Hugging Face name."""
        return f"{self.namespace}/{self.model}"

    def key(self) -> tuple[str, str, str, str]:
        """The parts the store files it under (lower case)."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    def __str__(self) -> str:
        if self.is_hf:
            base = f"{HF_HOST}/{self.namespace}/{self.model}"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            base = f"{self.namespace}/{self.model}"
        else:
            base = self.model
        return f"{base}:{self.tag}"

    def display(self) -> str:
        """The lower-case display form, as `herd list` shows it."""
        return str(ModelName(*self.key()))


def parse_name(text: str) -> ModelName:
    """Parse and validate a model name; `HerdError` for anything that is not one.

    Accepted: `model`, `model:tag`, `namespace/model[:tag]`, `hf.co/user/repo[:tag]` (also
    `huggingface.co/...`). The default tag is `latest`.
    """
    if not isinstance(text, str) or not text.strip():
        raise HerdError("a model name must not be empty")
    raw = text.strip()
    if len(raw) > 350:
        raise HerdError(f"model name is too long ({len(raw)} characters)")
    if ".." in raw:
        raise HerdError(f"invalid model name {raw!r}: '..' is not allowed")
    if raw.startswith(("/", "\\", "~")) or "\\" in raw:
        raise HerdError(f"invalid model name {raw!r}: a name is not a path")

    base, sep, tag = raw.rpartition(":")
    if not sep:
        base, tag = raw, DEFAULT_TAG
    # A colon in the base is a second colon, or a "scheme:" like "C:" or "https:".
    if ":" in base:
        raise HerdError(f"invalid model name {raw!r}: only one ':' (before the tag) is allowed")
    if not _TAG.fullmatch(tag):
        raise HerdError(f"invalid tag {tag!r} in model name {raw!r}: use letters, digits, '.', '_' or '-'")

    parts = base.split("/")
    if len(parts) == 3 and parts[0].lower() in HF_HOSTS:
        host, namespace, model = HF_HOST, parts[1], parts[2]
    elif len(parts) == 3:
        raise HerdError(f"invalid model name {raw!r}: the only host llamaherd knows is hf.co "
                        "(hf.co/{user}/{repo}:{quant})")
    elif len(parts) == 2:
        host, namespace, model = DEFAULT_HOST, parts[0], parts[1]
    elif len(parts) == 1:
        host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
    else:
        raise HerdError(f"invalid model name {raw!r}: too many '/' (use namespace/model:tag or "
                        "hf.co/user/repo:tag)")
    for part in (namespace, model):
        if not _PART.fullmatch(part):
            raise HerdError(f"invalid model name {raw!r}: {part!r} must start with a letter or digit and "
                            "hold only letters, digits, '.', '_' or '-'")
    if host == DEFAULT_HOST and namespace.lower() in HF_HOSTS:
        raise HerdError(f"invalid model name {raw!r}: use hf.co/{{user}}/{{repo}}:{{quant}}")
    return ModelName(host, namespace, model, tag)

