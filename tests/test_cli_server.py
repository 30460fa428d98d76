"""The CLI talks to a running `herd serve` when one answers at HERD_HOST, as `ollama` does.

One real server holds the store; the CLI processes use the same store (HERD_HOME), and the
server's request log shows that they went through it. What they print is compared with what the
same command prints when it works locally (`--local`, or a path). A CLI whose HERD_HOME is another
store works locally and says so (a script with its own store must never touch the server's).
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
from herdserver import HerdServer  # noqa: E402
from test_cli import _read_until  # noqa: E402

PROMPT = "What is the capital of France?"
GREEDY = ("--temperature", "0", "--num-predict", "12")


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path):
    from llamaherd.store import Store

    home = tmp_path_factory.mktemp("server-home")
    store = Store(home)
    store.create("smol", f"FROM {smollm2_path}\nPARAMETER top_k 30\nSYSTEM You are a helpful assistant.\n")
    store.copy("smol", "spare")
    server = HerdServer(home, tmp_path_factory.mktemp("logs") / "herd-serve.log", env={"PIP_NO_INDEX": "1"})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client_home(tmp_path_factory):
    return tmp_path_factory.mktemp("client-home")  # another store, which stays empty


def herd(server, client_home, *args, env=None, timeout=300):
    """`herd ARGS` in a process whose HERD_HOST and HERD_HOME are the server's (or `env`'s)."""
    env = {**os.environ, "HERD_HOST": f"127.0.0.1:{server.port}", "HERD_HOME": str(server.home), **(env or {})}
    return subprocess.run([sys.executable, "-m", "llamaherd", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_list_show_and_pull_go_through_the_server(server, client_home):
    listed = herd(server, client_home, "list")
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0] for line in listed.stdout.splitlines()[1:]} == {"smol:latest", "spare:latest"}
    assert _logged(server, 'GET "/api/tags"')
    other = herd(server, client_home, "list", env={"HERD_HOME": str(client_home)})
    assert other.stdout.splitlines() == ["NAME    ID    SIZE    MODIFIED"]  # its own store, which is empty
    assert "serves another store; working here on" in other.stderr and str(client_home) in other.stderr

    for flags in ((), ("--modelfile",), ("--template",), ("--license",)):
        remote = herd(server, client_home, "show", "smol", *flags)
        here = herd(server, client_home, "show", "smol", "--local", *flags, env={"HERD_HOME": str(server.home)})
        assert remote.returncode == 0 and here.returncode == 0, remote.stderr + here.stderr
        assert remote.stdout == here.stdout, flags
        if not flags:
            for fact in ("architecture", "context length", "quantization", "top_k", "helpful assistant"):
                assert fact in remote.stdout

    # smollm2:135m's file is already a blob of the server's store (smol's): the pull only writes a manifest.
    pulled = herd(server, client_home, "pull", "smollm2:135m")
    assert pulled.returncode == 0, pulled.stderr
    assert "success" in pulled.stderr and "100%" in pulled.stderr  # a progress bar, then the last status
    assert "smollm2:135m" in {m["name"] for m in server.api("GET", "/api/tags").json()["models"]}
    assert _logged(server, 'POST "/api/pull"')
    assert not (client_home / "manifests").exists()


def _logged(server, fragment: str) -> bool:
    return fragment in server.log_path.read_text()


def test_run_answers_through_the_server_as_it_does_locally(server, client_home, smollm2_path):
    remote = herd(server, client_home, "run", "smol", PROMPT, *GREEDY, "--verbose")
    assert remote.returncode == 0, remote.stderr
    assert "Paris" in remote.stdout
    for stat in ("total duration:", "load duration:", "prompt eval count:", "eval rate:"):
        assert stat in remote.stderr
    assert [m["name"] for m in server.api("GET", "/api/ps").json()["models"]] == ["smol:latest"]
    server.api("POST", "/api/generate", json={"model": "smol", "keep_alive": "4m30s"}).raise_for_status()
    ps = herd(server, client_home, "ps")
    assert ps.returncode == 0 and ps.stdout.splitlines()[1].startswith("smol:latest")
    from llamaherd.cli.common import human_size

    row = ps.stdout.splitlines()[1]
    assert row.endswith("4 minutes from now"), row  # as Ollama's UNTIL, not a timestamp
    assert f"    {human_size(server.api('GET', '/api/ps').json()['models'][0]['size'])}    " in row

    spec = herd(server, client_home, "run", "smol", PROMPT, *GREEDY, "--speculate", "4")
    assert spec.returncode == 0 and "--speculate runs in this process only" in spec.stderr
    assert spec.stdout == remote.stdout

    # A path always runs here (the server knows names); its stored options are the same (top_k
    # does not matter when greedy, the system prompt is given), so the answer is the same.
    here = herd(server, client_home, "run", smollm2_path, PROMPT, *GREEDY, "--system",
                "You are a helpful assistant.")
    assert here.returncode == 0, here.stderr
    assert remote.stdout == here.stdout

    raw = [herd(server, client_home, "run", "smol", "Once upon a time", "--raw", "--seed", "7", "--temperature",
                "0.9", "--num-predict", "8", "--verbose") for _ in range(2)]
    assert raw[0].returncode == 0 and raw[0].stdout.strip() and raw[0].stdout == raw[1].stdout
    assert "prompt eval count:    4 token(s)" in raw[0].stderr  # the 4 tokens of the prompt, no chat template


def test_interactive_chat_through_the_server(server, client_home):
    main, child = pty.openpty()
    env = {**os.environ, "HERD_HOST": f"127.0.0.1:{server.port}", "HERD_HOME": str(server.home)}
    proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "run", "smol"], env=env,
                            stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    try:
        _read_until(main, b">>> ")
        os.write(main, b"/set parameter temperature 0\n")
        assert b"Set parameter 'temperature'" in _read_until(main, b">>> ")
        os.write(main, b"/set parameter num_predict 12\n")
        _read_until(main, b">>> ")
        os.write(main, b"/set parameter temperature -1\n")
        assert b"Error" in _read_until(main, b">>> ")
        os.write(main, PROMPT.encode() + b"\n")
        assert b"Paris" in _read_until(main, b">>> ")
        os.write(main, b"/set verbose\n")
        _read_until(main, b">>> ")
        os.write(main, b"And of Italy?\n")
        assert b"eval rate:" in _read_until(main, b">>> ")
        os.write(main, b"/clear\n")
        assert b"Cleared" in _read_until(main, b">>> ")
        os.write(main, b"/bye\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main)


def test_rm_through_the_server(server, client_home):
    other = herd(server, client_home, "rm", "spare", env={"HERD_HOME": str(client_home)})
    assert other.returncode == 1 and "serves another store" in other.stderr  # not the server's model
    assert "spare:latest" in {m["name"] for m in server.api("GET", "/api/tags").json()["models"]}
    removed = herd(server, client_home, "rm", "spare")
    assert removed.returncode == 0 and removed.stdout == "deleted 'spare'\n", removed.stderr
    assert "spare:latest" not in {m["name"] for m in server.api("GET", "/api/tags").json()["models"]}
    missing = herd(server, client_home, "rm", "spare")
    assert missing.returncode == 1 and missing.stderr.startswith("Error: ") and "spare" in missing.stderr


def test_no_server_or_herd_local_means_local(server, client_home):
    """Nothing answers at the test session's HERD_HOST (conftest); HERD_LOCAL=1 ignores a server."""
    for env in ({"HERD_HOST": os.environ["HERD_HOST"]}, {"HERD_LOCAL": "1"}):
        listed = herd(server, client_home, "list", env={**env, "HERD_HOME": str(server.home)})
        assert listed.returncode == 0 and "smol:latest" in listed.stdout
        empty = herd(server, client_home, "list", env={**env, "HERD_HOME": str(client_home)})
        assert empty.stdout.splitlines() == ["NAME    ID    SIZE    MODIFIED"]
    ps = herd(server, client_home, "ps", env={"HERD_HOST": os.environ["HERD_HOST"]})
    assert ps.returncode == 1 and "could not reach a herd server" in ps.stderr


