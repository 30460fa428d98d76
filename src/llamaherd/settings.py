"""Every HERD_* environment variable llamaherd reads, with its default and what it does.

Names and defaults follow Ollama's `envconfig` (`HERD_` for `OLLAMA_`). Nothing else in the
package reads the environment for a HERD_* variable: it calls the function here of the same name
(`settings.host()`, `settings.home()`...). Each function takes an optional `env` mapping (default
`os.environ`) so tests and `Settings.from_env` can pass their own. Importing this module is cheap
(standard library only): `herd serve` checks its port with it before the heavy imports.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import HerdError

DEFAULT_PORT = 11434


@dataclass(frozen=True)
class Var:
    name: str
    default: str  # as `herd serve --help` shows it
    description: str


VARS: tuple[Var, ...] = (
    Var("HERD_HOST", "127.0.0.1:11434", "address the server binds and the CLI calls (host:port, host, :port or a URL)"),
    Var("HERD_HOME", "~/.llamaherd", "the model store"),
    Var("HERD_ORIGINS", "localhost only", "more browser origins allowed by CORS (comma-separated, * wildcards)"),
    Var("HERD_API_KEY", "none", "if set, every request but GET / needs \"Authorization: Bearer <key>\""),
    Var("HERD_MAX_QUEUE", "512", "requests waiting for a slot before the server answers 503"),
    Var("HERD_MAX_LOADED_MODELS", "3", "models loaded at once; the least recently used idle one goes"),
    Var("HERD_MAX_MEMORY", "unlimited", "bytes of weights + KV cache over loaded models (suffix K/M/G)"),
    Var("HERD_KEEP_ALIVE", "5m", "how long an idle model stays loaded (seconds or \"5m\"; < 0: forever)"),
    Var("HERD_NUM_PARALLEL", "16", "requests one model decodes together (KV-cache rows)"),
    Var("HERD_CONTEXT_LENGTH", "4096", "default num_ctx (clipped to the model's)"),
    Var("HERD_MAX_CONTEXT", "the model's", "the largest num_ctx a request gets (larger ones are clamped)"),
    Var("HERD_MAX_BODY", "32M", "request body size limit (suffix K/M/G), blob uploads too: raise it to upload model files"),
    Var("HERD_ALLOW_REQUEST_TEMPLATES", "0", "1: accept `template` in requests (vLLM's --trust-request-chat-template)"),
    Var("HERD_MAX_CONNECTIONS", "1024", "open connections before new ones are refused (slowloris)"),
    Var("HERD_HEADER_TIMEOUT", "10", "seconds a client has to send its request line and headers"),
    Var("HERD_NUM_THREADS", "torch's default", "CPU threads for the matmuls (server and local runs)"),
    Var("HERD_KV_CACHE_TYPE", "f32", "KV-cache element type: f32 | f16 | q8_0 (as Ollama's OLLAMA_KV_CACHE_TYPE; a 16-bit model's default: its own dtype)"),
    Var("HERD_GUARD", "none", "a guard model (e.g. llama-guard3:1b) that moderates prompts and replies"),
    Var("HERD_GUARD_MODE", "both", "what the guard checks: input | output | both"),
    Var("HERD_GUARD_THRESHOLD", "0.5", "the guard's unsafe-score threshold"),
    Var("HERD_GUARD_MALFORMED", "unsafe", "a guard answer outside the protocol counts as: unsafe | score"),
    Var("HERD_GUARD_EVERY", "64", "streamed replies are checked at sentence ends and at least every this many tokens"),
    Var("HERD_MODERATION_OVERRIDE", "stricter", "what a request's X-Herd-Moderation header may change: stricter | any"),
    Var("HERD_GUARD_REFUSAL", "I can't help with that.", "the reply to a flagged prompt"),
    Var("HERD_CODE_SHIELD", "off", "warn | block: scan the code in replies for insecure patterns"),
    Var("HERD_SEMGREP", "semgrep on PATH", "the semgrep program the code shield runs, where installed"),
    Var("HERD_DEBUG", "0", "1: log more (each request's client and size; uvicorn's and the engine's debug lines)"),
    Var("HERD_LOCAL", "0", "1: CLI commands work in their own process even when a server answers"),
    Var("HERD_COMPILE", "1 on CUDA, else 0", "1: the torch runner decodes every row of the KV cache with one torch.compile'd static step (one CUDA graph a step on a GPU); compiling takes a while (a minute on two CPU cores, tens of seconds on a GPU machine, again when the KV cache grows)"),
    Var("HERD_NATIVE", "1", "0: do not compile and use the native CPU kernels (torch's kernels instead)"),
    Var("HERD_CACHE", "~/.cache/llamaherd", "downloads and compiled kernels"),
)


def _get(name: str, env: Mapping[str, str] | None) -> str:
    return ((os.environ if env is None else env).get(name) or "").strip()


def _flag(name: str, env: Mapping[str, str] | None, default: bool) -> bool:
    value = _get(name, env).lower()
    if not value:
        return default
    return value not in ("0", "false", "no", "off")


def _int(name: str, env: Mapping[str, str] | None, default: int, lo: int = 1) -> int:
    raw = _get(name, env)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HerdError(f"{name} must be an integer, got {raw!r}") from None
    if value < lo:
        raise HerdError(f"{name} must be >= {lo}, got {value}")
    return value


def parse_host(value: str | None) -> tuple[str, int]:
    """HERD_HOST as Ollama reads OLLAMA_HOST: "host:port", "host", ":port", "http://host:port", "[::1]:port"."""
    value = (value or "").strip()
    if not value:
        return "127.0.0.1", DEFAULT_PORT
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise HerdError(f"HERD_HOST {value!r}: bad port") from None
    host = parts.hostname or "127.0.0.1"
    return host, port


def parse_size(value: str | None, default: int | None) -> int | None:
    """Bytes from "123", "2M", "1.5G" (binary units); `default` when empty."""
    if value is None or not value.strip():
        return default
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", value, re.IGNORECASE)
    if not m:
        raise HerdError(f"bad size {value!r}: give bytes, or a number with K, M or G")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1s"); a
    negative value keeps the model loaded forever. None: the server's default."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise HerdError(f"invalid keep_alive {value!r}")
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise HerdError("invalid keep_alive NaN")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            pass
        else:
            # float() reads "nan" too; a NaN expiry would never come, and /api/ps could not show it.
            if math.isnan(seconds):
                raise HerdError("invalid keep_alive NaN")
            return seconds
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = _DURATION.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            return sign * sum(float(n) * _UNITS[u] for n, u in parts)
    raise HerdError(f"invalid keep_alive {value!r}: give seconds or a duration like \"5m\"")


# -- one function per variable ----------------------------------------------------------------

def host(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    return parse_host(_get("HERD_HOST", env))


def home(env: Mapping[str, str] | None = None) -> Path:
    return Path(_get("HERD_HOME", env) or Path.home() / ".llamaherd").expanduser()


def origins(env: Mapping[str, str] | None = None) -> list[str]:
    return [o.strip() for o in _get("HERD_ORIGINS", env).split(",") if o.strip()]


def api_key(env: Mapping[str, str] | None = None) -> str | None:
    return _get("HERD_API_KEY", env) or None


def max_queue(env: Mapping[str, str] | None = None) -> int:
    return _int("HERD_MAX_QUEUE", env, 512, lo=0)


def max_loaded_models(env: Mapping[str, str] | None = None) -> int:
    return _int("HERD_MAX_LOADED_MODELS", env, 3)


def max_memory(env: Mapping[str, str] | None = None) -> int | None:
    return parse_size(_get("HERD_MAX_MEMORY", env), None)


def keep_alive(env: Mapping[str, str] | None = None) -> float:
    value = parse_keep_alive(_get("HERD_KEEP_ALIVE", env))
    return 300.0 if value is None else value


def num_parallel(env: Mapping[str, str] | None = None) -> int:
    return _int("HERD_NUM_PARALLEL", env, 16)


def context_length(env: Mapping[str, str] | None = None) -> int:
    return _int("HERD_CONTEXT_LENGTH", env, 4096)


def max_context(env: Mapping[str, str] | None = None) -> int | None:
    return _int("HERD_MAX_CONTEXT", env, 0) if _get("HERD_MAX_CONTEXT", env) else None


def allow_request_templates(env: Mapping[str, str] | None = None) -> bool:
    return _flag("HERD_ALLOW_REQUEST_TEMPLATES", env, False)


def max_connections(env: Mapping[str, str] | None = None) -> int:
    return _int("HERD_MAX_CONNECTIONS", env, 1024)


def header_timeout(env: Mapping[str, str] | None = None) -> float:
    return float(_int("HERD_HEADER_TIMEOUT", env, 10))


def max_body(env: Mapping[str, str] | None = None) -> int | None:
    return parse_size(_get("HERD_MAX_BODY", env), 32 << 20)


def num_threads(env: Mapping[str, str] | None = None) -> int | None:
    return _int("HERD_NUM_THREADS", env, 0) if _get("HERD_NUM_THREADS", env) else None


KV_CACHE_TYPES = ("f32", "f16", "q8_0")


def kv_cache_type(env: Mapping[str, str] | None = None, default: str = "f32") -> str:
    value = _get("HERD_KV_CACHE_TYPE", env).lower() or default
    if value not in KV_CACHE_TYPES:
        raise HerdError(f"HERD_KV_CACHE_TYPE must be one of {', '.join(KV_CACHE_TYPES)}, got {value!r}")
    return value


# How long (in libgomp's spins, ~10 ns each) an OpenMP thread that waits at a barrier, or for the
# next parallel region, spins before it sleeps. libgomp's default is 300,000 (~3 ms) — unless the
# process runs more OpenMP threads than there are cores, when it is 100. A decode step forks and
# joins a few hundred times; when another program competes for the cores, a thread spinning for 3
# ms waits on a partner that the kernel has descheduled, and the step crawls: a local `herd run`
# fell to 4-7 tokens/s under two busy loops, while `herd serve` (whose scheduler thread made the
# process count more threads than cores, so it spun 100) kept ~125. Idle, the short spin costs
# nothing measurable (bench_cpu's decode rows were measured with it). So it is chosen, not left to
# that accident: a user's GOMP_SPINCOUNT or OMP_WAIT_POLICY is kept.
OMP_SPINCOUNT = "100"


def openmp_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The OpenMP variables llamaherd sets before torch loads its OpenMP runtime (which reads them
    once, when loaded): the threads' wait policy (GOMP_SPINCOUNT, unless the user set it or
    OMP_WAIT_POLICY) and HERD_NUM_THREADS as OMP_NUM_THREADS (a bad value is left for the server's
    check to report)."""
    env = os.environ if env is None else env
    out = {}
    if not (env.get("GOMP_SPINCOUNT") or env.get("OMP_WAIT_POLICY")):
        out["GOMP_SPINCOUNT"] = OMP_SPINCOUNT
    try:
        threads = num_threads(env)
    except HerdError:
        threads = None
    if threads:
        out["OMP_NUM_THREADS"] = str(threads)
    return out


