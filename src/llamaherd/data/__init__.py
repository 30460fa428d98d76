"""The pre-training data pipeline: `herd data prepare` and `herd data train-quality`.

    import llamaherd.data as data
    report = data.prepare(["web/", "code.jsonl"], "prepared/", lang=("en", "ko"), mix="code=0.17")
    for tokens in data.iter_documents("prepared/"): ...
    for batch in data.PackedDocuments("prepared/", seq_len=2048, val_fraction=0.01).batches(8): ...

One module per stage: readers, normalize (+ exact dedup keys), langid, heuristics (Gopher, C4, bad
words), quality (the trained classifier), minhash, lines (line-level dedup), kl, mix, shards; pipeline
runs them in order over processes; loader reads the shards back as packed pre-training windows.
"""

from .loader import IGNORE, PackedDocuments, Window
from .pipeline import STAGES, PrepareConfig, format_report, prepare
from .quality import QualityModel, train_quality
from .shards import iter_documents, open_shards

__all__ = ["IGNORE", "STAGES", "PackedDocuments", "PrepareConfig", "QualityModel", "Window", "format_report",
           "iter_documents", "open_shards", "prepare", "train_quality"]