def _log_lines(server) -> list[str]:
    return server.log_path.read_text().splitlines()


def _log_line(server, before: int, needle: str) -> str:
    """The first line after the log's first `before` that holds `needle`: a request's line is
    written as its response goes out, so a client can read the reply a moment before it is there."""
    deadline = time.monotonic() + 30
    while True:
        lines = [line for line in _log_lines(server)[before:] if needle in line]
        if lines or time.monotonic() > deadline:
            return lines[0] if lines else ""
        time.sleep(0.05)


def test_serve_prints_where_it_listens_and_a_line_per_request(server):
    text = server.log_path.read_text()
    assert f"listening on http://127.0.0.1:{server.port}" in text
    assert f"chat page: http://127.0.0.1:{server.port}/" in text
    assert f"store: {server.home} (" in text
    before = len(_log_lines(server))
    r = server.api("POST", "/api/generate", json={"model": "smol", "prompt": "Hi", "stream": False,
                                                   "options": {"num_predict": 5, "temperature": 0}})
    assert r.status_code == 200 and r.headers["x-herd-pid"] == str(server.proc.pid)
    body = r.json()
    line = _log_line(server, before, '| POST "/api/generate" |')
    assert line.startswith("[herd] ") and '| 200 |' in line
    assert line.endswith(f"| {body['prompt_eval_count']} prompt + {body['eval_count']} eval tokens")
    before = len(_log_lines(server))
    server.api("POST", "/api/show", json={"model": "nothing-here"})
    assert '| 404 |' in _log_line(server, before, 'POST "/api/show"')


def _serve_on(port: int) -> subprocess.CompletedProcess:
    """`herd serve` on a busy port; also says whether the web stack was imported before it gave up."""
    code = ("import sys; from llamaherd.cli import main; rc = main(['serve']); "
            "print('fastapi imported' if 'fastapi' in sys.modules else 'fastapi not imported'); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HERD_HOST": f"127.0.0.1:{port}"})


def test_a_busy_port_is_one_clear_line_before_the_heavy_imports(server):
    proc = _serve_on(server.port)
    assert proc.returncode == 1 and proc.stdout.strip() == "fastapi not imported"
    assert proc.stderr.strip() == (f"Error: 127.0.0.1:{server.port} is already in use by another herd serve "
                                   f"(pid {server.proc.pid}): stop it, or choose another port with HERD_HOST "
                                   f"(e.g. HERD_HOST=127.0.0.1:{server.port + 1} herd serve)")
    import socket

    with socket.socket() as other:  # a program that is not a herd
        other.bind(("127.0.0.1", 0))
        other.listen()
        proc = _serve_on(other.getsockname()[1])
    assert proc.returncode == 1 and "already in use by another program" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
