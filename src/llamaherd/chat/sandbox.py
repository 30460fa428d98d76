"""A Jinja sandbox with bounds: chat templates come with model files and (when the server allows
it) with requests, so they are untrusted code that must not take the process down.

Jinja's immutable sandbox already blocks attribute tricks and caps `range()` at 100,000 items.
It does not bound time or memory: `{{ 'x' * 200000000 }}` took 14.7 GB, and two nested
`range(100000)` loops ran for hours. Here:

- every value a template makes by `*`, `+`, `%`, `**`, a call, a filter or a namespace assignment
  is at most `MAX_CHARS` long (checked before the allocation where the size is known in advance);
- the rendered text is at most `MAX_CHARS` characters;
- rendering stops after `MAX_SECONDS`: a trace function on the template's own code (only its
  frames, only while rendering, only in the rendering thread) checks the clock at each line, so
  an empty loop is stopped as surely as one that writes.

A template that hits a bound fails with `TemplateLimit` (a `jinja2.TemplateError`).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Sized
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_CHARS = 16 << 20  # longer than any prompt a context holds (4M tokens at 4 characters each)
MAX_SECONDS = 5.0  # a real template renders a long chat in milliseconds
_TEMPLATE_FILE = "<template>"  # the file name of code Jinja compiles from a string


class TemplateLimit(jinja2.TemplateError):
    """A template went past a bound (size or time)."""


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_CHARS:
        raise TemplateLimit(f"the template made a value of {len(value):,} items (limit {MAX_CHARS:,})")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4096:
        raise TemplateLimit("the template made a number too large")
    return value


def _check_args(args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        _check_size(value)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
            raise TemplateLimit(f"the template passed {value:,} to a function (limit {MAX_CHARS:,})")


def _bounded_filter(f):
    @functools.wraps(f)  # keeps Jinja's pass_context / pass_environment marks
    def bounded(*args, **kwargs):
        _check_args(args, kwargs)
        return _check_size(f(*args, **kwargs))
    return bounded


class BoundedNamespace(Namespace):
    """`namespace()` whose attributes are bounded (`{% set ns.s = ns.s ~ ns.s %}` in a loop)."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, _check_size(value))


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with sizes bounded (see the module's docstring)."""

    intercepted_binops = frozenset(["*", "+", "%", "**", "//"])

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filters = {name: _bounded_filter(f) for name, f in self.filters.items()}
        self.globals["namespace"] = BoundedNamespace

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, Sized) and isinstance(n, int) and len(seq) * max(n, 0) > MAX_CHARS:
                raise TemplateLimit(f"the template repeats a value {n:,} times (limit {MAX_CHARS:,} items)")
        elif operator == "+":
            if isinstance(left, Sized) and isinstance(right, Sized) and len(left) + len(right) > MAX_CHARS:
                raise TemplateLimit(f"the template joins values longer than {MAX_CHARS:,} items")
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64 and isinstance(left, (int, float)) and abs(left) > 1:
                raise TemplateLimit("the template raises a number to a power too large")
        elif operator == "%":
            _check_args(right if isinstance(right, tuple) else (right,), {})
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        _check_args(args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def render_bounded(template: jinja2.Template, seconds: float | None = None, **variables: Any) -> str:
    """Render `template` within `seconds` (default `MAX_SECONDS`) and `MAX_CHARS` characters;
    `TemplateLimit` otherwise."""
    seconds = MAX_SECONDS if seconds is None else seconds
    deadline = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimit(f"the template took longer than {seconds:g} s to render")
        return on_line

    def on_call(frame, event, arg):
        # Only the template's own code is traced: the rest of the process runs at full speed.
        return on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        parts, size = [], 0
        for part in template.generate(**variables):
            size += len(part)
            if size > MAX_CHARS:
                raise TemplateLimit(f"the rendered template is longer than {MAX_CHARS:,} characters")
            parts.append(part)
        return "".join(parts)
    finally:
        sys.settrace(previous)
