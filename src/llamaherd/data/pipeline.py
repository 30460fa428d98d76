"""`herd data prepare`: a corpus in, token shards and a report out.

The stages, in the order a document meets them (each one can be turned off):

    read          binary files, invalid UTF-8, bad JSON lines and huge records are counted and skipped
    empty         nothing left after normalising (normalize.py)
    language      fastText lid.176 keeps the languages asked for (langid.py)
    gopher_quality, gopher_repetition, c4, badwords     rule-based filters (heuristics.py)
    quality       an optional classifier from `herd data train-quality` (quality.py)
    url_dedup     one document per URL, the newest by `date`
    exact_dedup   one document per normalised text
    minhash       one document per near-duplicate cluster (minhash.py)
    line_dedup    lines repeated across documents removed; documents left empty removed (lines.py)
    kl            token distribution too far from the corpus's (kl.py)
    mix           sampled down to the --mix shares (mix.py)

It runs in phases over units of the corpus (readers.py), each unit's results written to
`OUT/.work/` before the next: `scan` (per-document stages, in parallel), `dedup` (global, on hashes
and signatures only), `tokenize` (in parallel) and `write` (KL, mix, shards, report). A run that is
stopped resumes at the first unfinished unit when started again with the same inputs and settings.
No phase holds the texts of more than one unit per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import HerdError
from .heuristics import BadWords, C4Rules, GopherQuality, GopherRepetition, load_badwords
from .kl import kl_divergence
from .lines import frequent_keys, line_hashes, line_keys, remove_lines
from .minhash import MinHasher, band_keys, near_duplicates
from .mix import draws, group_of, keep_rates, parse_mix
from .normalize import normalize_text, text_key, url_key
from .readers import READ_ERRORS, Document, Unit, plan_units, read_unit
from .shards import ShardWriter

FILTERS = ("gopher_quality", "gopher_repetition", "c4", "badwords")
STAGES = (*READ_ERRORS, "empty", "language", *FILTERS, "quality", "url_dedup", "exact_dedup",
          "minhash", "line_dedup", "kl", "mix")


@dataclass
class PrepareConfig:
    """Everything that decides what `prepare` keeps (a resumed run must use the same).

    A filter set to None is off. Thresholds are the published ones (see each module).
    """
    tokenizer: str = "llama3"
    lang: tuple[str, ...] = ()  # languages kept; empty: all (documents are still labelled, for --mix)
    lang_threshold: float = 0.65  # FineWeb's minimum probability for a kept language
    langid: bool = True
    gopher_quality: GopherQuality | None = field(default_factory=GopherQuality)
    gopher_repetition: GopherRepetition | None = field(default_factory=GopherRepetition)
    c4: C4Rules | None = field(default_factory=C4Rules)
    badwords: BadWords | None = field(default_factory=BadWords)
    quality_model: str | None = None  # a file from `herd data train-quality`; None: no such stage
    quality_threshold: float = 0.5
    url_dedup: bool = True
    exact_dedup: bool = True
    minhash: bool = True
    minhash_ngram: int = 5
    minhash_bands: int = 14
    minhash_rows: int = 8
    line_dedup: bool = True
    line_dedup_threshold: int = 6  # a line seen more than this many times in a bucket is removed
    line_dedup_bucket: int = 30_000_000  # documents per bucket (the paper's)
    kl: bool = True
    kl_threshold: float = 5.0  # nats; see kl.py
    mix: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    max_doc_bytes: int = 10 << 20
    chunk_bytes: int = 32 << 20
    shard_tokens: int = 1 << 28


# --- phase 1: scan (per unit, in worker processes) -----------------------------------------------

_WORKER: dict = {}


def _init_worker(config: PrepareConfig) -> None:
    from .langid import LanguageID

    _WORKER.clear()
    _WORKER["config"] = config
    _WORKER["langid"] = LanguageID() if config.langid else None
    _WORKER["minhash"] = MinHasher(config.minhash_ngram, config.minhash_bands * config.minhash_rows) \
        if config.minhash else None
    if config.quality_model:
        from .quality import QualityModel

        _WORKER["quality"] = QualityModel(config.quality_model)


def _verdict(doc: Document, config: PrepareConfig) -> tuple[str | None, str]:
    """(the stage that removes the document or None, its language)."""
    if not doc.text:
        return "empty", "unknown"
    lang = "unknown"
    if _WORKER["langid"] is not None:
        lang, prob = _WORKER["langid"](doc.text)
        if config.lang and (lang not in config.lang or prob < config.lang_threshold):
            return "language", lang
    for name in FILTERS:
        check = getattr(config, name)
        if check is not None and check(doc.text):
            return name, lang
    if "quality" in _WORKER and _WORKER["quality"](doc.text) < config.quality_threshold:
        return "quality", lang
    return None, lang


def _save(folder: Path, index: int, **arrays) -> None:
    """Each array as folder/NNNNN.NAME.npy (plain .npy files, so readers can memory-map them)."""
    for name, array in arrays.items():
        path = folder / f"{index:05d}.{name}.npy"
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, path)


def _load(folder: Path, index: int, name: str) -> np.ndarray:
    return np.load(folder / f"{index:05d}.{name}.npy", mmap_mode="r")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _scan_unit(index: int, unit: Unit, work: str) -> dict:
    """Runs the per-document stages on a unit; writes its kept documents and their hashes."""
    config: PrepareConfig = _WORKER["config"]
    work = Path(work) / "scan"
    counts = dict.fromkeys(STAGES, 0)
    n_in = 0
    keys, urls, dates, sigs, lhashes, lcounts = [], [], [], [], [], []
    n_perm = config.minhash_bands * config.minhash_rows
    docs_path = work / f"{index:05d}.jsonl"
    with open(docs_path.with_suffix(".tmp"), "w", encoding="utf-8") as out:
        for doc in read_unit(unit, config.max_doc_bytes):
            n_in += 1
            if isinstance(doc, str):
                counts[doc] += 1
                continue
            doc.text = normalize_text(doc.text)
            stage, lang = _verdict(doc, config)
            if stage:
                counts[stage] += 1
                continue
            out.write(json.dumps({"text": doc.text, "source": doc.source, "lang": lang},
                                 ensure_ascii=False) + "\n")
            keys.append(text_key(doc.text))
            urls.append(url_key(doc.url) if doc.url else 0)
            dates.append(np.nan if doc.date is None else doc.date)
            sigs.append(_WORKER["minhash"](doc.text) if config.minhash else np.zeros(n_perm, np.uint32))
            hashes = line_hashes(doc.text) if config.line_dedup else []
            lhashes.extend(hashes)
            lcounts.append(len(hashes))
    os.replace(docs_path.with_suffix(".tmp"), docs_path)
    _save(work, index, text_key=np.array(keys, np.uint64), url_key=np.array(urls, np.uint64),
          date=np.array(dates, np.float64), sig=np.array(sigs, np.uint32).reshape(-1, n_perm),
          line_hash=np.array(lhashes, np.uint64), line_count=np.array(lcounts, np.int64))
    result = {"documents_in": n_in, "removed": counts}
    _write_json(work / f"{index:05d}.json", result)  # written last: the unit is done
    return result


# --- phase 2: dedup (global, hashes only) ---------------------------------------------------------

def _dedup(units: list[Unit], work: Path, config: PrepareConfig) -> dict:
    """Decides which scanned documents the dedup stages remove; writes dedup/NNNNN.npy (the bucket of each kept document, -1 for a removed one)."""
    folder = work / "scan"
    sizes = [len(_load(folder, i, "text_key")) for i in range(len(units))]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    removed = {"url_dedup": 0, "exact_dedup": 0, "minhash": 0, "line_dedup": 0}
    alive = np.ones(n, bool)
    def cat(name: str) -> np.ndarray:  # one number per document, for the whole corpus
        return np.concatenate([_load(folder, i, name) for i in range(len(units))])

    if config.url_dedup and n:
        url, date = cat("url_key"), np.nan_to_num(cat("date"), nan=-np.inf)
        has = np.flatnonzero(url != 0)
        # Per URL the newest date wins, the earliest document among equal dates.
        order = has[np.lexsort((has, -date[has], url[has]))]
        first = np.ones(len(order), bool)
        first[1:] = url[order[1:]] != url[order[:-1]]
        alive[order[~first]] = False
        removed["url_dedup"] = int((~first).sum())
    if config.exact_dedup and n:
        key = cat("text_key")
        idx = np.flatnonzero(alive)
        _, first = np.unique(key[idx], return_index=True)  # the first index of each key
        dup = np.ones(len(idx), bool)
        dup[first] = False
        alive[idx[dup]] = False
        removed["exact_dedup"] = int(dup.sum())
    if config.minhash and n:
        idx = np.flatnonzero(alive)

        def read_band(band: int) -> np.ndarray:
            keys = np.concatenate([band_keys(_load(folder, i, "sig"), band, config.minhash_rows)
                                   for i in range(len(units))])
            return keys[idx]

        dup = near_duplicates(read_band, len(idx), config.minhash_bands, config.minhash_rows)
        alive[idx[dup]] = False
        removed["minhash"] = int(dup.sum())

    # Buckets of line dedup: consecutive runs of the documents still alive.
    bucket = np.full(n, -1, np.int64)
    bucket[alive] = np.arange(int(alive.sum())) // config.line_dedup_bucket
    frequent = np.zeros(0, np.uint64)
    if config.line_dedup and n:
        def unit_keys(i: int) -> tuple[np.ndarray, np.ndarray]:
            counts = _load(folder, i, "line_count")
            doc_bucket = bucket[offsets[i]:offsets[i + 1]]
            line_doc = np.repeat(np.arange(len(counts)), counts)
            live = doc_bucket[line_doc] >= 0
            return line_keys(_load(folder, i, "line_hash")[live], doc_bucket[line_doc][live]), line_doc[live]

        def read_keys(p: int, parts: int) -> list[np.ndarray]:
            return [k[k % np.uint64(parts) == np.uint64(p)] for k in (unit_keys(i)[0] for i in range(len(units)))]

        total = int(cat("line_count").sum())
        frequent = frequent_keys(read_keys, total, config.line_dedup_threshold)
        for i in range(len(units)):
            keys, line_doc = unit_keys(i)
            rare = np.bincount(line_doc, weights=~np.isin(keys, frequent), minlength=sizes[i])
            has_lines = np.bincount(line_doc, minlength=sizes[i]) > 0
            emptied = np.flatnonzero(has_lines & (rare == 0)) + offsets[i]
            alive[emptied] = False
            removed["line_dedup"] += len(emptied)
    (work / "dedup").mkdir(exist_ok=True)
    np.save(work / "dedup" / "frequent_lines.npy", frequent)
    for i in range(len(units)):
        np.save(work / "dedup" / f"{i:05d}.npy",
                np.where(alive[offsets[i]:offsets[i + 1]], bucket[offsets[i]:offsets[i + 1]], -1))
    _write_json(work / "dedup" / "done.json", removed)
    return removed


# --- phase 3: tokenize (per unit, in worker processes) --------------------------------------------

@cache  # tokenizers are read-only; loaded before the workers fork, they inherit it
def _load_tokenizer(spec: str):
    from ..tokenizer import load_tokenizer

    if spec == "llama3" or Path(spec).exists():
        return load_tokenizer(spec)
    from ..cli.common import resolve_model  # a model name: its tokenizer from the store

    return load_tokenizer(resolve_model(spec).path)


def _tokenize_unit(index: int, work: str) -> dict:
    """Tokenizes a unit's kept documents (frequent lines removed); writes tok/NNNNN.*.npy."""
    config: PrepareConfig = _WORKER["config"]
    if "tokenizer" not in _WORKER:
        _WORKER["tokenizer"] = _load_tokenizer(config.tokenizer)
        frequent = np.load(Path(work) / "dedup" / "frequent_lines.npy")
        _WORKER["frequent"] = set(frequent.tolist())
    tok, frequent = _WORKER["tokenizer"], _WORKER["frequent"]
    work = Path(work)
    bucket = np.load(work / "dedup" / f"{index:05d}.npy")
    ids, lengths, keys, groups, kept = [], [], [], [], []
    with open(work / "scan" / f"{index:05d}.jsonl", encoding="utf-8") as f:
        for row, line in enumerate(f):
            if bucket[row] < 0:
                continue
            doc = json.loads(line)
            text = remove_lines(doc["text"], int(bucket[row]), frequent) if frequent else doc["text"]
            tokens = tok.encode(text)
            ids.extend(tokens)
            lengths.append(len(tokens))
            keys.append(text_key(text))
            groups.append(group_of(doc["source"], doc["lang"], config.mix))
            kept.append(row)
    _save(work / "tok", index, tokens=np.array(ids, np.uint32), lengths=np.array(lengths, np.int64),
          text_key=np.array(keys, np.uint64), group=np.array(groups, dtype=str))
    (work / "tok" / f"{index:05d}.done").touch()
    return {"documents": len(lengths)}


