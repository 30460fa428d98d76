"""Byte-level BPE tokenizers from a GGUF file's metadata or a Hugging Face `tokenizer.json`.

Both become a `tokenizers.Tokenizer`, wrapped in `HFTokenizer` to give the common interface. For
GGUF we rebuild what llama.cpp does from the metadata: the BPE vocabulary and merges, the control
tokens, and the pre-tokenizer that `tokenizer.ggml.pre` names (llama.cpp's `llama-vocab.cpp` keeps
a regex list per name; we use the equivalent `tokenizers` pre-tokenizers from the models' own
`tokenizer.json`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizerModel

from ..errors import FormatError, HerdError
from .llama3 import PAT_STR as LLAMA3_PAT_STR

# GGUF token types (llama.cpp `llama_token_type`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in common chat formats. llama.cpp treats these as end-of-generation by
# their text whatever the metadata says, because many converted files only record one EOS.
END_OF_GENERATION_NAMES = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>",
                           "<|endoftext|>", "<|end|>", "<end_of_turn>", "<EOT>")


def _llama3_pre() -> pre_tokenizers.PreTokenizer:
    # Meta's regex does the splitting; ByteLevel then only maps bytes to its printable alphabet.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


def _smollm_pre() -> pre_tokenizers.PreTokenizer:
    # llama.cpp: `\p{N}` (each digit alone), then the GPT-2 regex; SmolLM2's tokenizer.json says
    # the same as Digits(individual_digits) + ByteLevel.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's built-in regex is GPT-2's: 's|'t|... ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+...
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


# `tokenizer.ggml.pre` -> (pre-tokenizer, ignore_merges, add_bos default). llama.cpp sets
# ignore_merges for Llama 3 (a whole word found in the vocabulary is one token, as in tiktoken)
# and makes BOS the default there.
GGUF_PRE_TOKENIZERS = {
    "llama-bpe": (_llama3_pre, True, True),
    "llama3": (_llama3_pre, True, True),
    "llama-v3": (_llama3_pre, True, True),
    "smollm": (_smollm_pre, False, False),
    "starcoder": (_smollm_pre, False, False),
    "gpt2": (_gpt2_pre, False, False),
}


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable char -> the byte it stands for.

    Printable bytes stand for themselves; the other 68 (controls, space, ...) are shifted to
    U+0100 and up so that every token is printable text.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


class HFTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with the common `Tokenizer` interface.

    Args:
        tokenizer: the `tokenizers.Tokenizer` (its post-processor is not used: BOS/EOS are ours).
        bos_id, eos_id: ids of the BOS and EOS tokens, if the model has them.
        add_bos: whether prompts start with BOS.
        chat_template: the model's Jinja chat template, if any.
        stop_ids: extra ids that end generation (EOS and known end-of-turn tokens are added).
    """

    def __init__(self, tokenizer: HFTokenizerModel, *, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, chat_template: str | None = None, stop_ids: Sequence[int] = ()):
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            raise FormatError("only byte-level BPE tokenizers are supported "
                              f"(this one decodes with {type(tokenizer.decoder).__name__})")
        self.model = tokenizer
        # The same tokenizer, but reading special-token text as plain text: for user input.
        self._plain = HFTokenizerModel.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        added = tokenizer.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self.special_tokens: dict[str, int] = {t.content: i for i, t in added.items() if t.special}
        self.n_words: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        ends = {tokenizer.token_to_id(name) for name in END_OF_GENERATION_NAMES}
        self.stop_ids: frozenset[int] = frozenset(
            i for i in {eos_id, *stop_ids, *ends} if i is not None)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Encode text to token ids.

        Args:
            text: the text.
            bos: prepend BOS (if the model has one).
            eos: append EOS (if the model has one).
            allow_special: read special-token text such as `<|im_start|>` as the special token.
                Off by default, so user input is always plain text.
        Returns:
            The token ids.
        """
        model = self.model if allow_special else self._plain
        ids = model.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode token ids to text (special tokens as their text; broken UTF-8 as U+FFFD)."""
        return self.model.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes of one token; an added (special) token gives its text."""
        if id in self._added:
            return self._added[id].encode()
        token = self.model.id_to_token(id)
        if token is None:
            raise HerdError(f"token id {id} is outside the vocabulary ({self.n_words})")
        table = byte_decoder()
        try:
            return bytes(table[ch] for ch in token)
        except KeyError:
            # Not spelled in the byte alphabet: the ByteLevel decoder passes such a token through
            # as UTF-8, and so do we, so that token_bytes agrees with decode.
            return token.encode()

    def __repr__(self) -> str:
        return f"HFTokenizer(n_words={self.n_words})"


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """A `gguf.GGUFReader`'s key/value metadata as a plain dict of Python values.

    Strings come back as `str`, arrays as lists; tensor info is left out.
    """
    return {key: field.contents() for key, field in reader.fields.items()}


def tokenizer_from_gguf(fields: Mapping[str, Any]) -> HFTokenizer:
    """Build the tokenizer that a GGUF file's metadata describes.

    Args:
        fields: the metadata as a plain dict (see `gguf_metadata`), keys like `tokenizer.ggml.tokens`.
    Returns:
        An `HFTokenizer`.
    Raises:
        FormatError: no tokenizer in the metadata, or a kind we do not support.
    """
    kind = fields.get("tokenizer.ggml.model")
    if kind is None:
        raise FormatError("the GGUF file has no tokenizer (no tokenizer.ggml.model)")
    if kind == "llama":
        # SentencePiece vocabularies (Llama 2, Mistral, Gemma) need scores-based merging and
        # byte-fallback tokens; not supported yet.
        raise FormatError("unsupported GGUF tokenizer: SentencePiece ('llama') vocabularies "
                          "are not supported yet")
    if kind != "gpt2":
        raise FormatError(f"unsupported GGUF tokenizer model {kind!r}")
    pre = fields.get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise FormatError(f"unsupported GGUF pre-tokenizer {pre!r} (known: "
                          f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))})")
    make_pre, ignore_merges, default_add_bos = GGUF_PRE_TOKENIZERS[pre]

    if not fields.get("tokenizer.ggml.tokens"):
        raise FormatError("the GGUF tokenizer has no tokenizer.ggml.tokens")
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise FormatError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
    try:
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    except KeyError:
        raise FormatError("the GGUF BPE tokenizer has no tokenizer.ggml.merges") from None
    # On a duplicated token text the first id wins, as in llama.cpp's token_to_id map.
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)

    tok = HFTokenizerModel(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) are special: matched in text only when allowed. User-defined
    # tokens are always matched whole, as llama.cpp does.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])

    def token_id(key: str) -> int | None:
        value = fields.get(f"tokenizer.ggml.{key}")
        if value is not None and not 0 <= value < len(tokens):
            raise FormatError(f"tokenizer.ggml.{key} = {value} is outside the vocabulary")
        return value

    return HFTokenizer(
        tok,
        bos_id=token_id("bos_token_id"),
        eos_id=token_id("eos_token_id"),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        chat_template=fields.get("tokenizer.chat_template"),
        stop_ids=[i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None],
    )


def tokenizer_from_hf(path: str | Path) -> HFTokenizer:
    """Load a Hugging Face `tokenizer.json` (a file, or a folder holding one).

    BOS, EOS, `add_bos_token` and the chat template come from `tokenizer_config.json` beside it
    (or `chat_template.jinja`), when present.
    """
    path = Path(path)
    folder, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
    try:
        tok = HFTokenizerModel.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON or unknown fields
        raise FormatError(f"{file}: not a valid tokenizer.json ({e})") from None
    config = _read_json(folder / "tokenizer_config.json")

    def token_id(key: str) -> int | None:
        value = config.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(content) if content else None

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:
        # Llama 3's tokenizer.json adds BOS through its post-processor; ask it.
        add_bos = bos_id is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return HFTokenizer(tok, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, chat_template=template)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
