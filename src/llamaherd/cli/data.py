"""`herd data prepare` and `herd data train-quality`: the pre-training data pipeline."""

from __future__ import annotations

import argparse
import json
import os

# Stages a flag turns off: --no-NAME.
SWITCHES = ("langid", "gopher-quality", "gopher-repetition", "c4", "badwords", "url-dedup", "exact-dedup",
            "minhash", "line-dedup", "kl")


def cmd_prepare(args) -> int:
    """Filter, dedup, mix and tokenize a corpus into uint32 token shards plus OUT/report.json.

    Inputs: text files (one document each), JSONL files (a `text` field; optional `url`, `date`,
    `source`), .gz of either, or folders of them. Stages, in order, each on unless --no-NAME:
    read errors (binary, invalid UTF-8, bad JSON: counted and skipped), language (fastText lid.176,
    filters with --lang), gopher-quality, gopher-repetition, c4, badwords (> 1% listed words),
    quality (with --quality MODEL), url-dedup (newest `date` kept), exact-dedup, minhash (5-grams,
    14x8 LSH), line-dedup (lines seen > 6 times in a bucket), kl (token distribution > 5 nats from
    the corpus's), mix (--mix). Run it again with the same arguments to resume a stopped run."""
    from ..data import PrepareConfig, format_report, prepare
    from ..data.heuristics import BadWords

    config = PrepareConfig(tokenizer=args.tokenizer, lang=tuple(c for c in args.lang.split(",") if c),
                           lang_threshold=args.lang_threshold, quality_model=args.quality,
                           quality_threshold=args.quality_threshold, line_dedup_threshold=args.line_dedup_threshold,
                           line_dedup_bucket=args.line_dedup_bucket, kl_threshold=args.kl_threshold,
                           mix=args.mix or {}, seed=args.seed, shard_tokens=args.shard_tokens,
                           badwords=BadWords(args.badwords_max_ratio, args.badwords))
    for name in SWITCHES:
        if getattr(args, "no_" + name.replace("-", "_")):
            field = name.replace("-", "_")
            setattr(config, field, None if field in ("gopher_quality", "gopher_repetition", "c4", "badwords")
                    else False)
    report = prepare(args.inputs, args.out, config, workers=args.workers, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        print(json.dumps({k: report[k] for k in ("documents_in", "documents_out", "tokens_out", "removed")}))
    return 0


def cmd_train_quality(args) -> int:
    """Train the quality classifier `herd data prepare --quality` uses: a logistic regression over
    hashed word 1-2-grams of documents you call good (--positive) and bad (--negative), saved as
    safetensors."""
    from ..data import train_quality

    result = train_quality(args.positive, args.negative, args.out, max_examples=args.max_examples)
    acc = result["holdout_accuracy"]
    print(f"trained on {result['positive']} positive and {result['negative']} negative documents"
          + (f", held-out accuracy {acc:.1%}" if acc is not None else "") + f"; saved {result['path']}")
    return 0


def register(sub, local) -> None:
    data = sub.add_parser("data", help="prepare pre-training data", description="The pre-training data pipeline.")
    verbs = data.add_subparsers(dest="data_command", metavar="VERB", required=True)

    p = verbs.add_parser("prepare", help="filter, dedup and tokenize a corpus into shards",
                         description=cmd_prepare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IN", help="text or JSONL files, or folders of them")
    p.add_argument("--out", required=True, help="output folder (shards and report.json)")
    p.add_argument("--tokenizer", default="llama3", help="llama3 (the Llama 3 tokenizer) or a model name or path")
    p.add_argument("--lang", default="", help="languages to keep, e.g. en,ko (default: all)")
    p.add_argument("--lang-threshold", type=float, default=0.65, help="minimum language probability (0.65)")
    p.add_argument("--mix", default="", help="token shares by source or language, e.g. code=0.17,ko=0.08")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: the CPUs)")
    p.add_argument("--quality", metavar="MODEL", help="a classifier from `herd data train-quality`")
    p.add_argument("--quality-threshold", type=float, default=0.5, help="minimum quality probability (0.5)")
    p.add_argument("--badwords", metavar="FILE", help="your own bad-word list (one word a line)")
    p.add_argument("--badwords-max-ratio", type=float, default=0.01, help="share of bad words allowed (0.01)")
    p.add_argument("--line-dedup-threshold", type=int, default=6, help="a line seen more often is removed (6)")
    p.add_argument("--line-dedup-bucket", type=int, default=30_000_000, help="documents per bucket (30M)")
    p.add_argument("--kl-threshold", type=float, default=5.0, help="maximum KL divergence in nats (5.0)")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard (2^28)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mix's sampling")
    for name in SWITCHES:
        p.add_argument(f"--no-{name}", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="also print the counts as one JSON line")
    p.epilog = "Turn a stage off with " + ", ".join(f"--no-{n}" for n in SWITCHES) + "."
    p.set_defaults(func=cmd_prepare)

    q = verbs.add_parser("train-quality", help="train a quality classifier for prepare --quality",
                         description=cmd_train_quality.__doc__)
    q.add_argument("--positive", nargs="+", required=True, help="files or folders of good documents")
    q.add_argument("--negative", nargs="+", required=True, help="files or folders of bad documents")
    q.add_argument("--out", required=True, help="the model file to write (.safetensors)")
    q.add_argument("--max-examples", type=int, default=100_000, help="documents read of each kind")
    q.set_defaults(func=cmd_train_quality)