# --- phase 4: KL, mix, shards, report -------------------------------------------------------------

def _write(units: list[Unit], work: Path, out: Path, config: PrepareConfig, vocab: int) -> tuple[dict, list]:
    folder, n_units = work / "tok", len(units)
    corpus = np.zeros(vocab, np.int64)
    for i in range(n_units):
        corpus += np.bincount(_load(folder, i, "tokens"), minlength=vocab)[:vocab]
    removed = {"kl": 0, "mix": 0}
    keep = []
    for i in range(n_units):  # KL first, then the mix over what KL kept
        ok = np.ones(len(_load(folder, i, "lengths")), bool)
        if config.kl:
            ok &= kl_divergence(_load(folder, i, "tokens"), _load(folder, i, "lengths"), corpus) <= config.kl_threshold
        removed["kl"] += int((~ok).sum())
        keep.append(ok)
    if config.mix:
        per_group: dict[str, int] = {}
        for i, ok in enumerate(keep):
            group, lengths = _load(folder, i, "group"), _load(folder, i, "lengths")
            for name in np.unique(group[ok]):
                per_group[str(name)] = per_group.get(str(name), 0) + int(lengths[ok & (group == name)].sum())
        rates = keep_rates(per_group, config.mix)
        for i in range(n_units):
            rate = np.array([rates.get(str(g), 0.0) for g in _load(folder, i, "group")])
            drop = keep[i] & (draws(_load(folder, i, "text_key"), config.seed) >= rate)
            removed["mix"] += int(drop.sum())
            keep[i] &= ~drop
    writer = ShardWriter(out, config.shard_tokens)
    for i, ok in enumerate(keep):
        tokens, ends = _load(folder, i, "tokens"), np.cumsum(_load(folder, i, "lengths"))
        starts = ends - _load(folder, i, "lengths")
        for j in np.flatnonzero(ok):
            writer.write(tokens[starts[j]:ends[j]])
    return removed, writer.close()


