"""An optional model-based quality filter: a logistic regression over hashed word 1-2-grams (the
linear model fastText trains, without its embedding), trained by `herd data train-quality` on
documents you call good and bad, as the Llama 3 paper trains its quality classifiers.

The model is saved as safetensors (weights) with its feature settings in the metadata: no pickle,
so a model file from someone else is safe to load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import HerdError
from .normalize import normalize_text
from .readers import Document, plan_units, read_unit

FEATURES = {"n_features": 1 << 18, "ngram_range": [1, 2], "lowercase": True}


def _vectorizer(settings: dict):
    try:
        from sklearn.feature_extraction.text import HashingVectorizer
    except ImportError:
        raise HerdError("the quality classifier needs scikit-learn: pip install 'llamaherd[data]'") from None
    return HashingVectorizer(n_features=settings["n_features"], ngram_range=tuple(settings["ngram_range"]),
                             lowercase=settings["lowercase"], alternate_sign=False, norm="l2")


def _texts(inputs: list[str | os.PathLike], limit: int) -> Iterator[str]:
    count = 0
    for unit in plan_units(inputs):
        for doc in read_unit(unit):
            if isinstance(doc, Document) and (text := normalize_text(doc.text)):
                yield text
                count += 1
                if count >= limit:
                    return


def train_quality(positive: list[str | os.PathLike], negative: list[str | os.PathLike],
                  out: str | os.PathLike, *, max_examples: int = 100_000, c: float = 1.0,
                  holdout: float = 0.1, seed: int = 0) -> dict:
    """Train a quality classifier and save it.

    Args:
        positive: files or folders of good documents (read like `herd data prepare` inputs).
        negative: files or folders of bad ones.
        out: the model file to write (safetensors).
        max_examples: at most this many documents of each kind are read.
        c: inverse regularisation strength of the logistic regression.
        holdout: share of the examples kept aside to measure accuracy.
        seed: for the hold-out split.
    Returns:
        {"positive": n, "negative": n, "holdout_accuracy": float or None, "path": str}
    """
    from safetensors.numpy import save_file
    from sklearn.linear_model import LogisticRegression

    pos, neg = list(_texts(positive, max_examples)), list(_texts(negative, max_examples))
    if not pos or not neg:
        raise HerdError(f"train-quality needs documents of both kinds (found {len(pos)} positive, "
                        f"{len(neg)} negative)")
    X = _vectorizer(FEATURES).transform(pos + neg)
    y = np.array([1] * len(pos) + [0] * len(neg))
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * holdout) if len(y) >= 20 else 0
    test, train = order[:n_test], order[n_test:]
    model = LogisticRegression(C=c, max_iter=1000).fit(X[train], y[train])
    accuracy = float(model.score(X[test], y[test])) if n_test else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"coef": model.coef_[0].astype(np.float32), "intercept": model.intercept_.astype(np.float32)},
              str(out), metadata={"llamaherd": "quality-classifier", "features": json.dumps(FEATURES)})
    return {"positive": len(pos), "negative": len(neg), "holdout_accuracy": accuracy, "path": str(out)}


class QualityModel:
    """A saved quality classifier: `model(text)` is the probability that the text is good."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("llamaherd") != "quality-classifier":
                    raise HerdError(f"{path} is not a quality classifier made by `herd data train-quality`")
                self.coef, self.intercept = f.get_tensor("coef"), float(f.get_tensor("intercept")[0])
                settings = json.loads(meta["features"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise HerdError(f"cannot read the quality model {path}: {e}") from None
        self._vectorizer = _vectorizer(settings)

    def __call__(self, text: str) -> float:
        x = self._vectorizer.transform([text])
        z = float(x @ self.coef) + self.intercept
        return float(1.0 / (1.0 + np.exp(-z)))
