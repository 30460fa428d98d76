"""User-facing errors.

A `HerdError` is a mistake the user can fix (a missing file, a corrupt checkpoint, an unknown
model). The CLI prints its message as one line on stderr and exits non-zero; the server turns
it into a 4xx JSON error. Anything else is a bug and keeps its traceback.
"""


class HerdError(Exception):
    """A clear, one-line error about the user's input."""


class FormatError(HerdError):
    """A weights or tokenizer file that is truncated, corrupt or of an unsupported kind."""


class ModelNotFound(HerdError):
    """The model name is not in the store (nor, for a pull, in the catalog): HTTP 404."""

    def __init__(self, name: str, message: str | None = None):
        # Ollama's wording, which apps match to offer a pull.
        super().__init__(message or f'model "{name}" not found, try pulling it first')
        self.name = name


class Unsupported(HerdError):
    """The model cannot do what was asked (e.g. `suffix` without fill-in-the-middle tokens)."""
