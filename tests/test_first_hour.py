"""A newcomer's first hour, against `ollama run`: the default model's first answer, the interactive
chat's commands in a real terminal (pty), `herd --version`, `herd ps`, and the errors a new user meets."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys

import pytest

from test_cli import _read_until, assert_clean_error, herd

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(tmp_path_factory, smollm2_path):
    """A store holding the default model as `herd pull smollm2:135m` stores it. The GGUF is already a
    blob (created from the cached file), so the pull checks its digest and writes the manifest with
    no download (PIP_NO_INDEX: it could not reach PyPI if it tried)."""
    from llamaherd.store import Store

    home = tmp_path_factory.mktemp("home")
    Store(home).create("cached", f"FROM {smollm2_path}")
    pulled = herd("pull", "smollm2:135m", env={"HERD_HOME": str(home), "PIP_NO_INDEX": "1"})
    assert pulled.returncode == 0, pulled.stderr
    return home


def test_the_default_model_carries_its_authors_sampling_defaults(home):
    env = {"HERD_HOME": str(home)}
    shown = herd("show", "smollm2:135m", env=env)
    assert shown.returncode == 0, shown.stderr
    params = dict(line.split() for line in herd("show", "smollm2:135m", "--parameters", env=env).stdout.splitlines())
    assert params == {"temperature": "0.2", "top_p": "0.9"}  # the SmolLM2 model card's example
    assert re.search(r"Parameters\n\s+temperature\s+0.2\n\s+top_p\s+0.9", shown.stdout)
    answer = herd("run", "smollm2:135m", "What is the capital of France?", "--seed", "1", env=env)
    assert answer.returncode == 0 and "Paris" in answer.stdout, answer.stdout + answer.stderr


def test_load_takes_a_store_name_from_python(home, monkeypatch):
    import llamaherd

    monkeypatch.setenv("HERD_HOME", str(home))
    llm = llamaherd.load("smollm2:135m")
    assert "Paris" in "".join(llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                                       temperature=0, num_predict=16))
    with pytest.raises(llamaherd.HerdError, match="not in the store .* nor in the catalog"):
        llamaherd.load("nosuchmodel")


def test_version_and_a_missing_model_say_the_right_thing_the_first_time(tmp_path):
    from llamaherd import __version__

    proc = herd("--version")
    assert proc.returncode == 0 and proc.stdout == f"herd version {__version__}\n"
    missing = herd("run", "nosuchmodel", "hi", env={"HERD_HOME": str(tmp_path)})
    assert_clean_error(missing, "model 'nosuchmodel' not found", "nor in the catalog", "smollm2:135m")
    assert "herd pull" not in missing.stderr
    assert not (tmp_path / "partial").exists() and not (tmp_path / "locks").exists()


def _chat(args, env=None):
    """`herd run ARGS` in a terminal of its own (a pty), started as a shell starts it: Ctrl-C at its
    default (a suite run as a background job hands its children SIGINT ignored, and Python then
    keeps it ignored)."""
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "run", *map(str, args)], stdin=child, stdout=child,
                            stderr=child, close_fds=True, env={**os.environ, **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(child)
    return proc, main


def _say(main, line: str) -> str:
    os.write(main, line.encode() + b"\n")
    return _read_until(main, b">>> ").decode(errors="replace")


@pytest.mark.slow
def test_interactive_chat_as_ollama_run(home):
    proc, main = _chat(["smollm2:135m", "--verbose", "--seed", "3"], env={"HERD_HOME": str(home)})
    try:
        _read_until(main, b">>> ")
        proc.send_signal(signal.SIGINT)  # Ctrl-C at an empty prompt: a hint, and the chat goes on
        assert b"Use Ctrl + d or /bye to exit." in _read_until(main, b">>> ")
        assert proc.poll() is None

        assert "Error: unknown parameter 'foo': one of temperature" in _say(main, "/set parameter foo 1")
        assert "Error: missing value: /set parameter temperature VALUE" in _say(main, "/set parameter temperature")
        assert "must be a number" in _say(main, "/set parameter top_p lots")
        assert "Set parameter 'num_predict' to '12'" in _say(main, "/set parameter num_predict 12")

        shown = _say(main, "/show parameters")  # every value in force, and whose it is
        assert re.search(r"temperature\s+0.2\s+model", shown) and re.search(r"num_predict\s+12\s+set", shown)
        assert re.search(r"top_k\s+40\s+default", shown) and re.search(r"seed\s+3\s+set", shown)
        info = _say(main, "/show info")
        assert "architecture" in info and "quantization" in info and "Q4_1" in info
        assert "<|im_start|>" in _say(main, "/show template")
        assert "No system was specified for this model." in _say(main, "/show system")
        assert "apache" in _say(main, "/show license").lower()
        assert "Usage: /show info" in _say(main, "/show nonsense")

        reply = _say(main, "Hi!")
        load = re.search(r"load duration:\s+([\d.]+)(ms|s)", reply)
        total = re.search(r"total duration:\s+([\d.]+)(ms|s)", reply)
        seconds = [float(m[1]) / (1000 if m[2] == "ms" else 1) for m in (load, total)]
        assert seconds[0] > 0.05 and seconds[1] > seconds[0]  # the first reply waited for the load
        second = _say(main, "And again?")
        assert "load duration:        0.00ms" in second  # loaded already
        os.write(main, b"/bye\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main)


def test_a_failed_pull_leaves_no_empty_partial_folder(tmp_path):
    from llamaherd.errors import HerdError
    from llamaherd.store import Store

    class Unreachable:
        key = "test:unreachable"

        def describe(self):
            return "nowhere"

        def fetch(self, work, blobs, progress):
            (work / "wheel").mkdir()  # as pip does before the download fails
            raise HerdError("could not download: the network is unreachable")

    store = Store(tmp_path, catalog=lambda name: Unreachable())
    with pytest.raises(HerdError, match="unreachable"):
        store.pull("anything:1b")
    assert not (tmp_path / "partial").exists()
