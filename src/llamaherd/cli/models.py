"""The model store verbs: pull, list, show, rm, cp, create, and ps (a server's loaded models)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import HerdError
from .common import (DEFAULT_MODEL, PullProgress, human_ago, human_size, human_until, open_store, parse_time,
                     print_table, server_pull, server_show, use_server)


def cmd_pull(args) -> int:
    """Download a model into the store (catalog names, hf.co/{user}/{repo}:{quant}) and verify it."""
    if use_server(args):
        server_pull(args.model)
        return 0
    with PullProgress() as progress:
        open_store().pull(args.model, progress)
    return 0


def cmd_list(args) -> int:
    """List the models in the store."""
    if use_server(args):
        from ..server.client import server_request

        models = [(m["name"], m["digest"][:12], m["size"], parse_time(m["modified_at"]), m.get("error"))
                  for m in server_request("GET", "/api/tags")["models"]]
    else:
        models = [(m.name, m.id, m.size, m.modified, m.error) for m in open_store().list()]
    now = time.time()
    # A model that cannot be read is listed with what is wrong, never hidden (herd doctor says more).
    print_table([("NAME", "ID", "SIZE", "MODIFIED")] +
                [(name, id, human_size(size), human_ago(now - modified)) if error is None else
                 (name, "-", "-", f"BROKEN: {error}") for name, id, size, modified, error in models])
    return 0


def _section(title: str, lines: list[str]) -> str:
    return f"  {title}\n" + "".join(f"    {line}\n" for line in lines) + "\n"


def cmd_show(args) -> int:
    """Show a model's details, parameters, template, system prompt and license."""
    info = server_show(args.model) if use_server(args) else open_store().show(args.model)
    if args.modelfile:
        print(info["modelfile"], end="")
        return 0
    for flag in ("template", "system", "license"):
        if getattr(args, flag):
            print(info[flag] or "")
            return 0
    if args.parameters:
        print("\n".join(f"{k:<16}{v}" for k, v in _parameters(info)))
        return 0
    print(format_show(info), end="")
    return 0


def _parameters(info: dict) -> list[tuple[str, str]]:
    from ..store.modelfile import format_value

    return [(k, json.dumps(v) if isinstance(v, str) else format_value(v))
            for k, vs in info["parameters"].items() for v in (vs if isinstance(vs, list) else [vs])]


def format_show(info: dict) -> str:
    """What `herd show MODEL` (and `/show info` in a chat) prints, from `Store.show`'s answer."""
    params = _parameters(info)
    d = info["details"]
    facts = [("architecture", d.get("architecture")), ("parameters", d.get("parameter_size")),
             ("context length", d.get("context_length")), ("embedding length", d.get("embedding_length")),
             ("quantization", d.get("quantization"))]
    out = _section("Model", [f"{k:<20}{v}" for k, v in facts if v is not None])
    if params:
        width = max(len(k) for k, _ in params) + 4
        out += _section("Parameters", [f"{k:<{width}}{v}" for k, v in params])
    if info["system"]:
        out += _section("System", info["system"].splitlines()[:5])
    if info["messages"]:
        out += _section("Messages", [f"{m['role']}: {m['content'].splitlines()[0] if m['content'] else ''}"
                                     for m in info["messages"]])
    if info["template"]:
        lines = info["template"].splitlines()
        out += _section("Template", lines[:5] + (["..."] if len(lines) > 5 else []))
    if info["license"]:
        lines = info["license"].strip().splitlines()
        out += _section("License", lines[:2] + (["..."] if len(lines) > 2 else []))
    if info["adapters"]:
        out += _section("Adapters", info["adapters"])
    return out


def cmd_rm(args) -> int:
    """Remove models; files no other model uses are deleted."""
    from ..server.client import server_request

    store = None if use_server(args) else open_store()
    for name in args.models:
        if store is None:
            server_request("DELETE", "/api/delete", {"model": name})
        else:
            store.remove(name)
        print(f"deleted '{name}'")
    return 0


def cmd_cp(args) -> int:
    """Copy a model under a new name (no file is duplicated)."""
    open_store().copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_create(args) -> int:
    """Create a model from a Modelfile (FROM, PARAMETER, TEMPLATE, SYSTEM, MESSAGE, LICENSE, ADAPTER)."""
    path = Path(args.file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HerdError(f"cannot read the Modelfile {path}: {e}") from None
    with PullProgress() as progress:
        open_store().create(args.model, text, base_dir=path.resolve().parent, progress=progress,
                            quantize=args.quantize)
    return 0



def cmd_ps(args) -> int:
    """List the models a running server (at HERD_HOST) has loaded."""
    from ..server.client import server_request

    rows = [("NAME", "ID", "SIZE", "CONTEXT", "UNTIL")]
    now = time.time()
    for m in server_request("GET", "/api/ps")["models"]:
        rows.append((m["name"], m["digest"].removeprefix("sha256:")[:12], human_size(m["size"]),
                     str(m["context_length"]), human_until(parse_time(m["expires_at"]) - now)))
    print_table(rows)
    return 0


def register(sub, local) -> None:
    pull = sub.add_parser("pull", help="download a model into the store", description=cmd_pull.__doc__,
                          parents=[local])
    pull.add_argument("model", help=f"a name such as {DEFAULT_MODEL}, llama3.2:1b or hf.co/{{user}}/{{repo}}:{{quant}}")
    pull.set_defaults(func=cmd_pull)

    ls = sub.add_parser("list", aliases=["ls"], help="list the models in the store", description=cmd_list.__doc__,
                        parents=[local])
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="show a model's details", description=cmd_show.__doc__, parents=[local])
    show.add_argument("model")
    what = show.add_mutually_exclusive_group()
    what.add_argument("--modelfile", action="store_true", help="print a Modelfile that recreates the model")
    what.add_argument("--parameters", action="store_true", help="print only the parameters")
    what.add_argument("--template", action="store_true", help="print only the chat template")
    what.add_argument("--system", action="store_true", help="print only the system prompt")
    what.add_argument("--license", action="store_true", help="print only the license")
    show.set_defaults(func=cmd_show)

    rm = sub.add_parser("rm", help="remove models", description=cmd_rm.__doc__, parents=[local])
    rm.add_argument("models", nargs="+", metavar="model")
    rm.set_defaults(func=cmd_rm)

    cp = sub.add_parser("cp", help="copy a model under a new name", description=cmd_cp.__doc__)
    cp.add_argument("source")
    cp.add_argument("destination")
    cp.set_defaults(func=cmd_cp)

    create = sub.add_parser("create", help="create a model from a Modelfile", description=cmd_create.__doc__)
    create.add_argument("model")
    create.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default: ./Modelfile)")
    create.add_argument("-q", "--quantize", metavar="TYPE",
                        help="store the weights quantized: q8_0, q4_0 or q4_k (Q4_K_M), as ollama create --quantize")
    create.set_defaults(func=cmd_create)

    ps = sub.add_parser("ps", help="list the models a running server has loaded", description=cmd_ps.__doc__)
    ps.set_defaults(func=cmd_ps)
