"""`herd run MODEL [PROMPT]`: answer a prompt, or chat interactively as `ollama run` does."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from ..errors import HerdError
from .common import DEFAULT_MODEL, resolve_model, server_show, use_server

# The options `/set parameter` takes, with the type its value is read as (SamplingOptions' fields).
PARAMETERS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "seed": int,
              "num_predict": int, "num_ctx": int, "repeat_penalty": float, "repeat_last_n": int,
              "presence_penalty": float, "frequency_penalty": float, "stop": str, "speculate": int}

INTERACTIVE_HELP = """Available commands:
  /set parameter NAME VALUE   set a generation option (temperature, top_k, top_p, min_p, seed,
                              num_predict, num_ctx, repeat_penalty, repeat_last_n, stop, ...)
  /set system TEXT            set the system message
  /set verbose | quiet        show or hide statistics after each reply
  /show info | parameters | system | template | license | modelfile
                              the model's details; parameters: the values in force
  /clear                      forget the conversation
  /bye                        exit (or Ctrl + d)
  /?, /help                   this help
Use \"\"\" to begin and end a multi-line message. Ctrl + c stops a reply."""

SHOW_USAGE = "Usage: /show info | parameters | system | template | license | modelfile"


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
    """Reply events (see `_print_reply`) of the model loaded here; `load_duration` (seconds, the
    load this reply waited for) counts in its total, as in Ollama's."""
    start = time.perf_counter_ns() - int(load_duration * 1e9)
    for chunk in llm.stream(prompt_ids, opts):
        if chunk.done:
            yield {"total_duration": time.perf_counter_ns() - start, "load_duration": int(load_duration * 1e9),
                   "prompt_eval_count": chunk.prompt_eval_count, "prompt_eval_duration": chunk.prompt_eval_duration,
                   "eval_count": chunk.eval_count, "eval_duration": chunk.eval_duration}
        elif chunk.text:
            yield chunk.text


def _server_reply(path: str, body: dict):
    """Reply events (see `_print_reply`) of a server's /api/chat or /api/generate."""
    from ..server.client import server_stream

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
    from ..store import parse_name

    try:
        parse_name(name)
    except HerdError:
        return True
    return Path(name).expanduser().exists()


