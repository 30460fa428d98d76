"""The code shield: find the code in a reply and report insecure patterns in it.

    findings = scan_code(reply)                 # fenced blocks found, languages detected
    findings = scan_code(source, "python")      # the text is code in that language
    for f in findings: print(f)                 # "12: block CWE-78 os.system with ... [regex:shell-injection]"

Three analysers, each optional but the first:
- our regex rules (`code_rules`), every language, microseconds per block;
- Bandit for Python (`pip install llamaherd[codeshield]`), in-process, when installed;
- Semgrep with our rules (`semgrep_rules/`) for C/C++, JavaScript, Java, PHP, Go, Rust and shell,
  when the `semgrep` command is installed (or HERD_SEMGREP names it) and the caller asks for it:
  it starts a process per scan (about a second), too slow for every reply. The files are passed
  by path (no `--project-root`: with current Semgrep, CodeShield 1.0.1's `--project-root /`
  makes it scan nothing).

Findings on the same line with the same CWE are reported once (the first analyser's: the regex
rules run first).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import HerdError
from .code_rules import rules_for

SEVERITIES = ("block", "warn", "advice")
# CWEs that name one weakness for deduplication: Bandit calls a weak hash CWE-327, we CWE-328.
SAME_AS = {"CWE-327": "CWE-328"}
# CWEs that are exploitable as written when an analyser (Bandit, Semgrep) is confident: blocked.
BLOCK_CWES = {"CWE-78", "CWE-89", "CWE-94", "CWE-95", "CWE-502", "CWE-295", "CWE-242", "CWE-1336", "CWE-798"}

ALIASES = {
    "py": "python", "python3": "python", "py3": "python", "python": "python",
    "js": "javascript", "jsx": "javascript", "ts": "javascript", "tsx": "javascript", "typescript": "javascript",
    "node": "javascript", "javascript": "javascript", "mjs": "javascript",
    "c": "c", "h": "c", "cpp": "cpp", "c++": "cpp", "cc": "cpp", "cxx": "cpp", "hpp": "cpp",
    "cs": "csharp", "csharp": "csharp", "c#": "csharp", "java": "java", "kt": "kotlin", "kotlin": "kotlin",
    "php": "php", "sh": "shell", "bash": "shell", "zsh": "shell", "shell": "shell", "console": "shell",
    "shell-session": "shell", "go": "go", "golang": "go", "rs": "rust", "rust": "rust", "rb": "ruby",
    "ruby": "ruby", "sql": "sql", "text": "text", "plaintext": "text", "txt": "text",
}
EXTENSIONS = {"python": ".py", "javascript": ".js", "c": ".c", "cpp": ".cpp", "csharp": ".cs", "java": ".java",
              "kotlin": ".kt", "php": ".php", "shell": ".sh", "go": ".go", "rust": ".rs", "ruby": ".rb", "sql": ".sql",
              "text": ".txt"}

# Signs of each language (pattern, weight); the best total wins, none at all: "text".
_SIGNS = {
    "python": [(r"^\s*def \w+\(.*\)\s*(->.*)?:\s*$", 3), (r"^\s*(import \w+|from [\w.]+ import )", 3),
               (r"^\s*(if|for|while|with|elif|else|try|except).*:\s*$", 1), (r"\bself\.", 1), (r"\bprint\(", 1),
               (r"^\s*class \w+(\(.*\))?:\s*$", 3)],
    "javascript": [(r"\b(const|let|var)\s+[\w${}\[\], ]+\s*=", 2), (r"=>", 1), (r"\bfunction\s*\w*\s*\(", 2),
                   (r"\brequire\(['\"]", 3), (r"\bconsole\.log\(", 3), (r"\bdocument\.", 2), (r"\bmodule\.exports\b", 3),
                   (r"^\s*import .* from ['\"]", 3)],
    "java": [(r"\bpublic\s+(static\s+)?(final\s+)?(class|void|interface)\b", 4), (r"\bSystem\.out\.print", 4),
             (r"^\s*import java\.", 5), (r"\bnew \w+\(.*\);", 1), (r"\bString\[\]", 2)],
    "c": [(r"^\s*#include\s*[<\"]", 4), (r"\bint main\s*\(", 3), (r"\bprintf\s*\(", 1), (r"\bchar\s*\*?\s*\w+\s*\[", 2),
          (r"\bmalloc\s*\(", 2)],
    "cpp": [(r"\bstd::", 4), (r"#include\s*<(iostream|string|vector)>", 4), (r"\bcout\s*<<", 4)],
    "php": [(r"<\?php", 8), (r"\$\w+\s*=", 2), (r"\becho\s", 1), (r"\$_(GET|POST|REQUEST)", 4)],
    "shell": [(r"^#!\s*/(usr/)?bin/(env\s+)?(ba|z)?sh", 8), (r"^\s*(sudo|apt-get|apt|yum|brew|curl|wget|export|chmod|cd|mkdir|rm)\s", 2),
              (r"^\s*(fi|done|esac)\s*$", 3), (r"\$\{?\w+\}?", 1), (r"^\s*\w+=\S", 1)],
    "go": [(r"^\s*package \w+", 5), (r"\bfunc\s+(\(\w+ \*?\w+\)\s*)?\w+\(", 4), (r":=", 1), (r"\bfmt\.", 3)],
    "rust": [(r"\bfn\s+\w+\s*\(", 3), (r"\blet\s+mut\b", 3), (r"\w+!\(", 1), (r"^\s*use\s+\w+::", 3), (r"\bimpl\b", 2)],
    "ruby": [(r"^\s*def \w+[^:]*$", 2), (r"^\s*end\s*$", 2), (r"\bputs\s", 3), (r"^\s*require ['\"]", 2), (r"#\{", 1)],
    "csharp": [(r"^\s*using System", 5), (r"\bnamespace\s+\w+", 2), (r"\bConsole\.Write", 4), (r"\bvar\s+\w+\s*=\s*new\b", 2)],
    "kotlin": [(r"\bfun\s+\w+\s*\(", 3), (r"^\s*val\s+\w+", 2)],
    "sql": [(r"(?i)^\s*(SELECT\s.+\sFROM|INSERT\s+INTO|CREATE\s+TABLE|UPDATE\s+\w+\s+SET|DELETE\s+FROM)\b", 4)],
}
_SIGNS_RE = {lang: [(re.compile(p, re.MULTILINE), w) for p, w in signs] for lang, signs in _SIGNS.items()}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)\n", re.MULTILINE)


@dataclass(frozen=True)
class Finding:
    """One insecure pattern: where (line in the scanned text, 1-based), what (CWE, rule), how bad."""

    line: int
    cwe: str
    severity: str  # block | warn | advice
    rule: str
    message: str
    language: str
    analyzer: str  # regex | bandit | semgrep

    def __str__(self) -> str:
        return f"{self.line}: {self.severity} {self.cwe} {self.message} [{self.analyzer}:{self.rule}]"

    def as_dict(self) -> dict:
        return {"line": self.line, "cwe": self.cwe, "severity": self.severity, "rule": self.rule,
                "message": self.message, "language": self.language, "analyzer": self.analyzer}


@dataclass(frozen=True)
class CodeBlock:
    """Code found in a reply: its language, text, and the reply line its first line is on."""

    language: str
    code: str
    first_line: int
    start: int = 0  # character offsets of the whole block in the reply (fences included)
    end: int = 0


def normalize_language(name: str | None) -> str | None:
    """A language name or alias as the rules know it ("py" -> "python"); None when unknown."""
    if not name:
        return None
    return ALIASES.get(name.strip().lower().split()[0].lstrip("{.").rstrip("}"))


def detect_language(code: str) -> str:
    """The most likely language of a snippet by the signs of each (a shebang, `#include`, `def f():`,
    `<?php` ...); "text" when nothing looks like code."""
    best, score = "text", 0
    for lang, signs in _SIGNS_RE.items():
        s = sum(w for pattern, w in signs if pattern.search(code))
        if s > score:
            best, score = lang, s
    if best == "c" and any(p.search(code) for p, _ in _SIGNS_RE["cpp"]):
        best = "cpp"
    return best if score >= 2 else "text"


def extract_blocks(text: str) -> list[CodeBlock]:
    """Fenced code blocks (``` or ~~~, with an optional language) of a Markdown reply; an unclosed
    fence runs to the end (a reply cut short). No fence: the whole text, if it looks like code."""
    blocks, pos = [], 0
    while (m := _FENCE.search(text, pos)) is not None:
        fence = m["fence"]
        close = re.compile(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}[ \t]*$", re.MULTILINE).search(text, m.end())
        code_end = close.start() if close else len(text)
        end = close.end() if close else len(text)
        code = text[m.end():code_end]
        first_line = text.count("\n", 0, m.end()) + 1
        lang = normalize_language(m["info"]) or detect_language(code)
        blocks.append(CodeBlock(lang, code, first_line, m.start(), end))
        pos = end
    if not blocks:
        lang = detect_language(text)
        if lang != "text":
            blocks.append(CodeBlock(lang, text, 1, 0, len(text)))
    return blocks


# -- analysers -------------------------------------------------------------------------------


def _regex(block: CodeBlock) -> list[Finding]:
    out = []
    lines = block.code.split("\n")
    rules = rules_for(block.language)
    for i, line in enumerate(lines):
        if len(line) > 2000:  # minified or data: regexes would be slow and meaningless
            continue
        for rule in rules:
            if rule.pattern.search(line):
                out.append(Finding(block.first_line + i, rule.cwe, rule.severity, rule.id, rule.message,
                                   block.language, "regex"))
    return out


def bandit_available() -> bool:
    try:
        import bandit  # noqa: F401
    except ImportError:
        return False
    return True


# Bandit checks that are noise for a reply (an assert, importing subprocess, a list-form call).
_BANDIT_SKIP = {"B101", "B110", "B112", "B113", "B404", "B603", "B607", "B311"}


def _bandit(block: CodeBlock) -> list[Finding]:
    from bandit.core import config as b_config, manager as b_manager

    logging.getLogger("bandit").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="herd-scan-") as tmp:
        path = Path(tmp) / "snippet.py"
        path.write_text(block.code, encoding="utf-8")
        mgr = b_manager.BanditManager(b_config.BanditConfig(), "file", quiet=True)
        mgr.discover_files([str(path)])
        mgr.run_tests()
        issues = mgr.get_issue_list()
    out = []
    for issue in issues:
        if issue.test_id in _BANDIT_SKIP or issue.severity == "LOW":
            continue
        cwe = f"CWE-{issue.cwe.id}" if getattr(issue, "cwe", None) and issue.cwe.id else "CWE-unknown"
        severity = "block" if cwe in BLOCK_CWES and issue.confidence != "LOW" else "warn"
        out.append(Finding(block.first_line + issue.lineno - 1, cwe, severity, issue.test_id, issue.text.strip(),
                           "python", "bandit"))
    return out


def semgrep_command() -> str | None:
    """The semgrep executable: HERD_SEMGREP, else `semgrep` on PATH; None when absent."""
    from .. import settings

    return settings.semgrep() or shutil.which("semgrep")


SEMGREP_RULES = Path(__file__).with_name("semgrep_rules")
_SEMGREP_SEVERITY = {"ERROR": "block", "WARNING": "warn", "INFO": "advice"}


def _semgrep(blocks: list[CodeBlock], command: str) -> list[Finding]:
    """One Semgrep run over all the blocks (a file each), our rules, files given by path."""
    if not blocks:
        return []
    out = []
    with tempfile.TemporaryDirectory(prefix="herd-semgrep-") as tmp:
        files = {}
        for i, b in enumerate(blocks):
            path = Path(tmp) / f"block{i}{EXTENSIONS.get(b.language, '.txt')}"
            path.write_text(b.code, encoding="utf-8")
            files[str(path)] = b
        try:
            proc = subprocess.run([command, "scan", "--config", str(SEMGREP_RULES), "--json", "--metrics=off",
                                   "--disable-version-check", "--quiet", "--timeout", "20", *files],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise HerdError(f"semgrep failed to run: {e}") from None
        try:
            results = json.loads(proc.stdout)["results"]
        except (ValueError, KeyError):
            raise HerdError(f"semgrep failed: {(proc.stderr or proc.stdout).strip()[:300]}") from None
    for r in results:
        b = files.get(r["path"]) or files.get(str(Path(r["path"]).resolve()))
        if b is None:
            continue
        meta = r["extra"].get("metadata", {})
        out.append(Finding(b.first_line + r["start"]["line"] - 1, meta.get("cwe_id", "CWE-unknown"),
                           _SEMGREP_SEVERITY.get(r["extra"].get("severity", "WARNING"), "warn"),
                           r["check_id"].rsplit(".", 1)[-1], r["extra"].get("message", "").strip(), b.language,
                           "semgrep"))
    return out


def scan_code(text: str, language: str | None = None, *, bandit: bool | None = None,
              semgrep: bool = False) -> list[Finding]:
    """Report insecure patterns in the code of `text`.

    Args:
        text: a reply (Markdown with fenced code blocks) or, with `language`, source code.
        language: the code's language ("python", "c", "js", ...); None: find the fenced blocks
            of a reply and detect each one's language ("auto" is the same).
        bandit: run Bandit on Python code (default: when it is installed).
        semgrep: run Semgrep with our rules (needs the `semgrep` command).
    Returns:
        Findings sorted by line; severity "block" means the code should not be shown as is.
    Raises:
        HerdError: an unknown language, or `semgrep=True` without semgrep.
    """
    if language and language != "auto":
        lang = normalize_language(language)
        if lang is None:
            raise HerdError(f"unknown language {language!r}: use one of {', '.join(sorted(set(ALIASES.values())))}")
        blocks = [CodeBlock(lang, text, 1, 0, len(text))]
    else:
        blocks = extract_blocks(text)
    findings: list[Finding] = []
    for b in blocks:
        findings += _regex(b)
    if bandit is None:
        bandit = bandit_available()
    if bandit:
        for b in blocks:
            if b.language == "python":
                try:
                    findings += _bandit(b)
                except SyntaxError:
                    pass  # Bandit cannot parse it (a fragment): the regex rules still ran
    if semgrep:
        command = semgrep_command()
        if command is None:
            raise HerdError("semgrep is not installed (pip install semgrep, or set HERD_SEMGREP)")
        findings += _semgrep([b for b in blocks if b.language not in ("text", "sql")], command)
    seen, unique = set(), []
    for f in findings:
        key = (f.line, SAME_AS.get(f.cwe, f.cwe))
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return sorted(unique, key=lambda f: (f.line, SEVERITIES.index(f.severity)))


def worst(findings: list[Finding]) -> str | None:
    """The most severe level among findings ("block" > "warn" > "advice"), None for none."""
    levels = [SEVERITIES.index(f.severity) for f in findings]
    return SEVERITIES[min(levels)] if levels else None
