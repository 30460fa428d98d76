"""Every HERD_* variable is read in `llamaherd.settings`, and `herd serve --help` lists them with defaults."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llamaherd import settings
from llamaherd.errors import HerdError

SRC = Path(__file__).resolve().parents[1] / "src" / "llamaherd"


def test_no_module_but_settings_reads_a_herd_variable():
    readers = []
    for path in SRC.rglob("*.py"):
        if path.name == "settings.py":
            continue
        text = path.read_text()
        if re.search(r"(environ|getenv)[^\n]*[\"']HERD_", text):
            readers.append(str(path.relative_to(SRC)))
    assert readers == []


def test_every_variable_the_package_names_is_described():
    """A HERD_ name in the package's code or docs is one of settings.VARS (HERD_SIMD is a C macro)."""
    named = set()
    for path in list(SRC.rglob("*.py")) + list(SRC.rglob("*.js")):
        named |= set(re.findall(r"\bHERD_[A-Z_]+\b", path.read_text()))
    assert named - {v.name for v in settings.VARS} == set()


def test_serve_help_lists_each_variable_with_its_default():
    proc = subprocess.run([sys.executable, "-m", "llamaherd", "serve", "--help"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HERD_MAX_QUEUE": "7", "HERD_API_KEY": "secret",
                               "PYTHONPATH": str(SRC.parent)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for var in settings.VARS:
        line = next(line for line in lines if line.split()[:1] == [var.name])
        assert line.rstrip().endswith(f"[{var.default}]"), line
        assert var.description in line
    assert any("now: 7" in line for line in lines)  # the value in force is shown...
    assert "secret" not in proc.stdout  # ...but never the API key


def test_defaults_and_parsing():
    env = {}
    assert settings.host(env) == ("127.0.0.1", 11434)
    assert settings.home(env) == Path.home() / ".llamaherd"
    assert settings.keep_alive(env) == 300 and settings.max_queue(env) == 512 and settings.num_threads(env) is None
    assert settings.max_body(env) == 32 << 20 and settings.max_memory(env) is None
    assert not settings.debug(env) and not settings.local(env) and settings.native(env)
    env = {"HERD_HOST": ":8080", "HERD_HOME": "~/x", "HERD_KEEP_ALIVE": "10m", "HERD_DEBUG": "1",
           "HERD_LOCAL": "true", "HERD_NATIVE": "0", "HERD_MAX_MEMORY": "2G", "HERD_ORIGINS": "a, b,"}
    assert settings.host(env) == ("127.0.0.1", 8080) and settings.home(env) == Path.home() / "x"
    assert settings.keep_alive(env) == 600 and settings.debug(env) and settings.local(env)
    assert not settings.native(env) and settings.max_memory(env) == 2 << 30 and settings.origins(env) == ["a", "b"]
    with pytest.raises(HerdError, match="HERD_NUM_PARALLEL must be an integer"):
        settings.num_parallel({"HERD_NUM_PARALLEL": "many"})


def test_the_request_log_reads_token_counts_from_either_api():
    from llamaherd.server.log import duration, token_counts

    ollama = b'{"done":true,"total_duration":5,"prompt_eval_count":12,"prompt_eval_duration":3,"eval_count":30}\n'
    assert token_counts(b'{"response":"x"}\n' + ollama) == (12, 30)
    assert token_counts(b'"usage":{"prompt_tokens":7,"completion_tokens":9,"total_tokens":16}}') == (7, 9)
    assert token_counts(b'{"models":[]}') is None
    assert (duration(0.0004), duration(0.0123), duration(1.23456)) == ("400µs", "12.3ms", "1.235s")


def test_debug_logs_more_per_request(caplog):
    import asyncio
    import logging

    from llamaherd.server.log import AccessLog

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/api/tags", "client": ("127.0.0.1", 5),
             "headers": [(b"user-agent", b"ollama-python/0.4")]}
    with caplog.at_level(logging.DEBUG, logger="llamaherd.serve"):
        asyncio.run(AccessLog(app, "/tmp")(scope, None, send))
    assert '| 200 |' in caplog.records[0].message and 'GET "/api/tags"' in caplog.records[0].message
    assert "ollama-python/0.4" in caplog.records[1].message  # HERD_DEBUG's extra line
    assert dict(sent[0]["headers"])[b"x-herd-store"]
