"""The offline demo guard's data: labelled rows in both languages and across categories, rendered as
`herd train sft` chat records in the guard prompt, and the metrics used to report it."""

import json
from pathlib import Path

from llamaherd.safety.demo import build, metrics, read_labelled
from llamaherd.safety.llama_guard import parse_output, prompt_body, default_policy

DEMO = Path(__file__).resolve().parents[1] / "examples" / "guard-demo"


def test_labelled_set_covers_languages_roles_and_categories():
    rows = read_labelled(DEMO / "labelled.jsonl")
    assert len(rows) >= 50 and (DEMO / "LICENSE").is_file()
    assert {r["lang"] for r in rows} == {"en", "ko"} and {r["role"] for r in rows} == {"user", "agent"}
    assert {r["split"] for r in rows} == {"train", "test"}
    unsafe = [r for r in rows if r["label"] == "unsafe"]
    assert 0.35 < len(unsafe) / len(rows) < 0.65
    assert len({c for r in unsafe for c in r["categories"]}) >= 10
    test = [r for r in rows if r["split"] == "test"]
    assert any(r["label"] == "unsafe" for r in test) and any(r["label"] == "safe" for r in test)


def test_build_writes_sft_records_in_the_guard_prompt(tmp_path):
    (tmp_path / "labelled.jsonl").write_text((DEMO / "labelled.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    counts = build(tmp_path)
    rows = read_labelled(DEMO / "labelled.jsonl")
    assert counts == {"train": sum(r["split"] == "train" for r in rows), "test": sum(r["split"] == "test" for r in rows)}
    records = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    policy = default_policy("chat")
    for rec, row in zip(records, [r for r in rows if r["split"] == "train"]):
        user, assistant = rec["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        conv = [{"role": "user", "content": row["prompt"]}] + (
            [{"role": "assistant", "content": row["response"]}] if row["role"] == "agent" else [])
        assert user["content"] == prompt_body(conv, policy)
        parsed = parse_output(assistant["content"])  # every target is a well-formed answer
        assert parsed.label == row["label"] and parsed.categories == row["categories"]


def test_metrics():
    m = metrics([True, True, False, False], [True, False, True, False])
    assert (m["precision"], m["recall"], m["f1"], m["n"]) == (0.5, 0.5, 0.5, 4)
    assert metrics([False], [False])["f1"] == 0.0
