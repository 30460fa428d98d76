"""`herd data prepare` vs datatrove (FineWeb's pipeline library): the same stages on the same input,
offline, one run each.

    python benchmarks/bench_data.py [--docs 10000] [--workers 1] [--json results.json]

The input is a JSONL corpus made here from the English prose on this machine (the licence texts in
/usr/share/common-licenses and /usr/share/doc READMEs, cut into sentences and recombined into
documents), with 10% exact copies, 10% near-duplicates (one word changed) and 10% junk.

Stages both have, run by each in a fresh process of its own:
  filters+minhash   Gopher quality + Gopher repetition, then MinHash dedup (5-grams, 14 bands x 8)
  +tokenize         the same, then tokenizing the kept documents into uint32 shards with the same
                    tokenizer (SmolLM2's tokenizer.json; both run Hugging Face `tokenizers`)
Reported: documents/s (input documents over wall time, imports and process start included) and
peak RSS. datatrove's language filter and its bad-word filter download their model and lists at run
time, so they are left out of the comparison; herd's full default pipeline (language ID, C4, bad
words, URL/exact/line dedup and KL included) is timed on its own as a last row.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    """A JSONL corpus of n_docs documents of recombined English sentences."""
    texts = []
    for f in sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(glob.glob("/usr/share/doc/*/README*")):
        try:
            texts.append(Path(f).read_text("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    sentences = [s for t in texts for s in re.split(r"(?<=[.!?])\s+", " ".join(t.split()))
                 if 6 <= len(s.split()) <= 40 and s[-1] in ".!?"]
    rng = random.Random(seed)
    docs: list[str] = []
    for i in range(n_docs):
        kind = rng.random()
        if kind < 0.1 and docs:
            docs.append(rng.choice(docs))  # exact copy
        elif kind < 0.2 and docs:
            words = rng.choice(docs).split()
            words[rng.randrange(len(words))] = "zebra"
            docs.append(" ".join(words))  # near-duplicate
        elif kind < 0.3:
            docs.append(" ".join(rng.choice(("buy", "now", "click", "here", "$$$", "#1")) for _ in range(40)))
        else:
            docs.append("\n\n".join(" ".join(rng.choice(sentences) for _ in range(rng.randint(2, 5)))
                                    for _ in range(rng.randint(2, 6))))
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": d}) + "\n")


def export_tokenizer(path: Path) -> None:
    """SmolLM2's tokenizer as a tokenizer.json both pipelines read."""
    from llamaherd.fetch import smollm2_gguf
    from llamaherd.tokenizer import load_tokenizer

    load_tokenizer(smollm2_gguf()).model.save(str(path))


def run_herd(corpus: Path, out: Path, workers: int, tokenizer: str, stages: str) -> dict:
    from llamaherd.data import PrepareConfig, prepare

    if stages == "full":
        config = PrepareConfig(tokenizer=tokenizer)
    else:
        config = PrepareConfig(tokenizer=tokenizer, langid=False, c4=None, badwords=None, url_dedup=False,
                               exact_dedup=False, line_dedup=False, kl=False)
    report = prepare([corpus], out, config, workers=workers, progress=False)
    return {"documents_out": report["documents_out"], "tokens_out": report["tokens_out"]}


