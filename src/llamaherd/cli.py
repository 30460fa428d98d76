"""The `herd` command: `herd run MODEL [PROMPT]`, in the manner of `ollama run`.

A user's mistake (a missing file, a corrupt model, a bad option) is one line on stderr and exit
status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import HerdError

DEFAULT_MODEL = "smollm2:135m"

INTERACTIVE_HELP = """Available commands:
  /set parameter NAME VALUE   set a generation option (temperature, top_k, top_p, min_p, seed,
                              num_predict, num_ctx, repeat_penalty, repeat_last_n, stop)
  /set system TEXT            set the system message
  /set verbose | quiet        show or hide statistics after each reply
  /show parameters            show the options in force
  /clear                      forget the conversation
  /bye                        exit
  /?, /help                   this help
Use \"\"\" to begin and end a multi-line message."""


def resolve_model(name: str, progress=None):
    """A `store.ResolvedModel` from what the user typed.

    A model name in the store wins; a name that is not there is pulled first when the catalog knows
    it (as `ollama run` does); otherwise an existing file or directory is used as it is.
    """
    from .store import ResolvedModel, Store, parse_name

    try:
        parsed = parse_name(name)
    except HerdError:
        parsed = None
    path = Path(name).expanduser()
    store = Store()
    if parsed is not None and (store.has(parsed) or not path.exists()):
        with PullProgress() as shown:
            return store.resolve(name, pull=True, progress=progress or shown)
    if path.exists():
        return ResolvedModel(name=name, path=path, format="")
    raise HerdError(f"model '{name}' not found: give a model name (e.g. {DEFAULT_MODEL}), a .gguf file, "
                    "or a Hugging Face or Meta checkpoint directory")


def _options(args) -> dict:
    names = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "num_predict", "num_ctx",
             "speculate")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _print_stats(stats: dict) -> None:
    """`--verbose` statistics on stderr, from a reply's final object (Ollama's names, nanoseconds)."""
    def dur(ns):
        return f"{ns / 1e9:.3f}s" if ns >= 1e9 else f"{ns / 1e6:.2f}ms"

    def rate(count, ns):
        return f"{count / (ns / 1e9):.2f} tokens/s" if ns else "n/a"

    n = {k: stats.get(k) or 0 for k in ("total_duration", "load_duration", "prompt_eval_count",
                                         "prompt_eval_duration", "eval_count", "eval_duration")}
    lines = [
        f"total duration:       {dur(n['total_duration'])}",
        f"load duration:        {dur(n['load_duration'])}",
        f"prompt eval count:    {n['prompt_eval_count']} token(s)",
        f"prompt eval duration: {dur(n['prompt_eval_duration'])}",
        f"prompt eval rate:     {rate(n['prompt_eval_count'], n['prompt_eval_duration'])}",
        f"eval count:           {n['eval_count']} token(s)",
        f"eval duration:        {dur(n['eval_duration'])}",
        f"eval rate:            {rate(n['eval_count'], n['eval_duration'])}",
    ]
    print("\n".join(lines), file=sys.stderr)


def _print_reply(events, verbose: bool, out=None) -> str:
    """Stream a reply to `out` (default: the current stdout) and return its text. `events` are
    text pieces, then the final statistics as a dict (`_local_reply`, `_server_reply`)."""
    out = out or sys.stdout
    text = []
    for event in events:
        if isinstance(event, str):
            text.append(event)
            out.write(event)
            out.flush()
        else:
            out.write("\n")
            out.flush()
            if verbose:
                _print_stats(event)
    return "".join(text)


def _local_reply(llm, prompt_ids, opts, load_duration: float):
    """Reply events (see `_print_reply`) of the model loaded here."""
    start = time.perf_counter_ns()
    for chunk in llm.stream(prompt_ids, opts):
        if chunk.done:
            yield {"total_duration": time.perf_counter_ns() - start, "load_duration": int(load_duration * 1e9),
                   "prompt_eval_count": chunk.prompt_eval_count, "prompt_eval_duration": chunk.prompt_eval_duration,
                   "eval_count": chunk.eval_count, "eval_duration": chunk.eval_duration}
        elif chunk.text:
            yield chunk.text


def _server_reply(path: str, body: dict):
    """Reply events (see `_print_reply`) of a server's /api/chat or /api/generate."""
    from .server.client import server_stream

    for obj in server_stream("POST", path, {**body, "stream": True}):
        if obj.get("done"):
            yield obj
        elif text := (obj["message"].get("content") if "message" in obj else obj.get("response")):
            yield text


