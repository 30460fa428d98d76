"""Safety around generation: guard models (the Llama Guard protocol), server moderation, a code
shield and prompt-injection scoring. The server calls this package before and after generation;
the engine never imports it.

    from llamaherd import safety
    v = safety.guard("llama-guard3:1b", "How do I hotwire a car?")   # Verdict: flagged, categories, score
    findings = safety.scan_code(reply_text)                          # insecure code in a reply

Modules: `llama_guard` (prompt, categories, parsing; no torch), `classify` (a guard through the
engine), `moderation` (the server's hooks, /v1/moderations), `code_shield` (+ `code_rules`),
`prompt_guard` (Prompt Guard 2 through transformers).
"""

from __future__ import annotations

from .llama_guard import (Category, Policy, Verdict, build_prompt, default_policy, load_policy,  # noqa: F401
                          parse_output)

__all__ = ["guard", "GuardClassifier", "scan_code", "Finding", "Category", "Policy", "Verdict", "build_prompt",
           "default_policy", "load_policy", "parse_output"]


def __getattr__(name: str):
    # The heavier parts load on first use (the classifier imports the engine and torch).
    if name in ("guard", "GuardClassifier"):
        from . import classify

        return getattr(classify, name)
    if name in ("scan_code", "Finding"):
        from . import code_shield

        return getattr(code_shield, name)
    raise AttributeError(name)
