"""The Llama 3 paper's token-distribution filter: the KL divergence of a document's token
distribution from the corpus's, which is high for documents full of tokens the rest of the corpus
rarely uses (tables of numbers, encoded blobs, another script inside a monolingual corpus).

KL(p_doc || q_corpus) = sum_t p_doc(t) log(p_doc(t) / q_corpus(t)), in nats. The corpus counts
include the document itself, so q is never zero where p is not.
"""

from __future__ import annotations

import numpy as np


def kl_divergence(tokens: np.ndarray, lengths: np.ndarray, corpus_counts: np.ndarray) -> np.ndarray:
    """Per-document KL divergence from the corpus distribution.

    Args:
        tokens: the documents' token ids, one after another (uint32).
        lengths: tokens per document (they sum to len(tokens)).
        corpus_counts: (vocab,) token counts of the whole corpus.
    Returns:
        (len(lengths),) float64; 0 for an empty document.
    """
    n = len(lengths)
    if n == 0 or len(tokens) == 0:
        return np.zeros(n)
    doc = np.repeat(np.arange(n, dtype=np.int64), lengths)
    vocab = np.int64(len(corpus_counts))
    pairs, counts = np.unique(doc * vocab + tokens.astype(np.int64), return_counts=True)
    pair_doc, pair_tok = pairs // vocab, pairs % vocab
    p = counts / lengths[pair_doc]
    q = corpus_counts[pair_tok] / corpus_counts.sum()
    return np.bincount(pair_doc, weights=p * np.log(p / q), minlength=n)