def _read_prompt(args) -> str | None:
    if args.prompt is None and not sys.stdin.isatty():
        return sys.stdin.read()
    return args.prompt


def _names_a_path(name: str) -> bool:
    """Whether `herd run NAME` means a file or directory (always run here: a server knows names)."""
    from .store import parse_name

    try:
        parse_name(name)
    except HerdError:
        return True
    return Path(name).expanduser().exists()


def cmd_run(args) -> int:
    """Run a model: answer PROMPT and exit, or chat interactively."""
    if not _names_a_path(args.model) and _use_server(args):
        return _run_on_server(args)
    from .llm import Llama

    model = resolve_model(args.model)
    if model.adapters:
        raise HerdError(f"model '{args.model}' has adapters, which llamaherd cannot apply yet")
    llm = Llama.load(model.path)
    # The model's stored parameters and system prompt apply unless the command line overrides them.
    options = {**model.params, **_options(args)}
    system = args.system if args.system is not None else model.system
    prompt = _read_prompt(args)
    if prompt is not None:
        opts = llm.options(**options)
        if args.raw:
            ids = llm.encode(prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + model.messages + [
                {"role": "user", "content": prompt}]
            ids = llm.fit_chat(messages, opts.num_ctx, model.template)
        _print_reply(_local_reply(llm, ids, opts, llm.load_duration), args.verbose)
        return 0

    def chat(messages, options, verbose):
        opts = llm.options(**options)
        return _print_reply(_local_reply(llm, llm.fit_chat(messages, opts.num_ctx, model.template), opts, 0.0), verbose)

    return interactive(chat, options, system, args.verbose, model.messages, check=lambda o: llm.options(**o))


def _run_on_server(args) -> int:
    """`herd run` through a running server: /api/generate for a raw prompt, /api/chat otherwise.
    The server adds the model's stored system prompt and messages; only --system overrides go out."""
    info = _server_show(args.model, pull=True)
    options = {**info["parameters"], **_options(args)}
    prompt = _read_prompt(args)
    if prompt is not None and args.raw:
        _print_reply(_server_reply("/api/generate", {"model": args.model, "prompt": prompt, "raw": True,
                                                     "options": options}), args.verbose)
        return 0

    def chat(messages, options, verbose):
        return _print_reply(_server_reply("/api/chat", {"model": args.model, "messages": messages,
                                                        "options": options}), verbose)

    if prompt is not None:
        system = [{"role": "system", "content": args.system}] if args.system else []
        chat(system + [{"role": "user", "content": prompt}], options, args.verbose)
        return 0
    from .server.client import server_request

    server_request("POST", "/api/chat", {"model": args.model}, timeout=None)  # load it before the first prompt
    return interactive(chat, options, args.system, args.verbose, check=_check_options)


def _check_options(options: dict) -> None:
    from .generate import SamplingOptions

    SamplingOptions.from_dict(options)


def _read_message() -> str | None:
    """One message from the terminal; \"\"\" starts and ends a multi-line one. None at end of input."""
    try:
        line = input(">>> ")
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    parts = [line.lstrip()[3:]]
    while True:
        if parts[-1].rstrip().endswith('"""') and (len(parts) > 1 or parts[0].strip() not in ("", '"""')):
            parts[-1] = parts[-1].rstrip()[:-3]
            return "\n".join(parts).strip("\n")
        try:
            parts.append(input("... "))
        except EOFError:
            return "\n".join(parts)


def interactive(chat, options: dict, system: str | None, verbose: bool, start: list[dict] | None = None,
                check=None) -> int:
    """A chat with history and streaming, like `ollama run`. `chat(messages, options, verbose)`
    prints a reply and returns its text; `start` begins the history (a stored model's MESSAGE
    lines); `check(options)` raises HerdError for options that would not do."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    history: list[dict] = list(start or [])
    print('Send a message (/? for help)', file=sys.stderr)
    while True:
        text = _read_message()
        if text is None:
            print(file=sys.stderr)
            return 0
        stripped = text.strip()
        if not stripped:
            continue
        if stripped.startswith("/"):
            cmd, _, rest = stripped.partition(" ")
            if cmd == "/bye":
                return 0
            if cmd in ("/?", "/help"):
                print(INTERACTIVE_HELP)
            elif cmd == "/clear":
                history.clear()
                print("Cleared session context")
            elif cmd == "/show" and rest.strip() == "parameters":
                print("\n".join(f"{k} {v}" for k, v in options.items()) or "(defaults)")
            elif cmd == "/set":
                what, _, value = rest.strip().partition(" ")
                if what == "system":
                    system = value.strip() or None
                    print("Set system message.")
                elif what == "verbose":
                    verbose = True
                    print("Set 'verbose' mode.")
                elif what == "quiet":
                    verbose = False
                    print("Set 'quiet' mode.")
                elif what == "parameter":
                    name, _, raw = value.strip().partition(" ")
                    try:
                        candidate = {**options, name: _parse_value(name, raw.strip())}
                        if check is not None:
                            check(candidate)
                    except HerdError as e:
                        print(f"Error: {e}")
                        continue
                    options = candidate
                    print(f"Set parameter '{name}' to '{raw.strip()}'")
                else:
                    print("Usage: /set parameter NAME VALUE | /set system TEXT | /set verbose | /set quiet")
            else:
                print(f"Unknown command '{cmd}'. Type /? for help")
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            reply = chat(messages, options, verbose)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            print()
            history.pop()
            continue
        except HerdError as e:
            print(f"Error: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def _parse_value(name: str, raw: str):
    if name == "stop":
        return [raw]
    if name in ("seed", "top_k", "num_predict", "num_ctx", "repeat_last_n"):
        try:
            return int(raw)
        except ValueError:
            raise HerdError(f"parameter {name} must be an integer, got {raw!r}") from None
    try:
        return float(raw)
    except ValueError:
        raise HerdError(f"unknown parameter or bad value: {name} {raw!r}") from None


# -- the model store: pull, list, show, rm, cp, create --------------------------------------------


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


def _store():
    from .store import Store

    return Store()


def _use_server(args) -> bool:
    """Whether a command goes through a running `herd serve`, as `ollama` does: yes when one answers
    at HERD_HOST, unless --local or HERD_LOCAL=1 keeps it here."""
    if getattr(args, "local", False) or os.environ.get("HERD_LOCAL", "").lower() not in ("", "0", "false", "no"):
        return False
    from .server.client import server_available

    return server_available()


def _server_show(name: str, pull: bool = False) -> dict:
    """A server's /api/show as `Store.show` answers: parameters, messages and adapters read back
    from its Modelfile, the rest from its fields. With `pull`, a missing model is pulled first."""
    from .server.client import ServerError, server_request
    from .store.modelfile import parse_modelfile

    try:
        r = server_request("POST", "/api/show", {"model": name})
    except ServerError as e:
        if not (pull and e.status == 404):
            raise
        _server_pull(name)
        r = server_request("POST", "/api/show", {"model": name})
    mf = parse_modelfile(r["modelfile"])
    facts, d = r.get("model_info", {}), r.get("details", {})
    arch = facts.get("general.architecture")
    details = {"architecture": arch, "parameter_size": d.get("parameter_size") or None,
               "context_length": facts.get(f"{arch}.context_length"),
               "embedding_length": facts.get(f"{arch}.embedding_length"),
               "quantization": d.get("quantization_level") or None}
    return {"details": details, "parameters": mf.parameters, "template": r.get("template") or None,
            "system": r.get("system"), "license": r.get("license"), "messages": mf.messages,
            "adapters": mf.adapters, "modelfile": r["modelfile"]}


def _server_pull(name: str) -> None:
    from .server.client import server_stream

    with PullProgress() as progress:
        for event in server_stream("POST", "/api/pull", {"model": name, "stream": True}):
            progress(event)


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, four spaces apart (the last one unpadded), as Ollama's."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths)) + "    " + r[-1])


def _seconds(rfc3339: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def cmd_pull(args) -> int:
    """Download a model into the store (catalog names, hf.co/{user}/{repo}:{quant}) and verify it."""
    if _use_server(args):
        _server_pull(args.model)
        return 0
    with PullProgress() as progress:
        _store().pull(args.model, progress)
    return 0


def cmd_list(args) -> int:
    """List the models in the store."""
    if _use_server(args):
        from .server.client import server_request

        models = [(m["name"], m["digest"][:12], m["size"], _seconds(m["modified_at"]))
                  for m in server_request("GET", "/api/tags")["models"]]
    else:
        models = [(m.name, m.id, m.size, m.modified) for m in _store().list()]
    now = time.time()
    _print_table([("NAME", "ID", "SIZE", "MODIFIED")] +
                 [(name, id, human_size(size), human_ago(now - modified)) for name, id, size, modified in models])
    return 0


def _section(title: str, lines: list[str]) -> str:
    return f"  {title}\n" + "".join(f"    {line}\n" for line in lines) + "\n"


def cmd_show(args) -> int:
    """Show a model's details, parameters, template, system prompt and license."""
    info = _server_show(args.model) if _use_server(args) else _store().show(args.model)
    if args.modelfile:
        print(info["modelfile"], end="")
        return 0
    for flag in ("template", "system", "license"):
        if getattr(args, flag):
            print(info[flag] or "")
            return 0
    from .store.modelfile import format_value

    params = [(k, json.dumps(v) if isinstance(v, str) else format_value(v))
              for k, vs in info["parameters"].items() for v in (vs if isinstance(vs, list) else [vs])]
    if args.parameters:
        print("\n".join(f"{k:<16}{v}" for k, v in params))
        return 0
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
    print(out, end="")
    return 0


def cmd_rm(args) -> int:
    """Remove models; files no other model uses are deleted."""
    from .server.client import server_request

    store = None if _use_server(args) else _store()
    for name in args.models:
        if store is None:
            server_request("DELETE", "/api/delete", {"model": name})
        else:
            store.remove(name)
        print(f"deleted '{name}'")
    return 0


def cmd_cp(args) -> int:
    """Copy a model under a new name (no file is duplicated)."""
    _store().copy(args.source, args.destination)
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
        _store().create(args.model, text, base_dir=path.resolve().parent, progress=progress)
    return 0


def cmd_serve(args) -> int:
    """Serve the Ollama API (/api/...) and the OpenAI API (/v1/...) over one batching engine.

    Settings come from the environment: HERD_HOST (default 127.0.0.1:11434), HERD_ORIGINS,
    HERD_API_KEY, HERD_MAX_QUEUE, HERD_MAX_LOADED_MODELS, HERD_MAX_MEMORY, HERD_KEEP_ALIVE,
    HERD_NUM_PARALLEL, HERD_CONTEXT_LENGTH, HERD_MAX_BODY, HERD_NUM_THREADS, HERD_HOME
    (see llamaherd.server.app)."""
    from .server.app import serve

    serve()
    return 0


def cmd_ps(args) -> int:
    """List the models a running server (at HERD_HOST) has loaded."""
    from .server.client import server_request

    rows = [("NAME", "ID", "SIZE", "CONTEXT", "UNTIL")]
    for m in server_request("GET", "/api/ps")["models"]:
        until = "Forever" if m["expires_at"].startswith("2318") else m["expires_at"]
        rows.append((m["name"], m["digest"][:12], human_size(m["size"]), str(m["context_length"]), until))
    _print_table(rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd", description="Run Llama 3 family models locally.",
        epilog="run, pull, list, show and rm go through a server running at HERD_HOST when one answers; "
               "--local or HERD_LOCAL=1 keeps them in this process.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    local = argparse.ArgumentParser(add_help=False)
    local.add_argument("--local", action="store_true",
                       help="work here even when a server answers at HERD_HOST (also: HERD_LOCAL=1)")

    run = sub.add_parser("run", help="run a model: answer a prompt, or chat", description=cmd_run.__doc__,
                         parents=[local])
    run.add_argument("model", help=f"a model name ({DEFAULT_MODEL}; pulled if missing), a .gguf file, "
                     "or a HF or Meta checkpoint directory")
    run.add_argument("prompt", nargs="?", help="answer this and exit (default: interactive chat)")
    run.add_argument("--raw", action="store_true", help="do not apply the chat template")
    run.add_argument("--system", help="system message")
    run.add_argument("--temperature", type=float)
    run.add_argument("--top-k", dest="top_k", type=int)
    run.add_argument("--top-p", dest="top_p", type=float)
    run.add_argument("--min-p", dest="min_p", type=float)
    run.add_argument("--repeat-penalty", dest="repeat_penalty", type=float)
    run.add_argument("--seed", type=int)
    run.add_argument("--num-predict", dest="num_predict", type=int, help="maximum tokens to generate")
    run.add_argument("--num-ctx", dest="num_ctx", type=int, help="context window in tokens")
    run.add_argument("--speculate", type=int, metavar="N",
                     help="at temperature 0, check up to N tokens guessed by prompt lookup in one step "
                          "(same output; faster when the reply repeats its prompt or itself; not on a server)")
    run.add_argument("--verbose", action="store_true", help="print timings and token rates on stderr")
    run.set_defaults(func=cmd_run)

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
    create.set_defaults(func=cmd_create)

    serve = sub.add_parser("serve", help="serve the Ollama and OpenAI APIs", description=cmd_serve.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.set_defaults(func=cmd_serve)

    ps = sub.add_parser("ps", help="list the models a running server has loaded", description=cmd_ps.__doc__)
    ps.set_defaults(func=cmd_ps)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except HerdError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `herd run ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
