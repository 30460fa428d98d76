"""Manifests: one small JSON file per `name:tag` listing the blobs that make up a model.

The layout follows Ollama's (an OCI image manifest): a `config` blob with the model's details and
one layer per part, each with a media type, a digest and a size. The model's weights are one layer
(a GGUF file) or several named layers (the files of a Hugging Face or Meta directory); parameters,
template, system prompt, messages and licenses are small blobs of their own, so two models that
differ only in their parameters share their weights.

    manifests/<host>/<namespace>/<model>/<tag>     e.g. manifests/local/library/smollm2/135m

A manifest's id (the ID column of `herd list`) is the sha256 of its bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import HerdError
from .blobs import check_digest

SCHEMA_VERSION = 2
MANIFEST_TYPE = "application/vnd.llamaherd.manifest.v1+json"
CONFIG_TYPE = "application/vnd.llamaherd.config.v1+json"

# Ollama's layer media types, so the server can report them as Ollama does.
MODEL = "application/vnd.ollama.image.model"
ADAPTER = "application/vnd.ollama.image.adapter"
PARAMS = "application/vnd.ollama.image.params"
TEMPLATE = "application/vnd.ollama.image.template"
SYSTEM = "application/vnd.ollama.image.system"
MESSAGES = "application/vnd.ollama.image.messages"
LICENSE = "application/vnd.ollama.image.license"
KNOWN_TYPES = {MODEL, ADAPTER, PARAMS, TEMPLATE, SYSTEM, MESSAGES, LICENSE}

# A file name inside a model directory (no folders: they would let a manifest write anywhere).
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def check_file_name(name: str) -> str:
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or ".." in name:
        raise HerdError(f"invalid file name {name!r} in a model")
    return name


@dataclass(frozen=True)
class Layer:
    """One blob of a model.

    Attributes:
        media_type: what the blob is (`MODEL`, `PARAMS`, ...).
        digest: `sha256:<hex>` of the blob.
        size: bytes.
        name: for a file of a directory model or adapter, its file name there; None for a single file.
        group: which ADAPTER line an adapter layer belongs to (0 for everything else).
    """

    media_type: str
    digest: str
    size: int
    name: str | None = None
    group: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.name is not None:
            d["name"] = self.name
        if self.group:
            d["group"] = self.group
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Layer":
        try:
            layer = cls(str(d["mediaType"]), check_digest(d["digest"]), int(d["size"]), d.get("name"),
                        int(d.get("group", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise HerdError(f"invalid manifest layer {d!r}: {e}") from None
        if layer.name is not None:
            check_file_name(layer.name)
        return layer


@dataclass
class Manifest:
    config: Layer
    layers: list[Layer] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        doc = {"schemaVersion": SCHEMA_VERSION, "mediaType": MANIFEST_TYPE,
               "config": self.config.to_dict(), "layers": [l.to_dict() for l in self.layers]}
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> "Manifest":
        try:
            doc = json.loads(data)
            if doc.get("schemaVersion") != SCHEMA_VERSION:
                raise ValueError(f"unsupported schemaVersion {doc.get('schemaVersion')!r}")
            return cls(Layer.from_dict(doc["config"]), [Layer.from_dict(l) for l in doc["layers"]])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise HerdError(f"{where} is corrupt: {e}") from None

    def of_type(self, media_type: str) -> list[Layer]:
        return [l for l in self.layers if l.media_type == media_type]

    def first(self, media_type: str) -> Layer | None:
        found = self.of_type(media_type)
        return found[0] if found else None

    def digests(self) -> set[str]:
        return {self.config.digest, *(l.digest for l in self.layers)}

    @property
    def size(self) -> int:
        return self.config.size + sum(l.size for l in self.layers)
