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
    names = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "num_predict", "num_ctx")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _print_stats(chunk, load_duration: float, total_ns: int) -> None:
    def dur(ns):
        return f"{ns / 1e9:.3f}s" if ns >= 1e9 else f"{ns / 1e6:.2f}ms"

    def rate(count, ns):
        return f"{count / (ns / 1e9):.2f} tokens/s" if ns else "n/a"

    lines = [
        f"total duration:       {dur(total_ns)}",
        f"load duration:        {dur(int(load_duration * 1e9))}",
        f"prompt eval count:    {chunk.prompt_eval_count} token(s)",
        f"prompt eval duration: {dur(chunk.prompt_eval_duration)}",
        f"prompt eval rate:     {rate(chunk.prompt_eval_count, chunk.prompt_eval_duration)}",
        f"eval count:           {chunk.eval_count} token(s)",
        f"eval duration:        {dur(chunk.eval_duration)}",
        f"eval rate:            {rate(chunk.eval_count, chunk.eval_duration)}",
    ]
    print("\n".join(lines), file=sys.stderr)


def _reply(llm, prompt_ids, opts, verbose: bool, load_duration: float, out=None) -> str:
    """Stream one reply to `out` (default: the current stdout); return its text."""
    out = out or sys.stdout
    start = time.perf_counter_ns()
    text = []
    for chunk in llm.stream(prompt_ids, opts):
        if chunk.done:
            out.write("\n")
            out.flush()
            if verbose:
                _print_stats(chunk, load_duration, time.perf_counter_ns() - start)
        elif chunk.text:
            text.append(chunk.text)
            out.write(chunk.text)
            out.flush()
    return "".join(text)


def cmd_run(args) -> int:
    """Run a model: answer PROMPT and exit, or chat interactively."""
    from .llm import Llama

    model = resolve_model(args.model)
    if model.adapters:
        raise HerdError(f"model '{args.model}' has adapters, which llamaherd cannot apply yet")
    llm = Llama.load(model.path)
    # The model's stored parameters and system prompt apply unless the command line overrides them.
    options = {**model.params, **_options(args)}
    system = args.system if args.system is not None else model.system
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is not None:
        opts = llm.options(**options)
        if args.raw:
            ids = llm.encode(prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + model.messages + [
                {"role": "user", "content": prompt}]
            ids = llm.fit_chat(messages, opts.num_ctx, model.template)
        _reply(llm, ids, opts, args.verbose, llm.load_duration)
        return 0
    return interactive(llm, options, system, args.verbose, model.template, model.messages)


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


def interactive(llm, options: dict, system: str | None, verbose: bool, template: str | None = None,
                start: list[dict] | None = None) -> int:
    """A chat with history and streaming, like `ollama run`. `start` begins the history (a stored
    model's MESSAGE lines); `template` overrides the model's chat template."""
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
                        llm.options(**candidate)
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
            opts = llm.options(**options)
            reply = _reply(llm, llm.fit_chat(messages, opts.num_ctx, template), opts, verbose, 0.0)
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


def cmd_pull(args) -> int:
    """Download a model into the store (catalog names, hf.co/{user}/{repo}:{quant}) and verify it."""
    with PullProgress() as progress:
        _store().pull(args.model, progress)
    return 0


def cmd_list(args) -> int:
    """List the models in the store."""
    rows = [("NAME", "ID", "SIZE", "MODIFIED")]
    now = time.time()
    for m in _store().list():
        rows.append((m.name, m.id, human_size(m.size), human_ago(now - m.modified)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths)) + "    " + r[3])
    return 0


def _section(title: str, lines: list[str]) -> str:
    return f"  {title}\n" + "".join(f"    {line}\n" for line in lines) + "\n"


def cmd_show(args) -> int:
    """Show a model's details, parameters, template, system prompt and license."""
    info = _store().show(args.model)
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
    store = _store()
    for name in args.models:
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
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths)) + "    " + r[4])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Run Llama 3 family models locally.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a model: answer a prompt, or chat", description=cmd_run.__doc__)
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
    run.add_argument("--verbose", action="store_true", help="print timings and token rates on stderr")
    run.set_defaults(func=cmd_run)

    pull = sub.add_parser("pull", help="download a model into the store", description=cmd_pull.__doc__)
    pull.add_argument("model", help=f"a name such as {DEFAULT_MODEL}, llama3.2:1b or hf.co/{{user}}/{{repo}}:{{quant}}")
    pull.set_defaults(func=cmd_pull)

    ls = sub.add_parser("list", aliases=["ls"], help="list the models in the store", description=cmd_list.__doc__)
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="show a model's details", description=cmd_show.__doc__)
    show.add_argument("model")
    what = show.add_mutually_exclusive_group()
    what.add_argument("--modelfile", action="store_true", help="print a Modelfile that recreates the model")
    what.add_argument("--parameters", action="store_true", help="print only the parameters")
    what.add_argument("--template", action="store_true", help="print only the chat template")
    what.add_argument("--system", action="store_true", help="print only the system prompt")
    what.add_argument("--license", action="store_true", help="print only the license")
    show.set_defaults(func=cmd_show)

    rm = sub.add_parser("rm", help="remove models", description=cmd_rm.__doc__)
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
