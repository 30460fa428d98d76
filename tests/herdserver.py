"""A real `herd serve` process for the end-to-end tests (test_ui, test_serve, test_compat_serve,
test_trust_server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HerdServer:
    """`python -m llamaherd serve` on a free loopback port over the store at `home`.

    `env` adds (or, with None values, removes) environment variables of the server process.
    """

    def __init__(self, home: Path, log: Path, env: dict[str, str | None] | None = None):
        self.home, self.log_path = home, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        env = {**os.environ, "HERD_HOST": f"127.0.0.1:{self.port}", "HERD_HOME": str(self.home),
               "HERD_KEEP_ALIVE": "-1"}
        env.pop("HERD_API_KEY", None)
        for key, value in self.extra_env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "serve"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"herd serve exited with {self.proc.returncode}: see {self.log_path}")
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"herd serve did not answer within {timeout} s: see {self.log_path}")

    def kill(self) -> None:
        """Stop at once, as a crash would (no graceful shutdown)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=300, **kw)


@contextmanager
def serving(home: Path, model: str, gguf: Path, log: Path,
            env: dict[str, str | None] | None = None) -> Iterator[HerdServer]:
    """A server over a new store at `home` holding the file `gguf` as `model`, loaded before it is
    given; stopped afterwards. The server's output goes to `log` (emptied first)."""
    from llamaherd.store import Store

    Store(home).create(model, f"FROM {gguf}")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    server = HerdServer(home, log, env=env)
    try:
        server.start()
        server.api("POST", "/api/generate", json={"model": model}).raise_for_status()
        yield server
    finally:
        server.stop()