def debug(env: Mapping[str, str] | None = None) -> bool:
    return _flag("HERD_DEBUG", env, False)


def local(env: Mapping[str, str] | None = None) -> bool:
    return _flag("HERD_LOCAL", env, False)


def compile(env: Mapping[str, str] | None = None, cuda: bool = False) -> bool:
    """Whether the torch runner compiles its decode step: HERD_COMPILE, else on CUDA only."""
    return _flag("HERD_COMPILE", env, cuda)


def native(env: Mapping[str, str] | None = None) -> bool:
    return _get("HERD_NATIVE", env) != "0"


def semgrep(env: Mapping[str, str] | None = None) -> str | None:
    return _get("HERD_SEMGREP", env) or None


def cache(env: Mapping[str, str] | None = None) -> Path:
    return Path(_get("HERD_CACHE", env) or Path.home() / ".cache" / "llamaherd").expanduser()


def help_text(env: Mapping[str, str] | None = None) -> str:
    """The variables as `herd serve --help` lists them: name, default, description, and the value
    in force where one is set."""
    width = max(len(v.name) for v in VARS) + 2
    lines = ["environment variables (default in brackets):"]
    for v in VARS:
        lines.append(f"  {v.name:<{width}}{v.description} [{v.default}]")
        value = _get(v.name, env)
        if value and v.name != "HERD_API_KEY":
            lines.append(f"  {'':<{width}}now: {value}")
    return "\n".join(lines)
