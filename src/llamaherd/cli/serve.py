"""`herd serve`: the Ollama and OpenAI APIs and the chat page."""

from __future__ import annotations

import argparse
import errno
import inspect
import socket

from .. import settings
from ..errors import HerdError


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the web stack is imported, so that a busy port is one
    clear line at once. The error says whether the port is held by another herd (and its pid)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if e.errno != errno.EADDRINUSE:
            raise HerdError(f"cannot listen on {where}: {e.strerror}") from None
        raise HerdError(f"{where} is already in use by {_holder()}: stop it, or choose another port "
                        f"with HERD_HOST (e.g. HERD_HOST={host}:{port + 1} herd serve)") from None
    sock.listen(2048)
    return sock


def _holder() -> str:
    """Who holds the port, as far as an HTTP probe can tell."""
    from ..server.client import server_identity

    who = server_identity(timeout=1.0)
    if who is None:
        return "another program"
    if "pid" in who:
        return f"another herd serve (pid {who['pid']})"
    return "another server (Ollama?)"


def cmd_serve(args) -> int:
    """Serve the Ollama API (/api/...) and the OpenAI API (/v1/...) over one batching engine, and
    the chat page at / in a browser. Prints where it listens, then one line per request."""
    host, port = settings.host()
    sock = bind(host, port)
    from ..server.app import Settings, serve

    serve(Settings.from_env(), sock=sock)
    return 0


def register(sub, local) -> None:
    serve = sub.add_parser("serve", help="serve the Ollama and OpenAI APIs", description=inspect.cleandoc(cmd_serve.__doc__),
                           epilog=settings.help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.set_defaults(func=cmd_serve)
