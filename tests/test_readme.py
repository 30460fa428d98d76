"""The README can be followed as written: its code blocks marked `<!-- runnable -->` run here, in
order, offline, with `herd` on the PATH as `source .venv/bin/activate` puts it there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from browser_notice import skipped_browser_tests

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^<!-- runnable.*?-->\n```(\w+)\n(.*?)^```", re.S | re.M)


def runnable_blocks() -> list[tuple[str, str]]:
    """(language, code) of each block marked runnable, in the README's order."""
    return BLOCK.findall(README.read_text())


def test_the_readme_marks_its_examples_runnable():
    languages = [lang for lang, _ in runnable_blocks()]
    assert languages.count("bash") >= 2 and "python" in languages
    assert "smollm2:135m" in runnable_blocks()[0][1]


@pytest.mark.integration
@pytest.mark.slow
def test_readme_blocks_run_as_written(tmp_path, smollm2_path):
    """Each runnable block, in a fresh folder and store. The default model's file is put in the store
    first (as `herd create` does) so that `herd pull smollm2:135m` only verifies it and writes the
    manifest: the test needs no network (PIP_NO_INDEX)."""
    from llamaherd.store import Store

    home, bin_dir, work = tmp_path / "home", tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    Store(home).create("cached-file", f"FROM {smollm2_path}")
    herd = bin_dir / "herd"  # what .venv/bin/herd is: this Python's llamaherd
    herd.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llamaherd "$@"\n')
    herd.chmod(0o755)
    env = {**os.environ, "HERD_HOME": str(home), "PIP_NO_INDEX": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    outputs = []
    for lang, code in runnable_blocks():
        command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README block failed:\n{code}\n--- stderr:\n{proc.stderr[-2000:]}"
        outputs.append(proc.stdout)
    assert "Paris" in outputs[0]
    assert "[9906, 1917]" in outputs[-1]  # the Python block's last line


def test_make_test_banner_names_skipped_browser_tests():
    class Report:
        def __init__(self, nodeid, reason):
            self.nodeid, self.location, self.longrepr = nodeid, (nodeid.split("::")[0], 0, ""), ("f", 1, reason)

    reports = [Report("tests/test_ui.py::test_chat", "Skipped: no Chromium"), Report("tests/test_x.py::t", "other")]
    assert skipped_browser_tests(reports) == ["Skipped: no Chromium"]
