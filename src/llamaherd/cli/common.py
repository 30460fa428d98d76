"""What the `herd` verbs share: resolving a model name, the store, talking to a running server,
progress bars and Ollama-style tables."""

from __future__ import annotations

import argparse
import re
import sys

from .. import settings
from ..resolve import DEFAULT_MODEL  # noqa: F401  (the verbs import it from here)


class IntermixedParser(argparse.ArgumentParser):
    """A verb's parser whose positionals may come after its options, as Ollama's CLI allows:
    `herd run MODEL --temperature 0 "prompt"` (argparse's `parse_intermixed_args`). A parser that
    cannot be parsed so (one with verbs of its own, `herd train`) parses as usual."""

    _inside = False  # parse_known_intermixed_args calls parse_known_args itself (Python < 3.12)

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        except TypeError:  # subparsers or REMAINDER positionals: the ordinary parse
            return super().parse_known_args(args, namespace)
        finally:
            self._inside = False


def resolve_model(name: str, progress=None):
    """A `store.ResolvedModel` from what the user typed (see `llamaherd.resolve`), with pull
    progress on stderr."""
    from ..resolve import resolve_model as resolve

    with PullProgress() as shown:
        return resolve(name, progress or shown)


class PullProgress:
    """Shows a store's progress events on stderr: a tqdm bar per file (bytes, rate, time left),
    other statuses as lines, as `ollama pull` does. A context manager that closes its bars."""

    def __init__(self, out=None):
        self.out = out or sys.stderr
        self.bars: dict[str, object] = {}

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        status = event.get("status", "")
        key = event.get("digest")
        if key and "completed" in event:
            bar = self.bars.get(key)
            if bar is None:
                bar = self.bars[key] = tqdm(desc=status, total=event.get("total"), unit="B", unit_scale=True,
                                            unit_divisor=1024, file=self.out, leave=True, dynamic_ncols=True)
            if event.get("total") and bar.total != event["total"]:
                bar.total = event["total"]
            bar.update(event["completed"] - bar.n)
            return
        self.close()
        print(status, file=self.out, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def __enter__(self) -> "PullProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def human_size(n: int) -> str:
    """Bytes in decimal units, as Ollama shows them: "98 MB", "4.7 GB"."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if n >= 10 or unit == "B" else f"{n:.1f} {unit}"


def human_ago(seconds: float) -> str:
    """A past moment as Ollama's MODIFIED column says it: "2 minutes ago", "About an hour ago"."""
    s = max(0, int(seconds))
    if s < 1:
        return "Less than a second ago"
    steps = [(60, 1, "second"), (3600, 60, "minute"), (86400 * 2, 3600, "hour"), (86400 * 14, 86400, "day"),
             (86400 * 60, 86400 * 7, "week"), (86400 * 365 * 2, 86400 * 30, "month")]
    for limit, size, unit in steps:
        if s < limit:
            n = s // size
            if unit in ("minute", "hour") and n == 1:
                return f"About {'an' if unit == 'hour' else 'a'} {unit} ago"
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return f"{s // (86400 * 365)} years ago"


def human_until(seconds: float) -> str:
    """A coming moment as Ollama's UNTIL column says it: "4 minutes from now", "Forever"."""
    if seconds > 100 * 365 * 86400:  # keep_alive < 0: Ollama's far-future expiry
        return "Forever"
    if seconds < 1:
        return "Stopping..."
    return human_ago(seconds).replace(" ago", " from now").replace("Less than a second from now", "Now")


def open_store():
    from ..store import Store

    return Store()


def use_server(args) -> bool:
    """Whether a command goes through a running `herd serve`, as `ollama` does: yes when one answers
    at HERD_HOST and serves this command's store (HERD_HOME), unless --local or HERD_LOCAL=1 keeps
    it here. A server of another store is left alone, with a note on stderr."""
    if getattr(args, "local", False) or settings.local():
        return False
    from ..server.client import server_identity, server_url, store_id

    who = server_identity()
    if who is None:
        return False
    if "store" not in who or who["store"] == store_id(settings.home()):
        return True
    print(f"herd: the server at {server_url()} serves another store; working here on {settings.home()} "
          "(HERD_HOME)", file=sys.stderr)
    return False


def server_show(name: str, pull: bool = False) -> dict:
    """A server's /api/show as `Store.show` answers: parameters, messages and adapters read back
    from its Modelfile, the rest from its fields. With `pull`, a missing model is pulled first."""
    from ..server.client import ServerError, server_request
    from ..store.modelfile import parse_modelfile

    try:
        r = server_request("POST", "/api/show", {"model": name})
    except ServerError as e:
        if not (pull and e.status == 404):
            raise
        server_pull(name)
        r = server_request("POST", "/api/show", {"model": name})
    mf = parse_modelfile(r["modelfile"])
    facts, d = r.get("model_info", {}), r.get("details", {})
    arch = facts.get("general.architecture")
    details = {"architecture": arch, "parameter_size": d.get("parameter_size") or None,
               "context_length": facts.get(f"{arch}.context_length"),
               "embedding_length": facts.get(f"{arch}.embedding_length"),
               "quantization": d.get("quantization_level") or None}
    # The server notes tool support in the template it shows (for clients such as litellm); the
    # stored template is what `herd show` prints.
    template = re.sub(r"\{#- llamaherd: .*?#\}$", "", r.get("template") or "", flags=re.S) or None
    return {"details": details, "parameters": mf.parameters, "template": template,
            "system": r.get("system"), "license": r.get("license"), "messages": mf.messages,
            "adapters": mf.adapters, "modelfile": r["modelfile"]}


def server_pull(name: str) -> None:
    from ..server.client import server_stream

    with PullProgress() as progress:
        for event in server_stream("POST", "/api/pull", {"model": name, "stream": True}):
            progress(event)


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, four spaces apart (the last one unpadded), as Ollama's."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths)) + "    " + r[-1])


def parse_time(rfc3339: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()

