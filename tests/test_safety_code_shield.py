"""The code shield: blocks and languages found in a reply, findings with CWE/line/severity, and the
precision and recall of the rules on a table of insecure and safe snippets across languages."""

import pytest

from llamaherd.errors import HerdError
from llamaherd.safety.code_shield import (bandit_available, detect_language, extract_blocks, scan_code,
                                          semgrep_command, worst)
from code_shield_snippets import SNIPPETS

# Floors for the regex rules alone on SNIPPETS (measured: see the assertion messages). The table
# has cross-line data flow cases that a line regex cannot see, so recall is below 1 by design.
PRECISION_FLOOR, RECALL_FLOOR = 0.9, 0.85


def score_table(scan) -> tuple[float, float, list]:
    """Snippet-level precision and recall: an insecure snippet is found when a block/warn finding
    has its CWE; a false positive is a block/warn finding on a safe snippet or with the wrong CWE only."""
    tp = fp = fn = 0
    misses = []
    for lang, code, expected in SNIPPETS:
        cwes = {f.cwe for f in scan(code, lang) if f.severity in ("block", "warn")}
        if expected is None:
            if cwes:
                fp += 1
                misses.append(("false positive", lang, code, cwes))
        elif expected in cwes:
            tp += 1
        else:
            fn += 1
            if cwes:
                fp += 1
            misses.append(("missed", lang, code, cwes))
    return tp / max(tp + fp, 1), tp / (tp + fn), misses


def test_the_table_is_big_and_mixed():
    assert len(SNIPPETS) >= 60
    assert len({lang for lang, _, _ in SNIPPETS}) >= 10
    assert sum(e is None for _, _, e in SNIPPETS) >= 25


def test_regex_rules_precision_and_recall_on_the_table():
    precision, recall, misses = score_table(lambda code, lang: scan_code(code, lang, bandit=False))
    assert precision >= PRECISION_FLOOR, (precision, misses)
    assert recall >= RECALL_FLOOR, (recall, misses)


@pytest.mark.skipif(not bandit_available(), reason="bandit is an optional extra (pip install llamaherd[codeshield])")
def test_with_bandit_precision_and_recall_on_the_table():
    precision, recall, misses = score_table(lambda code, lang: scan_code(code, lang, bandit=True))
    assert precision >= PRECISION_FLOOR, (precision, misses)
    assert recall >= RECALL_FLOOR, (recall, misses)
    # Bandit follows the data across lines where a line regex cannot.
    f = scan_code("import subprocess\ncmd = 'tar xf ' + archive\nsubprocess.Popen(cmd, shell=True)\n", "python",
                  bandit=True)
    assert any(x.cwe == "CWE-78" and x.line == 3 for x in f)


def test_findings_in_a_markdown_reply_have_reply_line_numbers():
    reply = ("Sure, here is a script:\n\n```py\nimport os\nos.system('ping ' + host)\n```\n\nAnd in C:\n\n"
             "~~~\n#include <stdio.h>\nint main(void) { char b[8]; gets(b); }\n~~~\n")
    blocks = extract_blocks(reply)
    assert [(b.language, b.first_line) for b in blocks] == [("python", 4), ("c", 11)]
    findings = scan_code(reply, bandit=False)
    assert [(f.line, f.cwe, f.severity) for f in findings] == [(5, "CWE-78", "block"), (12, "CWE-242", "block")]
    assert str(findings[0]).startswith("5: block CWE-78 ") and findings[0].analyzer == "regex"
    assert worst(findings) == "block" and worst([]) is None


def test_unclosed_fence_and_plain_code_and_prose():
    assert extract_blocks("```python\nimport pickle\npickle.loads(x)")[0].code.endswith("pickle.loads(x)")
    assert scan_code("import pickle\npickle.loads(data)\n", bandit=False)[0].cwe == "CWE-502"  # no fence: detected
    assert scan_code("The md5 of a file is a checksum; gets you nowhere.", bandit=False) == []
    assert extract_blocks("Just words, no code here.") == []


@pytest.mark.parametrize("code,lang", [
    ("#!/bin/bash\necho hi\n", "shell"), ("<?php echo 1;", "php"), ("package main\nfunc main() {}\n", "go"),
    ("#include <stdio.h>\nint main(void) { return 0; }\n", "c"), ("#include <iostream>\nint main() { std::cout << 1; }", "cpp"),
    ("def f(x):\n    return x\n", "python"), ("const x = require('fs');\nconsole.log(x);\n", "javascript"),
    ("public class A { public static void main(String[] a) { System.out.println(1); } }", "java"),
    ("fn main() {\n    let mut x = 1;\n    println!(\"{}\", x);\n}\n", "rust"),
    ("using System;\nConsole.WriteLine(1);\n", "csharp"), ("SELECT name FROM users WHERE id = 1;", "sql"),
])
def test_detect_language(code, lang):
    assert detect_language(code) == lang


def test_unknown_language_is_an_error():
    with pytest.raises(HerdError, match="unknown language"):
        scan_code("x", "cobol")


@pytest.mark.skipif(semgrep_command() is None, reason="semgrep is optional (pip install semgrep or HERD_SEMGREP)")
@pytest.mark.slow
def test_semgrep_rules_find_what_the_line_regex_cannot():
    """Our Semgrep rules run on the files by path (CodeShield 1.0.1's --project-root makes current
    Semgrep scan nothing): a memcpy sized by its source, which no line regex of ours matches."""
    reply = ("```js\nconst cp = require('child_process');\nconst cmd = 'git clone ' + url;\ncp.execSync(cmd);\n```\n"
             "```c\n#include <string.h>\nvoid f(char *d, char *s) {\n    memcpy(d, s, strlen(s));\n}\n```\n")
    findings = scan_code(reply, bandit=False, semgrep=True)
    assert (9, "CWE-120", "semgrep") in [(f.line, f.cwe, f.analyzer) for f in findings]
    assert (4, "CWE-78") in [(f.line, f.cwe) for f in findings]  # the regex's, reported once
