"""Generated tokens -> text that is safe to show, honouring stop strings.

One helper for every place that streams text: `Llama.stream` and the serving engine. Text that
could be the beginning of a stop string is held back until the next tokens show it is not; when a
stop string appears, the text before it is released and generation is over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..tokenizer.stream import StreamDecoder

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """Decode tokens one at a time into text, holding back possible stop-string beginnings.

        text = TextStream(tokenizer, ["\\n\\n"])
        for token in tokens:
            out = text.push(token)      # text that is safe to show now (may be "")
            if text.stopped:            # a stop string appeared; `out` is what came before it
                break
        else:
            out = text.finish()         # generation ended otherwise: release what was held back

    Args:
        tokenizer: gives each token's bytes (UTF-8 characters split over tokens are reassembled).
        stops: stop strings; empty ones are ignored.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self._decoder = StreamDecoder(tokenizer)
        self.stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; return the text now safe to show."""
        if self.stopped:
            return ""
        self._pending += self._decoder.push(token)
        if not self.stops:
            out, self._pending = self._pending, ""
            return out
        hit = find_stop(self._pending, self.stops)
        if hit is not None:
            out, self._pending, self.stopped = self._pending[:hit], "", True
            return out
        safe = len(self._pending) - stop_prefix_len(self._pending, self.stops)
        out, self._pending = self._pending[:safe], self._pending[safe:]
        return out

    def finish(self) -> str:
        """Generation ended without a stop string: return the text held back (incomplete UTF-8 as U+FFFD)."""
        if self.stopped:
            return ""
        out, self._pending = self._pending + self._decoder.flush(), ""
        return out
