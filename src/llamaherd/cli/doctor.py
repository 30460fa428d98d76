"""`herd doctor`: verify the model store (every manifest, every blob it names) and say what is wrong."""

from __future__ import annotations

import sys

from .common import open_store


def cmd_doctor(args) -> int:
    """Verify every model in the store: its manifest reads, and each blob it names is there with
    the right size and sha256. Prints what is wrong (exit status 1), or that all is well."""
    store = open_store()
    print(f"checking the store at {store.root} ...", file=sys.stderr, flush=True)
    problems = store.check()
    models = store.list()
    for name, problem in problems:
        print(f"{name}: {problem}")
    if problems:
        broken = len({name for name, _ in problems})
        print(f"{broken} of {len(models)} model(s) have problems: pull or create them again, or remove them "
              "with herd rm (their blobs are kept until then)", file=sys.stderr)
        return 1
    print(f"ok: {len(models)} model(s), every manifest and blob verified")
    return 0


def register(sub, local) -> None:
    doctor = sub.add_parser("doctor", help="verify the model store", description=cmd_doctor.__doc__)
    doctor.set_defaults(func=cmd_doctor)
