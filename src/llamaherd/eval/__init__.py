"""Evaluation on the engine: perplexity, multiple choice, generation and code tasks.

    import llamaherd.eval
    report = llamaherd.eval.run(["smollm2:135m"], "mmlu", limit=200)
    report["results"]["smollm2:135m"]["metrics"]   # {"acc": ..., "acc_norm": ...}

- `tasks`: the built-in tasks and the JSONL task format (documented there).
- `scoring`: batched log-likelihoods of continuations (lm-evaluation-harness's rules).
- `metrics`: pass@k (Chen et al. 2021), accuracy, answer extraction.
- `sandbox`: generated code in a namespaced, resource-limited process.
- `runner`: `run`, which `herd eval` calls.
- `harness`: the `herd` model backend for lm-evaluation-harness.

Importing this package stays light (no torch): the submodules are imported where used.
"""

from __future__ import annotations


def run(*args, **kwargs):
    """See `llamaherd.eval.runner.run`."""
    from .runner import run as _run

    return _run(*args, **kwargs)


__all__ = ["run"]