def cmd_run(args) -> int:
    """Run a model: answer PROMPT and exit, or chat interactively."""
    if args.quantize:  # checked before anything loads; the weights are quantized here, not on a server
        from ..quantize.blocks import check_scheme

        check_scheme(args.quantize)
    if not _names_a_path(args.model) and not args.quantize and use_server(args):
        return _run_on_server(args)
    from ..llm import Llama

    model = resolve_model(args.model)
    if model.adapters:  # LoRA adapters (PEFT directories) merged into the float weights
        from ..export import load_with_adapters

        if args.quantize:
            raise HerdError("--quantize does not apply to a model with adapters (herd create -q writes a quantized copy)")
        llm = load_with_adapters(model.path, model.adapters)
    else:
        llm = Llama.load(model.path, quantize=args.quantize)
    # The model's stored parameters and system prompt apply unless the command line overrides them.
    options = {**model.params, **_options(args)}
    system = args.system if args.system is not None else model.system
    prompt = _read_prompt(args)
    load = [llm.load_duration]  # the first reply reports the load (and counts it in its total), as Ollama's

    def reply(ids, opts, verbose):
        seconds, load[0] = load[0], 0.0
        return _print_reply(_local_reply(llm, ids, opts, seconds), verbose)

    if prompt is not None:
        opts = llm.options(**options)
        if args.raw:
            ids = llm.encode(prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + model.messages + [
                {"role": "user", "content": prompt}]
            ids = llm.fit_chat(messages, opts.num_ctx, model.template)
        reply(ids, opts, args.verbose)
        return 0

    def chat(messages, options, verbose):
        opts = llm.options(**options)
        return reply(llm.fit_chat(messages, opts.num_ctx, model.template), opts, verbose)

    def effective(options):
        return dataclasses.asdict(llm.options(**options))

    return interactive(chat, options, system, args.verbose, model.messages, check=lambda o: llm.options(**o),
                       info=lambda: _local_info(model), effective=effective, stored=model.params)


def _local_info(model) -> dict:
    """What `/show` prints about a model run here: `Store.show` for a stored one, else the file's details."""
    if model.digest:
        from .common import open_store

        return open_store().show(model.name)
    from ..store.details import model_details

    details = model_details(model.path)
    return {"details": {k: v for k, v in details.items() if k != "chat_template"}, "parameters": {},
            "template": details.get("chat_template"), "system": None, "license": details.get("license"),
            "messages": [], "adapters": [], "modelfile": f"FROM {model.path}\n"}


def _run_on_server(args) -> int:
    """`herd run` through a running server: /api/generate for a raw prompt, /api/chat otherwise.
    The server adds the model's stored system prompt and messages; only --system overrides go out."""
    from ..server.client import server_url

    if args.speculate:
        print(f"herd: --speculate runs in this process only; the server at {server_url()} answers without it "
              "(add --local to speculate here)", file=sys.stderr)
        args.speculate = None
    info = server_show(args.model, pull=True)
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
    from ..server.client import server_request

    server_request("POST", "/api/chat", {"model": args.model}, timeout=None)  # load it before the first prompt
    return interactive(chat, options, args.system, args.verbose, check=_check_options, info=lambda: info,
                       effective=_server_effective, stored=info["parameters"])


def _check_options(options: dict) -> None:
    from ..generate import SamplingOptions

    SamplingOptions.from_dict(options)


def _server_effective(options: dict) -> dict:
    from ..generate import SamplingOptions

    return dataclasses.asdict(SamplingOptions.from_dict(options))


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


def _format_parameters(values: dict, stored: dict, options: dict) -> str:
    """`/show parameters`: every option's value in force, and where it comes from."""
    lines = []
    for name, value in values.items():
        if name in options and (name not in stored or options[name] != stored[name]):
            origin = "set"
        elif name in stored:
            origin = "model"
        else:
            origin = "default"
        shown = "(the model's, up to 4096)" if value is None and name == "num_ctx" else (
            "(random)" if value is None and name == "seed" else list(value) if isinstance(value, tuple) else value)
        lines.append(f"{name:<20}{str(shown):<28}{origin}")
    return "\n".join(lines)


def _show(what: str, info: dict | None, values: dict, stored: dict, options: dict) -> str:
    """The text of `/show WHAT`, as `ollama run` prints it."""
    if what == "parameters":
        return _format_parameters(values, stored, options)
    if info is None or what not in ("info", "system", "template", "license", "modelfile"):
        return SHOW_USAGE
    if what == "info":
        from .models import format_show

        return format_show(info).rstrip("\n")
    text = info.get(what)
    return text.rstrip("\n") if text else f"No {what} was specified for this model."


def interactive(chat, options: dict, system: str | None, verbose: bool, start: list[dict] | None = None,
                check=None, info=None, effective=None, stored: dict | None = None) -> int:
    """A chat with history and streaming, like `ollama run`.

    Args:
        chat: `chat(messages, options, verbose)` prints a reply and returns its text.
        options: the options in force (the model's stored ones and the command line's).
        start: the history's beginning (a stored model's MESSAGE lines).
        check: `check(options)` raises HerdError for options that would not do.
        info: `info()` returns the model's details for `/show` (`Store.show`'s shape).
        effective: `effective(options)` returns every option's value in force (`/show parameters`).
        stored: the model's stored parameters (to tell them from the user's).
    Returns:
        the exit status: 0.
    """
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    history: list[dict] = list(start or [])
    stored = dict(stored or {})
    print('Send a message (/? for help)', file=sys.stderr)
    while True:
        try:
            text = _read_message()
        except KeyboardInterrupt:  # as ollama: Ctrl-C at the prompt drops the line and keeps the chat
            print("\nUse Ctrl + d or /bye to exit.", file=sys.stderr)
            continue
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
            elif cmd == "/show":
                values = effective(options) if effective else dict(options)
                try:
                    print(_show(rest.strip(), info() if info else None, values, stored, options))
                except HerdError as e:
                    print(f"Error: {e}")
            elif cmd == "/set":
                what, _, value = rest.strip().partition(" ")
                if what == "system":
                    system = value.strip() or None
                    print("Set system message." if system else "Cleared system message.")
                elif what == "verbose":
                    verbose = True
                    print("Set 'verbose' mode.")
                elif what == "quiet":
                    verbose = False
                    print("Set 'quiet' mode.")
                elif what == "parameter":
                    try:
                        name, parsed = _parse_parameter(value)
                        candidate = {**options, name: parsed}
                        if check is not None:
                            check(candidate)
                    except HerdError as e:
                        print(f"Error: {e}")
                        continue
                    options = candidate
                    print(f"Set parameter '{name}' to '{value.strip().partition(' ')[2].strip()}'")
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


def _parse_parameter(text: str) -> tuple[str, object]:
    """NAME VALUE of `/set parameter`, the value read as the option's type; HerdError otherwise."""
    name, _, raw = text.strip().partition(" ")
    raw = raw.strip()
    if not name:
        raise HerdError("usage: /set parameter NAME VALUE (e.g. /set parameter temperature 0.2)")
    if name not in PARAMETERS:
        raise HerdError(f"unknown parameter '{name}': one of {', '.join(PARAMETERS)}")
    if not raw:
        raise HerdError(f"missing value: /set parameter {name} VALUE")
    kind = PARAMETERS[name]
    if kind is str:
        return name, [raw]
    try:
        return name, kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise HerdError(f"parameter {name} must be {what}, got {raw!r}") from None


# -- the model store: pull, list, show, rm, cp, create --------------------------------------------


def register(sub, local) -> None:
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
    run.add_argument("--quantize", "-q", metavar="TYPE",
                     help="quantize the weights at load for the CPU kernels: q8_0, q4_0 or q4_k (Q4_K_M); runs here")
    run.set_defaults(func=cmd_run)
