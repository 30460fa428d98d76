"""A sandbox for generated code: each program in its own process with no network, its own
temporary directory as the only writable place, and CPU-time, memory, process-count, file-size,
output-size and wall-clock limits.

Isolation uses Linux namespaces directly (unshare(2): mount, network, PID, IPC, UTS; a user
namespace too when not root), which needs no setuid helper such as bubblewrap: the launcher
(`_jail.py`) makes the whole file system read-only, hides home directories and /run under empty
tmpfs, gives the program a size-limited tmpfs /tmp, drops to an unprivileged uid and execs
`python -I`. Where namespaces are not available (no unshare, a container that forbids them),
programs still run with the CPU, memory, file-size, output and wall-clock limits, in a temporary
directory, with a bare environment, as the calling user; `run_program` then warns once that
there is no network, file-system or process-count isolation.

    result = run_program("print(1 + 1)")
    result.status   # "ok", "failed", "timeout", "cpu_limit", "memory_limit", "output_limit", "error"
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

log = logging.getLogger("llamaherd.eval")

JAIL = Path(__file__).with_name("_jail.py")


@dataclass
class Limits:
    """Resource limits of one program.

    Attributes:
        timeout: wall-clock seconds.
        cpu: CPU seconds (RLIMIT_CPU; then SIGKILL).
        memory: bytes of address space (RLIMIT_AS; allocations beyond it raise MemoryError).
        nproc: processes and threads of the program's own uid (RLIMIT_NPROC).
        fsize: largest file it may write, bytes (RLIMIT_FSIZE).
        nofile: open file descriptors.
        disk: size of its writable /tmp (tmpfs), bytes.
        output: bytes of stdout + stderr kept; more and the program is killed.
    """

    timeout: float = 10.0
    cpu: int = 10
    memory: int = 1 << 30
    nproc: int = 32
    fsize: int = 16 << 20
    nofile: int = 64
    disk: int = 64 << 20
    output: int = 1 << 20


@dataclass
class Result:
    """What happened to a program.

    Attributes:
        status: "ok" (exit 0), "failed" (an exception or a non-zero exit), "timeout" (wall clock),
            "cpu_limit", "memory_limit", "output_limit", or "error" (the sandbox itself failed).
        returncode: the exit status (negative: killed by that signal).
        stdout, stderr: the output (up to Limits.output bytes together).
        isolated: whether namespaces isolated it (False: the fallback, limits only).
        seconds: wall time.
    """

    status: str
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    isolated: bool = True
    seconds: float = 0.0
    detail: str = field(default="")

    @property
    def passed(self) -> bool:
        return self.status == "ok"


@cache
def namespaces_available() -> tuple[bool, str]:
    """Whether the launcher can isolate a program here (probed once), and why not if not."""
    if sys.platform != "linux":
        return False, f"not Linux ({sys.platform})"
    try:
        r = _launch("pass\n", Limits(timeout=30), isolate=True)  # the launcher exits 125 if setup fails
    except OSError as e:
        return False, str(e)
    if r.returncode != 0:
        return False, (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    return True, ""


_warned = False


def run_program(code: str, limits: Limits | None = None) -> Result:
    """Run Python source in the sandbox and report what happened.

    Args:
        code: the program (a whole module's source).
        limits: resource limits; default `Limits()`.
    Returns:
        A `Result`; a program that breaks a limit is a result, never an exception here.
    """
    global _warned
    limits = limits or Limits()
    ok, why = namespaces_available()
    if not ok and not _warned:
        log.warning("sandbox: Linux namespaces are not available here (%s); generated code runs with "
                    "resource limits only, without network, file-system or process-count isolation", why)
        _warned = True
    return _launch(code, limits, isolate=ok)


def _launch(code: str, limits: Limits, isolate: bool) -> Result:
    with tempfile.TemporaryDirectory(prefix="herd-sandbox-") as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(code, encoding="utf-8")
        workdir = Path(tmp) / "work"
        config = {"program": str(program), "python": sys.executable, "isolate": isolate,
                  "workdir": str(workdir), "uid": 200000 + os.getpid() % 100000,
                  "limits": {"cpu": limits.cpu, "memory": limits.memory, "nproc": limits.nproc,
                             "fsize": limits.fsize, "nofile": limits.nofile, "disk": limits.disk}}
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(JAIL), json.dumps(config)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, cwd=tmp)
        out, err, why = _collect(proc, limits)
        seconds = time.monotonic() - start
    rc = proc.returncode
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    status = why or _status(rc, stderr, limits)
    return Result(status, rc, stdout, stderr, isolate, seconds)


def _collect(proc: subprocess.Popen, limits: Limits) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until the program ends, kill it at the wall-clock or output limit."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        sel.register(f, selectors.EVENT_READ)
    deadline = time.monotonic() + limits.timeout
    why = None
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            why = "timeout"
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            bufs[key.fileobj] += chunk
        if sum(len(b) for b in bufs.values()) > limits.output:
            why = "output_limit"
            break
    if why:
        _kill(proc)
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        why = why or "timeout"
        _kill(proc)
        proc.wait()
    sel.close()
    for f in bufs:
        f.close()
    return bytes(bufs[proc.stdout][:limits.output]), bytes(bufs[proc.stderr][:limits.output]), why


def _kill(proc: subprocess.Popen) -> None:
    """Kill the launcher's process group; the program is PID 1 of its namespace (or dies with its
    parent), so everything it started goes too."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _status(rc: int | None, stderr: str, limits: Limits) -> str:
    if rc == 0:
        return "ok"
    if rc == 125 and "sandbox setup failed" in stderr:
        return "error"
    if rc in (128 + signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGXCPU, -signal.SIGKILL) and \
            "Traceback" not in stderr:
        return "cpu_limit"
    if "MemoryError" in stderr:
        return "memory_limit"
    return "failed"
