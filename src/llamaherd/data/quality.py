"""An optional model-based quality filter: a logistic regression over hashed word 1-2-grams (the
linear model fastText trains, without its embedding; fitted by scipy's L-BFGS), trained by `herd data train-quality` on
documents you call good and bad, as the Llama 3 paper trains its quality classifiers.

The model is saved as safetensors (weights) with its feature settings in the metadata: no pickle,
so a model file from someone else is safe to load.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import HerdError
from .normalize import hash64, normalize_text
from .readers import Document, plan_units, read_unit

FEATURES = {"n_features": 1 << 18, "ngram": 2}
_WORD = re.compile(r"\w\w+")


def features(text: str, settings: dict = FEATURES) -> tuple[np.ndarray, np.ndarray]:
    """The hashed word 1..n-grams of a text: (feature indices, L2-normalised counts)."""
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i:i + n]) for n in range(1, settings["ngram"] + 1) for i in range(len(words) - n + 1)]
    idx, counts = np.unique(np.array([hash64(g) % settings["n_features"] for g in grams], np.int64),
                            return_counts=True)
    values = counts.astype(np.float64)
    return idx, values / (np.linalg.norm(values) or 1.0)


def _matrix(texts: list[str], settings: dict):
    from scipy.sparse import csr_matrix

    rows = [features(t, settings) for t in texts]
    indptr = np.concatenate([[0], np.cumsum([len(i) for i, _ in rows])])
    indices = np.concatenate([i for i, _ in rows]) if rows else np.zeros(0, np.int64)
    data = np.concatenate([v for _, v in rows]) if rows else np.zeros(0)
    return csr_matrix((data, indices, indptr), shape=(len(texts), settings["n_features"]))


def _fit_logistic(X, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (C * sum of log-losses + |w|^2 / 2), by L-BFGS."""
    from scipy.optimize import minimize
    from scipy.special import expit

    n_features = X.shape[1]
    # A feature no example has keeps a zero weight at the optimum: fit only the ones in use.
    used = np.unique(X.indices)
    X = X[:, used]
    sign = np.where(y > 0, 1.0, -1.0)

    def loss(params):
        w, b = params[:-1], params[-1]
        margin = sign * (X @ w + b)
        grad_z = -c * sign * expit(-margin)
        value = c * np.logaddexp(0, -margin).sum() + 0.5 * w @ w
        return value, np.concatenate([X.T @ grad_z + w, [grad_z.sum()]])

    result = minimize(loss, np.zeros(X.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    coef = np.zeros(n_features)
    coef[used] = result.x[:-1]
    return coef, float(result.x[-1])


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

    pos, neg = list(_texts(positive, max_examples)), list(_texts(negative, max_examples))
    if not pos or not neg:
        raise HerdError(f"train-quality needs documents of both kinds (found {len(pos)} positive, "
                        f"{len(neg)} negative)")
    X = _matrix(pos + neg, FEATURES)
    y = np.array([1] * len(pos) + [0] * len(neg))
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * holdout) if len(y) >= 20 else 0
    test, train = order[:n_test], order[n_test:]
    coef, intercept = _fit_logistic(X[train], y[train], c)
    accuracy = float(((X[test] @ coef + intercept > 0) == (y[test] > 0)).mean()) if n_test else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"coef": coef.astype(np.float32), "intercept": np.array([intercept], np.float32)},
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
                self.settings = json.loads(meta["features"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise HerdError(f"cannot read the quality model {path}: {e}") from None
        if len(self.coef) != self.settings.get("n_features"):
            raise HerdError(f"cannot read the quality model {path}: its weights do not match its settings")

    def __call__(self, text: str) -> float:
        idx, values = features(text, self.settings)
        z = float(values @ self.coef[idx]) + self.intercept
        return float(1.0 / (1.0 + np.exp(-z)))
