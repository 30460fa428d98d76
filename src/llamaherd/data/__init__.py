"""The pre-training data pipeline: `herd data prepare` and `herd data train-quality`.

    import llamaherd.data as data
    report = data.prepare(["web/", "code.jsonl"], "prepared/", lang=("en", "ko"), mix="code=0.17")
    for tokens in data.iter_documents("prepared/"): ...

One module per stage: readers, normalize (+ exact dedup keys), langid, heuristics (Gopher, C4, bad
words), quality (the trained classifier), minhash, lines (line-level dedup), kl, mix, shards; pipeline
runs them in order over processes.
"""

from .pipeline import STAGES, PrepareConfig, format_report, prepare
from .quality import QualityModel, train_quality
from .shards import iter_documents, open_shards

__all__ = ["STAGES", "PrepareConfig", "QualityModel", "format_report", "iter_documents", "open_shards",
           "prepare", "train_quality"]
