"""herd data prepare: each stage on documents built to trip it (and clean ones that must pass), the
report's arithmetic, shards that decode back to the kept documents, resume, and bad input."""

from __future__ import annotations

import json
import random
import string

import numpy as np
import pytest

from llamaherd.cli import main
from llamaherd.data import PrepareConfig, iter_documents, open_shards, prepare, train_quality
from llamaherd.data.heuristics import BadWords, C4Rules, GopherQuality, GopherRepetition
from llamaherd.data.kl import kl_divergence
from llamaherd.data.langid import LanguageID
from llamaherd.data.minhash import MinHasher, band_keys, near_duplicates
from llamaherd.data.normalize import normalize_text
from llamaherd.errors import HerdError
from llamaherd.tokenizer import load_tokenizer

WORDS = ("people river garden window morning history music village teacher market winter bridge "
         "kitchen letter mountain station summer forest island doctor family evening harbour library "
         "painter farmer journey museum student country weather picture holiday friend neighbour "
         "walked carried opened noticed painted visited watched followed remembered built cooked "
         "quiet bright old small careful early green warm happy narrow famous gentle heavy").split()
STOP = ("the", "of", "and", "to", "with", "that")


def clean_doc(rng: random.Random, sentences: int = 8) -> str:
    """English prose made of varied sentences: passes every filter."""
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 10))]
        for _ in range(3):
            words.insert(rng.randrange(len(words)), rng.choice(STOP))
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


@pytest.fixture(scope="module")
def rng():
    return random.Random(17)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("llama3")


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d if isinstance(d, dict) else {"text": d}) + "\n")
    return path


def decoded(out, tok) -> list[str]:
    return [tok.decode(t.tolist()) for t in iter_documents(out)]


def run(inputs, out, **options):
    return prepare([str(p) for p in inputs], out, progress=False, **options)


# --- the filters, one by one -----------------------------------------------------------------------

def test_gopher_quality_trips_on_each_rule(rng):
    check, clean = GopherQuality(), clean_doc(rng)
    assert check(clean) is None
    trips = {
        "words <": "Too short a page.",
        "mean word length": " ".join(["incomprehensibilities"] * 30 + ["the", "of"] * 10),
        "symbol/word": clean + " #tag" * 20,
        "bullet": "\n".join(f"- {w} the of item" for w in WORDS[:20]),
        "ellipsis": "\n".join(f"{clean_doc(rng, 1)[:-1]}..." for _ in range(6)),
        "have a letter": clean + " " + " ".join(str(i) for i in range(300)),
        "stop words": " ".join(WORDS[:60]) + ".",
    }
    for why, text in trips.items():
        assert why in (check(text) or ""), (why, check(text))


def test_gopher_repetition_trips_on_each_rule(rng):
    check = GopherRepetition()
    assert check(clean_doc(rng, 12)) is None
    line = "Subscribe to our newsletter for the latest news."
    assert "lines repeated" in check("\n".join([line] * 4 + [clean_doc(rng, 1) for _ in range(4)]))
    para = clean_doc(rng, 2)
    assert "paragraphs" in check("\n\n".join([para, para, clean_doc(rng, 2), para]))
    assert "top 2-gram" in check(" ".join(["click here"] * 30 + [clean_doc(rng, 6)]))
    repeated = clean_doc(rng, 3)
    assert "duplicated 5-grams" in check(clean_doc(rng, 6) + " " + repeated + " " + repeated)


def test_c4_rules(rng):
    check = C4Rules()
    assert check(clean_doc(rng)) is None
    assert "lorem ipsum" in check(clean_doc(rng) + " Lorem ipsum dolor sit amet.")
    menu = "\n".join(["Home", "About us", "Products", "Contact", "Blog", "Careers", "Press", "Legal", "Help"])
    assert "end a sentence" in check(menu)


def test_badwords_ratio(rng):
    check = BadWords()
    clean = clean_doc(rng, 10)
    assert check(clean) is None
    assert check(clean + " Damn, what a porn site.") is None  # one listed word in ~100: under 1%
    assert check(clean + " porn xxx nude, porno!") is not None
    assert check.ratio("porn, and PORN.") == pytest.approx(2 / 3)