# --- the whole run --------------------------------------------------------------------------------

def _run_units(fn, jobs: list[tuple], config: PrepareConfig, workers: int, desc: str, progress: bool) -> list:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="unit", disable=not progress or not jobs, file=sys.stderr,
               dynamic_ncols=True)
    results = []
    with bar:
        if workers <= 1:
            _init_worker(config)
            for job in jobs:
                results.append(fn(*job))
                bar.update()
            return results
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(config,)) as pool:
            for future in as_completed([pool.submit(fn, *job) for job in jobs]):
                results.append(future.result())
                bar.update()
    return results


def _fingerprint(units: list[Unit], config: PrepareConfig) -> str:
    """A hash of the settings and of the inputs' names, sizes and times: a run resumes only the same."""
    files = sorted({u.path for u in units})
    state = {"config": _jsonable(asdict(config)),
             "inputs": [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files],
             "units": [asdict(u) for u in units]}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=list))


def prepare(inputs: list[str | os.PathLike], out: str | os.PathLike, config: PrepareConfig | None = None,
            *, workers: int = 1, progress: bool = True, **options) -> dict:
    """Filter, dedup, mix and tokenize a corpus into shards.

    Args:
        inputs: text/JSONL files or folders of them.
        out: the output folder (created); a folder of an unfinished run with the same inputs and
            settings is resumed.
        config: the stages' settings; `options` override its fields (e.g. `lang=("en",)`,
            `minhash=False`, `mix="code=0.2"`).
        workers: processes for the per-document phases.
        progress: show progress bars on stderr.
    Returns:
        The report (also written to OUT/report.json): documents_in, documents_out, tokens_out,
        removed (documents per stage; documents_in = documents_out + their sum), shards, tokenizer.
    """
    config = replace(config or PrepareConfig(), **options)  # a copy: the caller's config stays as it was
    config.lang = tuple(config.lang.split(",") if isinstance(config.lang, str) else config.lang)
    config.mix = parse_mix(config.mix)
    if config.lang:
        if not config.langid:
            raise HerdError("--lang needs language ID (drop --no-langid)")
        from .langid import LanguageID, check_languages

        check_languages(list(config.lang), LanguageID())
    # Bad settings fail here, in one line, before any work (not later inside a worker process).
    tokenizer = _load_tokenizer(config.tokenizer)
    if config.badwords is not None and config.badwords.path:
        try:
            load_badwords(config.badwords.path)
        except (OSError, UnicodeDecodeError) as e:
            raise HerdError(f"cannot read the bad-word list {config.badwords.path}: {e}") from None
    if config.quality_model:
        from .quality import QualityModel

        QualityModel(config.quality_model)

    out = Path(out)
    units = plan_units(inputs, config.chunk_bytes)
    fingerprint = _fingerprint(units, config)
    work = out / ".work"
    report_path = out / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("fingerprint") == fingerprint and not work.exists():
            return report  # already done
        raise HerdError(f"{out} already holds prepared data from other inputs or settings: choose another --out")
    saved = work / "fingerprint.json"
    if work.exists() and (not saved.exists() or json.loads(saved.read_text()) != fingerprint):
        shutil.rmtree(work)  # an unfinished run with other inputs or settings: start again
    for sub in ("scan", "dedup", "tok"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    _write_json(saved, fingerprint)

    todo = [(i, u, str(work)) for i, u in enumerate(units) if not (work / "scan" / f"{i:05d}.json").exists()]
    _run_units(_scan_unit, todo, config, workers, "scan", progress)
    scanned = [json.loads((work / "scan" / f"{i:05d}.json").read_text()) for i in range(len(units))]
    if (work / "dedup" / "done.json").exists():
        dedup_removed = json.loads((work / "dedup" / "done.json").read_text())
    else:
        dedup_removed = _dedup(units, work, config)
    todo = [(i, str(work)) for i in range(len(units)) if not (work / "tok" / f"{i:05d}.done").exists()]
    _run_units(_tokenize_unit, todo, config, workers, "tokenize", progress)
    for old in out.glob("shard_*"):  # a run stopped while writing shards starts them again
        old.unlink()
    write_removed, shards = _write(units, work, out, config, tokenizer.n_words)

    removed = dict.fromkeys(STAGES, 0)
    for s in scanned:
        for k, v in s["removed"].items():
            removed[k] += v
    removed.update(dedup_removed)
    removed.update(write_removed)
    report = {
        "documents_in": sum(s["documents_in"] for s in scanned),
        "documents_out": sum(s["documents"] for s in shards),
        "tokens_out": sum(s["n_tokens"] for s in shards),
        "removed": removed,
        "tokenizer": {"name": config.tokenizer, "vocab_size": tokenizer.n_words,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "dtype": "uint32"},
        "shards": shards,
        "config": _jsonable(asdict(config)),
        "fingerprint": fingerprint,
    }
    _write_json(report_path, report)
    shutil.rmtree(work)
    return report


def format_report(report: dict) -> str:
    """The report as a table: documents per stage, then what is left."""
    rows = [("documents in", report["documents_in"])]
    rows += [(f"  - {stage}", n) for stage, n in report["removed"].items() if n]
    rows += [("documents out", report["documents_out"]), ("tokens out", report["tokens_out"]),
             ("shards", len(report["shards"]))]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>12,}" for name, value in rows)
