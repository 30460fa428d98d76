"""Who may talk to the server from where: the Host check, browser origins (CORS) and JSON bodies.

Three defences against web pages reaching a local server, as Ollama's (and a little stricter):

- **Host** (DNS rebinding). On a loopback bind, a request must name the server by a local name:
  localhost (and *.localhost), *.local (mDNS), *.internal (Docker Desktop's
  host.docker.internal), the machine's own hostname, or an IP address that is loopback, private,
  link-local, unspecified or one of the machine's own. A public name (a page that resolved
  its own domain to 127.0.0.1) gets 403.
- **Origin** (cross-site requests). A browser names the page that sends a request in `Origin`;
  one not allowed gets 403 before anything runs (a form or a `no-cors` fetch would otherwise be
  executed, its answer merely hidden). Allowed: Ollama's defaults (localhost, 127.0.0.1, [::1],
  0.0.0.0 on any port; app://, file://, tauri://, vscode-webview://, vscode-file://), browser
  extensions (chrome-extension://, moz-extension://, safari-web-extension://), the same origin
  as the request's Host, and HERD_ORIGINS. Requests without `Origin` (command-line tools, SDKs)
  are not concerned.
- **Content type**. A page may POST `text/plain`, `multipart/form-data` or form-encoded bodies
  without asking first (no CORS preflight); JSON endpoints refuse those with 415, so a body is
  parsed as JSON only when it was sent as JSON. `curl -d` (form-encoded, no `Origin`) and a body
  without a content type are accepted from non-browser clients.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
import socket

DEFAULT_ORIGINS = [f"{scheme}://{host}{port}" for scheme in ("http", "https")
                   for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0") for port in ("", ":*")] + [
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
    "chrome-extension://*", "moz-extension://*", "safari-web-extension://*"]
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
# Bodies a web page can send without a CORS preflight: never parsed as JSON when a browser sends them.
SIMPLE_TYPES = ("text/plain", "multipart/form-data", "application/x-www-form-urlencoded")


def origin_regex(patterns: list[str]) -> str:
    """One regular expression for origin patterns with * wildcards (HERD_ORIGINS' syntax)."""
    return "|".join(fnmatch.translate(p.strip()) for p in patterns if p.strip())


def split_host(host_header: str) -> str:
    """The host name of a Host header, without its port or IPv6 brackets, lower-cased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@functools.cache
def own_names() -> frozenset[str]:
    """The machine's hostname (full and short) and the addresses it resolves to."""
    names: set[str] = set()
    try:
        hostname = socket.gethostname().lower()
    except OSError:
        return frozenset()
    names |= {hostname, hostname.split(".")[0]}
    try:
        names |= {info[4][0].lower() for info in socket.getaddrinfo(hostname, None)}
    except OSError:
        pass
    return frozenset(n for n in names if n)


def host_allowed(host_header: str) -> bool:
    """Whether a Host header names this machine by a local name or address (not a public name)."""
    host = split_host(host_header)
    if host in ("", "localhost") or host.endswith(LOCAL_SUFFIXES) or host in own_names():
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified


class Access:
    """Decides the Host, Origin and content-type checks for one server.

    Args:
        origins: HERD_ORIGINS patterns, allowed besides `DEFAULT_ORIGINS`.
        check_host: whether to check Host (the server is bound to loopback).
    """

    def __init__(self, origins: list[str], check_host: bool):
        self.regex = origin_regex(DEFAULT_ORIGINS + list(origins))
        self._pattern = re.compile(self.regex)
        self.check_host = check_host

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        if origin in (f"http://{host_header}", f"https://{host_header}"):
            return True  # same origin: a page the server itself serves (the chat page, on any address)
        return self._pattern.fullmatch(origin) is not None

    def refusal(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """The status and message for a request that must not run, or None."""
        host = headers.get("host", "localhost")
        if self.check_host and not host_allowed(host):
            return 403, (f"forbidden host {split_host(host)!r}: a loopback server answers local names only "
                         "(DNS-rebinding protection)")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return 403, f"origin {origin!r} is not allowed (set HERD_ORIGINS to allow it)"
        if method in ("POST", "PUT", "PATCH", "DELETE") and not path.startswith("/api/blobs/"):
            return self._content_type_refusal(headers, browser=origin is not None)
        return None

    @staticmethod
    def _content_type_refusal(headers: dict[str, str], browser: bool) -> tuple[int, str] | None:
        if headers.get("content-length", "") == "0" and "transfer-encoding" not in headers:
            return None  # no body: nothing is parsed
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json")):
            return None
        if not browser and ctype in ("", "application/x-www-form-urlencoded"):
            return None  # curl -d, or a client that names no type: not a web page
        return 415, f"unsupported content type {ctype or '(none)'!r}: send the body as application/json"