def test_language_id_offline_both_backends():
    for backend in ("fasttext", "langid"):
        ident = LanguageID(backend)
        assert ident("The weather was warm and the children played in the garden all afternoon.")[0] == "en"
        assert ident("오늘은 날씨가 좋아서 아이들이 오후 내내 정원에서 놀았습니다.")[0] == "ko"
        assert {"en", "ko"} <= ident.languages()
    assert len(LanguageID("fasttext").languages()) == 176  # lid.176


def test_minhash_one_word_changed_is_removed_different_kept(rng):
    hasher = MinHasher()
    a = clean_doc(rng, 10)
    words = a.split()
    words[len(words) // 2] = "zebra"
    near = " ".join(words)
    other, other2 = clean_doc(rng, 10), clean_doc(rng, 10)
    sigs = np.stack([hasher(t) for t in (a, other, near, other2)])
    dup = near_duplicates(lambda b: band_keys(sigs, b, 8), len(sigs))
    assert dup.tolist() == [False, False, True, False]


def test_kl_divergence_matches_scipy_and_flags_an_outlier(rng, tmp_path, tok):
    from scipy.stats import entropy

    tokens = np.array([1, 1, 2, 3, 3, 3, 2, 4], np.uint32)
    lengths = np.array([3, 5])
    corpus = np.bincount(tokens, minlength=6)
    q = corpus / corpus.sum()
    want = [entropy(np.bincount(tokens[:3], minlength=6) / 3, q), entropy(np.bincount(tokens[3:], minlength=6) / 5, q)]
    assert kl_divergence(tokens, lengths, corpus) == pytest.approx(want)

    docs = [clean_doc(rng) for _ in range(120)]
    outlier = "Das Verzeichnis enthält " + " ".join(
        "".join(random.Random(i).choices(string.ascii_uppercase + string.digits, k=12)) for i in range(30)) + "."
    # 120 documents (12k tokens) make a small corpus: the outlier's own tokens are a visible share of
    # it, so its KL is ~4 nats here against < 1 for the others (a big corpus pushes it past the default 5).
    report = run([write_jsonl(tmp_path / "in.jsonl", docs + [outlier])], tmp_path / "out", langid=False,
                 gopher_quality=None, gopher_repetition=None, c4=None, kl_threshold=2.0)
    assert report["removed"]["kl"] == 1
    assert decoded(tmp_path / "out", tok) == docs


def test_line_dedup_removes_boilerplate_lines(rng, tmp_path, tok):
    line = "Share this page with your friends and the family today."
    docs = [clean_doc(rng) + "\n" + line for _ in range(8)] + [line]
    off = {"gopher_quality": None, "gopher_repetition": None, "c4": None}  # let the lone line reach the stage
    report = run([write_jsonl(tmp_path / "in.jsonl", docs)], tmp_path / "out", line_dedup_threshold=6, **off)
    assert report["removed"]["line_dedup"] == 1  # the document that was only the line
    assert decoded(tmp_path / "out", tok) == [d.split("\n")[0] for d in docs[:8]]
    report = run([tmp_path / "in.jsonl"], tmp_path / "out2", line_dedup_threshold=9, **off)  # seen 9 times: kept
    assert report["removed"]["line_dedup"] == 0 and report["documents_out"] == 9


def test_exact_and_url_dedup(rng, tmp_path, tok):
    a, b, c = (clean_doc(rng) for _ in range(3))
    docs = [
        {"text": a},
        {"text": "  " + a.upper().replace(" ", "   ") + "\n"},  # same text but case and spaces: exact dup
        {"text": b, "url": "https://example.com/page", "date": "2024-01-01T00:00:00Z"},
        {"text": c, "url": "http://www.example.com/page/", "date": "2025-06-01T00:00:00Z"},  # newest: kept
    ]
    report = run([write_jsonl(tmp_path / "in.jsonl", docs)], tmp_path / "out")
    assert report["removed"]["exact_dedup"] == 1 and report["removed"]["url_dedup"] == 1
    assert decoded(tmp_path / "out", tok) == [a, c]


def test_quality_classifier_trained_and_used(rng, tmp_path, tok):
    good = [clean_doc(rng) for _ in range(40)]
    spam = [" ".join(rng.choice(("buy", "cheap", "pills", "casino", "win", "free", "bonus", "click", "now",
                                 "deal", "offer", "the", "of", "and")) for _ in range(80)) + "." for _ in range(40)]
    result = train_quality([write_jsonl(tmp_path / "good.jsonl", good)], [write_jsonl(tmp_path / "bad.jsonl", spam)],
                           tmp_path / "q.safetensors")
    assert result["holdout_accuracy"] == 1.0
    assert main(["data", "train-quality", "--positive", str(tmp_path / "good.jsonl"), "--negative",
                 str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "q2.safetensors")]) == 0
    test_good, test_spam = good[:5], spam[:5]
    report = run([write_jsonl(tmp_path / "mixed.jsonl", test_good + test_spam)], tmp_path / "out",
                 quality_model=str(tmp_path / "q.safetensors"), gopher_quality=None, gopher_repetition=None,
                 c4=None, minhash=False, langid=False, kl=False)
    assert report["removed"]["quality"] == 5
    assert decoded(tmp_path / "out", tok) == test_good
    (tmp_path / "evil.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle is not a model
    with pytest.raises(HerdError, match="quality model"):
        run([tmp_path / "mixed.jsonl"], tmp_path / "out3", quality_model=str(tmp_path / "evil.safetensors"))


def test_mix_by_source_gives_the_shares(rng, tmp_path, tok):
    web = [clean_doc(rng) for _ in range(60)]
    code = [{"text": clean_doc(rng, 6), "source": "code"} for _ in range(60)]
    write_jsonl(tmp_path / "web.jsonl", web)
    write_jsonl(tmp_path / "extra.jsonl", code)  # `source` fields name the group
    report = run([tmp_path / "web.jsonl", tmp_path / "extra.jsonl"], tmp_path / "out", mix="code=0.2")
    kept = decoded(tmp_path / "out", tok)
    code_texts = {d["text"] for d in code}
    code_tokens = sum(len(tok.encode(t)) for t in kept if t in code_texts)
    assert report["removed"]["mix"] > 0
    assert code_tokens / report["tokens_out"] == pytest.approx(0.2, abs=0.05)
    assert sum(t not in code_texts for t in kept) == 60  # web is the scarce group: all of it kept
    with pytest.raises(HerdError, match="no documents of 'ko'"):
        run([tmp_path / "web.jsonl"], tmp_path / "out2", mix="ko=0.1")
    with pytest.raises(HerdError, match="--mix"):
        run([tmp_path / "web.jsonl"], tmp_path / "out3", mix="code:0.1")


# --- the whole run: counts, shards, resume, bad input ----------------------------------------------

def corpus(rng, root):
    """A folder with every kind of document: clean, filtered, duplicated, unreadable."""
    root.mkdir()
    clean = [clean_doc(rng) for _ in range(12)]
    near = clean[0].split()
    near[5] = "zebra"
    lines = [{"text": t, "url": f"https://site.org/{i}"} for i, t in enumerate(clean[:8])]
    lines += [{"text": clean[1]}, {"text": " ".join(near)}, {"text": "This page is far too short to keep in a corpus."},
              {"text": "오늘은 날씨가 좋아서 아이들이 오후 내내 정원에서 놀았습니다. " * 8}, {"no_text": 1}]
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for obj in lines:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.write("{not json\n")
    with open(root / "a.jsonl", "ab") as f:
        f.write(b'{"text": "broken \xff\xfe utf-8"}\n')
        f.write(b'{"text": "a lone surrogate \\ud800 in JSON"}\n')
    for i, t in enumerate(clean[8:]):
        (root / f"doc{i}.txt").write_text(t + "\r\n\r\n")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(100))
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return [normalize_text(t) for t in clean]


