"""Metrics: pass@k, multiple-choice accuracy, answer extraction for exact match."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
    on Code", eq. 1): 1 - C(n-c, k) / C(n, k), computed as a stable product.

    Args:
        n: samples drawn for a problem.
        c: samples that passed.
        k: the k of pass@k (k <= n).
    Returns:
        The probability that at least one of k samples drawn without replacement passes.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mc_scores(logliks: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """The predicted choice by log-likelihood (acc) and by log-likelihood per character of the
    choice (acc_norm), as lm-evaluation-harness's `process_results` for multiple choice: the
    length is that of the choice text, without the target delimiter; ties go to the first.

    Returns:
        (argmax of logliks, argmax of logliks / len(choice)).
    """
    pred = max(range(len(logliks)), key=lambda i: logliks[i])
    lengths = [float(len(c)) for c in choices]
    pred_norm = max(range(len(logliks)), key=lambda i: logliks[i] / lengths[i])
    return pred, pred_norm


NUMBER = r"-?[$0-9.,]{1,}"  # a GSM8K-style number (lm-eval's flexible-extract pattern, roughly)


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The answer in a model's (or a reference's) text: the first group of the last match of
    `pattern` (GSM8K: r"#### (-?[0-9.,]+)"); without a pattern, the whole text stripped."""
    if pattern is None:
        return text.strip()
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    m = matches[-1]
    return (m.group(1) if m.groups() else m.group(0)).strip()


def normalize(answer: str | None) -> str | None:
    """Exact-match normalisation: no surrounding space, no thousands commas or dollar signs, no
    final period, numbers written plainly ("12.0" and "12" are the same)."""
    if answer is None:
        return None
    a = answer.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        x = float(a)
    except ValueError:
        return a
    return str(int(x)) if x.is_integer() else repr(x)