def run_datatrove(corpus: Path, out: Path, workers: int, tokenizer: str, stages: str) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    # 5-grams, 14 buckets x 8 hashes, as ours. Its default xxhash shingle hash fails with xxhash 4
    # ("Strings must be encoded before hashing"), so it hashes shingles with its sha1 option.
    config = MinhashConfig(hash_config=HashConfig(hash_fc="sha1"))
    tasks = max(1, workers)

    def execute(pipeline, name, n_tasks=tasks):
        LocalPipelineExecutor(pipeline=pipeline, tasks=n_tasks, workers=workers, logging_dir=str(out / "logs" / name),
                              skip_completed=False).run()

    execute([JsonlReader(str(corpus.parent), glob_pattern=corpus.name), GopherQualityFilter(),
             GopherRepetitionFilter(), JsonlWriter(str(out / "filtered"), compression=None)], "filter")
    execute([JsonlReader(str(out / "filtered")), MinhashDedupSignature(str(out / "sigs"), config=config)], "sig")
    execute([MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=config)], "buckets",
            config.num_buckets)
    execute([MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=config)], "cluster", 1)
    last = [JsonlReader(str(out / "filtered")), MinhashDedupFilter(str(out / "remove"))]
    if stages == "tokenize":
        last.append(DocumentTokenizer(str(out / "tokens"), tokenizer_name_or_path=tokenizer,
                                      shuffle_documents=False))
    else:
        last.append(JsonlWriter(str(out / "deduped"), compression=None))
    execute(last, "final")
    return {}


def child(args) -> None:
    """One measured run in this process; prints its result as JSON."""
    t0 = time.perf_counter()
    fn = run_herd if args.child == "herd" else run_datatrove
    result = fn(Path(args.corpus), Path(args.out), args.workers, args.tokenizer, args.stages)
    result["seconds"] = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_mb"] = max(rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print("RESULT " + json.dumps(result))


def measure(system: str, stages: str, corpus: Path, tmp: Path, workers: int, tokenizer: Path) -> dict:
    out = tmp / f"{system}-{stages}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "LOGURU_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, __file__, "--child", system, "--stages", stages, "--corpus", str(corpus),
                           "--out", str(out), "--workers", str(workers), "--tokenizer", str(tokenizer)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{system} {stages} failed")
    result = json.loads(lines[-1][7:])
    result["wall_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--stages", default="minhash", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    corpus = tmp / "corpus" / "corpus.jsonl"
    corpus.parent.mkdir()
    make_corpus(corpus, args.docs)
    tokenizer = tmp / "tokenizer.json"
    export_tokenizer(tokenizer)
    size = corpus.stat().st_size / 1e6
    print(f"corpus: {args.docs} documents, {size:.1f} MB; workers: {args.workers}")
    rows = []
    for stages in ("minhash", "tokenize"):
        for system in ("herd", "datatrove"):
            r = measure(system, stages, corpus, tmp, args.workers, tokenizer)
            r.update(system=system, stages=stages, docs_per_s=args.docs / r["wall_s"])
            rows.append(r)
    full = measure("herd", "full", corpus, tmp, args.workers, tokenizer)
    full.update(system="herd", stages="full", docs_per_s=args.docs / full["wall_s"])
    rows.append(full)

    names = {"minhash": "filters+minhash", "tokenize": "+tokenize", "full": "herd's full default pipeline"}
    print(f"{'stages':<30}{'system':<11}{'docs/s':>9}{'wall s':>9}{'peak MB':>9}{'docs/s vs datatrove':>21}")
    for r in rows:
        peer = next((p for p in rows if p["stages"] == r["stages"] and p["system"] == "datatrove"), None)
        ratio = f"{r['docs_per_s'] / peer['docs_per_s']:.2f}x" if peer and r["system"] == "herd" else ""
        print(f"{names[r['stages']]:<30}{r['system']:<11}{r['docs_per_s']:>9.0f}{r['wall_s']:>9.1f}"
              f"{r['peak_rss_mb']:>9.0f}{ratio:>21}")
    herd_kept = next(r for r in rows if r["system"] == "herd" and r["stages"] == "minhash")["documents_out"]
    dt_out = tmp / "datatrove-minhash" / "deduped"
    dt_kept = sum(1 for f in dt_out.glob("*.jsonl") for _ in open(f)) if dt_out.exists() else None
    print(f"documents kept by filters+minhash: herd {herd_kept}, datatrove {dt_kept}")
    if args.json:
        Path(args.json).write_text(json.dumps({"docs": args.docs, "workers": args.workers, "rows": rows,
                                               "kept": {"herd": herd_kept, "datatrove": dt_kept}}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