def test_report_counts_add_up_and_shards_decode_exactly(rng, tmp_path, tok, capsys):
    clean = corpus(rng, tmp_path / "in")
    report = run([tmp_path / "in"], tmp_path / "out", lang=("en",))
    removed = report["removed"]
    assert report["documents_in"] == report["documents_out"] + sum(removed.values())
    assert {k: v for k, v in removed.items() if v} == {
        "binary": 1, "invalid_utf8": 3, "bad_json": 2, "language": 1, "gopher_quality": 1, "exact_dedup": 1,
        "minhash": 1}, removed
    assert decoded(tmp_path / "out", tok) == clean  # the kept documents, in corpus order, exactly
    (tokens, ends), = open_shards(tmp_path / "out")
    assert tokens.dtype == np.uint32 and ends[-1] == len(tokens) == report["tokens_out"]
    assert np.diff(np.concatenate([[0], ends])).tolist() == [len(tok.encode(t)) for t in clean]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["documents_out"] == len(clean)
    assert not (tmp_path / "out" / ".work").exists()


def test_resume_equals_uninterrupted(rng, tmp_path, monkeypatch):
    from llamaherd.data import pipeline

    root = tmp_path / "in"
    root.mkdir()
    for i in range(4):
        write_jsonl(root / f"part{i}.jsonl", [clean_doc(rng) for _ in range(6)])
    whole = run([root], tmp_path / "whole", shard_tokens=400)

    for phase in ("_scan_unit", "_tokenize_unit"):
        real, calls = getattr(pipeline, phase), []

        def stop_after_two(*args, real=real, calls=calls):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(args)
            return real(*args)

        out = tmp_path / f"stopped_in{phase}"
        monkeypatch.setattr(pipeline, phase, stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            run([root], out, shard_tokens=400)
        monkeypatch.setattr(pipeline, phase, real)
        resumed = run([root], out, shard_tokens=400)
        assert resumed == whole
        assert len(whole["shards"]) > 1
        for shard in whole["shards"]:
            for name in (shard["tokens"], shard["index"]):
                assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert run([root], tmp_path / "whole", shard_tokens=400) == whole  # a finished run is not redone


def test_bad_input_is_counted_or_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    report = run([tmp_path / "empty"], tmp_path / "out")
    assert (report["documents_in"], report["documents_out"], report["tokens_out"], report["shards"]) == (0, 0, 0, [])
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    report = run([tmp_path / "blob.bin"], tmp_path / "out2")
    assert report["removed"]["binary"] == 1 and report["documents_out"] == 0
    for argv, message in [
        ([str(tmp_path / "empty"), "--lang", "en,zz"], "unknown language code 'zz'"),
        ([str(tmp_path / "missing")], "no such file or folder"),
        ([str(tmp_path / "empty"), "--mix", "web"], "--mix wants NAME=SHARE"),
        ([str(tmp_path / "empty"), "--tokenizer", str(tmp_path / "empty")], "no tokenizer found"),
        ([str(tmp_path / "empty"), "--badwords", str(tmp_path / "nope.txt")], "cannot read the bad-word list"),
        ([str(tmp_path / "empty"), "--quality", str(tmp_path / "nope.safetensors")], "cannot read the quality model"),
    ]:
        assert main(["data", "prepare", *argv, "--out", str(tmp_path / "cli"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_cli_prints_the_table(rng, tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [clean_doc(rng) for _ in range(3)] + ["Too short."])
    assert main(["data", "prepare", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--quiet",
                 "--workers", "1", "--no-minhash", "--json"]) == 0
    out = capsys.readouterr().out
    assert "documents in" in out and "gopher_quality" in out and "documents out" in out
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["documents_in"] == 4 and counts["documents_out"] == 3 and counts["removed"]["minhash"] == 0


@pytest.mark.slow
def test_workers_give_the_same_shards(rng, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        write_jsonl(root / f"part{i}.jsonl", [clean_doc(rng) for _ in range(5)] + ["Too short."])
    one = run([root], tmp_path / "one")
    two = prepare([str(root)], tmp_path / "two", PrepareConfig(chunk_bytes=2000), workers=2, progress=False)
    assert two["removed"] == one["removed"] and two["documents_out"] == one["documents_out"]
    assert (tmp_path / "one" / "shard_00000.bin").read_bytes() == (tmp_path / "two" / "shard_00000.bin").read_bytes()


@pytest.mark.integration
@pytest.mark.slow
def test_a_models_tokenizer(rng, tmp_path, smollm2_path, smollm2):
    docs = [clean_doc(rng) for _ in range(3)]
    report = run([write_jsonl(tmp_path / "in.jsonl", docs)], tmp_path / "out", tokenizer=str(smollm2_path))
    assert report["tokenizer"]["vocab_size"] == smollm2.n_words
    assert [smollm2.decode(t.tolist()) for t in iter_documents(tmp_path / "out")] == docs
