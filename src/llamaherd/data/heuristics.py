"""Rule-based quality filters on one document: Gopher quality and repetition (Rae et al. 2021,
appendix A), C4's document rules (Raffel et al. 2020) and a bad-word ratio (the Llama 3 paper's
"dirty word" counts).

Each filter is a pure function of the text that returns None when the document passes, or a short
reason ("gopher_quality: mean word length 12.3 > 10") when it does not. The defaults are the
published ones, as datatrove uses them for FineWeb. Words are whitespace-separated tokens, so the
word-based rules suit languages written with spaces; turn them off for others (or for code).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))  # Gopher's list
BULLETS = ("•", "●", "○", "◦", "▪", "‣", "⁃", "-", "*")
ELLIPSES = ("...", "…")
# Stripped from both ends of a word before it is looked up in a list (str.strip: faster than a regex).
_PUNCT = string.punctuation + "“”‘’«»„…–—¿¡·"
_LETTER = re.compile(r"[^\W\d_]")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？")


@dataclass
class GopherQuality:
    """Gopher's quality rules. A document fails when any bound is crossed."""
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # "#" and "..." per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8  # words with at least one letter
    min_stop_words: int = 2

    def __call__(self, text: str) -> str | None:
        words = text.split()
        n = len(words)
        if n < self.min_words:
            return f"gopher_quality: {n} words < {self.min_words}"
        if n > self.max_words:
            return f"gopher_quality: {n} words > {self.max_words}"
        mean = sum(map(len, words)) / n
        if not self.min_mean_word_length <= mean <= self.max_mean_word_length:
            return f"gopher_quality: mean word length {mean:.1f} outside " \
                   f"[{self.min_mean_word_length}, {self.max_mean_word_length}]"
        symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
        if symbols / n > self.max_symbol_word_ratio:
            return f"gopher_quality: symbol/word ratio {symbols / n:.2f} > {self.max_symbol_word_ratio}"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            bullets = sum(ln.startswith(BULLETS) for ln in lines) / len(lines)
            if bullets > self.max_bullet_lines_ratio:
                return f"gopher_quality: {bullets:.0%} of lines start with a bullet"
            ellipsis = sum(ln.endswith(ELLIPSES) for ln in lines) / len(lines)
            if ellipsis > self.max_ellipsis_lines_ratio:
                return f"gopher_quality: {ellipsis:.0%} of lines end with an ellipsis"
        alpha = sum(w.isalpha() or _LETTER.search(w) is not None for w in words) / n
        if alpha < self.min_alpha_words_ratio:
            return f"gopher_quality: only {alpha:.0%} of words have a letter"
        stops = 0
        for w in text.lower().split():
            stops += w.strip(_PUNCT) in STOP_WORDS
            if stops >= self.min_stop_words:  # enough: the rest need not be counted
                break
        if stops < self.min_stop_words:
            return f"gopher_quality: {stops} stop words < {self.min_stop_words}"
        return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _ngrams(words: list[str], n: int):
    return zip(*(words[k:] for k in range(n)))


def top_ngram_fraction(words: list[str], n: int) -> float:
    """Characters covered by the most frequent word n-gram (counted once per occurrence), over all
    the words' characters."""
    grams = Counter(_ngrams(words, n))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(w) for w in gram) / max(1, sum(len(w) for w in words))


def duplicated_ngram_fraction(words: list[str], n: int) -> float:
    """Characters of the words inside n-grams that occur more than once, over all the words'
    characters (Gopher's "duplicate n-gram character fraction"); each word counts once even when
    several duplicated n-grams overlap it."""
    seen: set[tuple[str, ...]] = set()
    covered = bytearray(len(words))
    ones = b"\1" * n
    for i, gram in enumerate(_ngrams(words, n)):
        if gram in seen:
            covered[i:i + n] = ones
        else:
            seen.add(gram)
    if not any(covered):
        return 0.0
    return sum(len(w) for w, c in zip(words, covered) if c) / max(1, sum(map(len, words)))


