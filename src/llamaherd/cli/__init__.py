"""The `herd` command, one module per group of verbs (each has `register(sub, local)`).

A user's mistake (a missing file, a corrupt model, a bad option) is one line on stderr and exit
status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import HerdError
from .common import IntermixedParser
from . import data, doctor, eval as evaluation, export, guard, models, reward, run, serve, train

# The verb groups, in the order `herd --help` lists them. A new group is a module with
# `register(sub, local)` added here.
COMMANDS = (run, models, doctor, serve, train, reward, export, data, evaluation, guard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd", description="Run Llama 3 family models locally.",
        epilog="run, pull, list, show and rm go through a server running at HERD_HOST when one answers; "
               "--local or HERD_LOCAL=1 keeps them in this process.")
    parser.add_argument("-v", "--version", action="version", version=f"herd version {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=IntermixedParser)
    local = argparse.ArgumentParser(add_help=False)
    local.add_argument("--local", action="store_true",
                       help="work here even when a server answers at HERD_HOST (also: HERD_LOCAL=1)")
    for group in COMMANDS:
        group.register(sub, local)
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
    except OSError as e:  # a storage fault (read-only, full disk, permissions): one line too
        if e.strerror is None:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"Error: {e.strerror}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `herd run ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
