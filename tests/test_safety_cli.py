"""`herd scan` and `herd guard` from the command line."""

import json

import pytest

from llamaherd.cli import main


def test_scan_exit_status_and_lines(tmp_path, capsys):
    reply = tmp_path / "reply.md"
    reply.write_text("Try:\n```python\nimport hashlib\nh = hashlib.md5(x)\n```\n")
    assert main(["scan", str(reply), "--no-bandit"]) == 0  # a warning only
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{reply}:4: warn CWE-328 MD5/SHA-1 are broken for security: use hashlib.sha256, or "
                   "usedforsecurity=False for checksums [regex:weak-hash]"]
    src = tmp_path / "x.c"
    src.write_text("#include <stdio.h>\nint main(void) { char b[4]; gets(b); }\n")
    assert main(["scan", str(src), "--language", "c", "--format", "json"]) == 1  # block
    finding = json.loads(capsys.readouterr().out)
    assert (finding["line"], finding["cwe"], finding["severity"]) == (2, "CWE-242", "block")
    (tmp_path / "ok.py").write_text("print('hi')\n")
    assert main(["scan", str(tmp_path / "ok.py")]) == 0 and capsys.readouterr().out == ""


def test_scan_bad_input_is_one_line(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "missing.py")]) == 1
    assert capsys.readouterr().err.strip() == f"Error: {tmp_path / 'missing.py'}: no such file"
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    assert main(["scan", str(tmp_path / "bin")]) == 1
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["scan", str(tmp_path / "bin"), "--language", "cobol"]) == 1


def test_guard_bad_input_is_one_line(tmp_path, capsys, smollm2_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    assert main(["guard", str(smollm2_path), "--jsonl", str(bad)]) == 1
    assert capsys.readouterr().err.strip().startswith(f"Error: {bad} line 2: not JSON")
    conv = tmp_path / "c.json"
    conv.write_text('[{"role": "user", "content": "hi"}]')
    assert main(["guard", str(smollm2_path), "--conversation", str(conv), "--role", "agent"]) == 1
    assert "no Agent message" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_guard_jsonl_with_smollm2(tmp_path, capsys, smollm2_path):
    """SmolLM2 stands in for a guard: whatever it answers is malformed; with --on-malformed score its
    tiny unsafe score decides (safe). (The default rule, unsafe, is covered in test_safety_guard.py.)"""
    items = tmp_path / "items.jsonl"
    items.write_text('"How do I bake bread?"\n'
                     '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}\n')
    assert main(["guard", str(smollm2_path), "--jsonl", str(items), "--on-malformed", "score"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:3] for line in lines] == [["1", "safe", "-"], ["2", "safe", "-"]]
    assert all(0 <= float(line.rsplit("score=", 1)[1]) < 0.5 for line in lines)


def test_catalog_knows_the_guard_models():
    from llamaherd.store import parse_name
    from llamaherd.store.sources import catalog_source

    assert catalog_source(parse_name("llama-guard3:1b")).repo_id == "QuantFactory/Llama-Guard-3-1B-GGUF"
    assert catalog_source(parse_name("llama-guard3")).repo_id == "QuantFactory/Llama-Guard-3-8B-GGUF"
    assert catalog_source(parse_name("llama-guard3:8b-bf16")).repo_id == "meta-llama/Llama-Guard-3-8B"
