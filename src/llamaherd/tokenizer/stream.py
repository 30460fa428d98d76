"""Incremental detokenization: turn generated token ids into text as they arrive.

A token is a run of bytes, not of characters: an emoji or a Korean syllable can be split over two
or more tokens. Decoding each token alone would print U+FFFD for the halves; instead we keep the
bytes of an unfinished character until the token that completes it arrives.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Tokenizer


class StreamDecoder:
    """Decode a stream of token ids to text, one token at a time.

    `"".join(push(i) for i in ids) + flush()` equals `tokenizer.decode(ids)`.

    Args:
        tokenizer: gives each token's bytes (`token_bytes`).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # The standard incremental UTF-8 decoder holds back an incomplete sequence at the end of
        # its input; invalid bytes (which no later token can fix) become U+FFFD as in `decode`.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: return what is left (an unfinished character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