@dataclass
class GopherRepetition:
    """Gopher's repetition rules: repeated lines and paragraphs, the most frequent 2-4-grams and
    duplicated 5-10-grams."""
    max_dup_line_frac: float = 0.3
    max_dup_para_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    max_dup_para_char_frac: float = 0.2
    top_ngrams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_ngrams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                                 (10, 0.10))

    def __call__(self, text: str) -> str | None:
        total = max(1, len(text))
        paras = [p.strip() for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
        dup, chars = _duplicates(paras)
        if paras and dup / len(paras) > self.max_dup_para_frac:
            return f"gopher_repetition: {dup}/{len(paras)} paragraphs repeated"
        if chars / total > self.max_dup_para_char_frac:
            return f"gopher_repetition: repeated paragraphs hold {chars / total:.0%} of the characters"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        dup, chars = _duplicates(lines)
        if lines and dup / len(lines) > self.max_dup_line_frac:
            return f"gopher_repetition: {dup}/{len(lines)} lines repeated"
        if chars / total > self.max_dup_line_char_frac:
            return f"gopher_repetition: repeated lines hold {chars / total:.0%} of the characters"
        words = text.split()
        for n, limit in self.top_ngrams:
            frac = top_ngram_fraction(words, n)
            if frac > limit:
                return f"gopher_repetition: the top {n}-gram covers {frac:.0%} > {limit:.0%}"
        # A word inside a duplicated (n+1)-gram is inside a duplicated n-gram, so the fractions shrink
        # as n grows: when the first is under every limit, the others are too.
        lowest = min((limit for _, limit in self.dup_ngrams), default=1.0)
        for k, (n, limit) in enumerate(self.dup_ngrams):
            frac = duplicated_ngram_fraction(words, n)
            if frac > limit:
                return f"gopher_repetition: duplicated {n}-grams cover {frac:.0%} > {limit:.0%}"
            if k == 0 and frac <= lowest:
                break
        return None


@dataclass
class C4Rules:
    """C4's document-level rules: placeholder text, and too few lines that end a sentence (most
    lines of boilerplate, menus and tables don't). C4's line-dropping and its "{" rule are left
    out: they rewrite documents or remove all code."""
    min_terminal_lines_ratio: float = 0.12  # FineWeb's value
    banned: tuple[str, ...] = ("lorem ipsum",)

    def __call__(self, text: str) -> str | None:
        lower = text.lower()
        for phrase in self.banned:
            if phrase in lower:
                return f"c4: contains '{phrase}'"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            ratio = sum(ln.endswith(_TERMINAL) for ln in lines) / len(lines)
            if ratio < self.min_terminal_lines_ratio:
                return f"c4: {ratio:.0%} of lines end a sentence < {self.min_terminal_lines_ratio:.0%}"
        return None


@cache
def load_badwords(path: str | None = None) -> frozenset[str]:
    """The bad-word list: one lower-case word per line, '#' starts a comment. Without a path, the
    English list shipped with llamaherd (`badwords_en.txt`)."""
    if path is None:
        text = resources.files(__package__).joinpath("badwords_en.txt").read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    return frozenset(w for ln in text.splitlines() if (w := ln.split("#")[0].strip().lower()))


@dataclass
class BadWords:
    """Fails a document whose share of words on the bad-word list is above `max_ratio`."""
    max_ratio: float = 0.01
    path: str | None = None  # a list of your own instead of the shipped English one

    def ratio(self, text: str) -> float:
        listed = load_badwords(self.path)
        words = text.lower().split()
        bad = sum(w.strip(_PUNCT) in listed for w in words)
        return bad / max(1, len(words))

    def __call__(self, text: str) -> str | None:
        r = self.ratio(text)
        return f"badwords: {r:.1%} of words > {self.max_ratio:.1%}" if r > self.max_ratio else None
