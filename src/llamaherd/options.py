"""The one validation of generation options, for every way they arrive: the CLI (`/set parameter`),
a Modelfile's PARAMETER lines, `/api/create`'s `parameters`, and both APIs' request options.

A value that passes here samples without a NaN or an infinity: temperature 1e-300 (the logits
divided by it overflow), repeat_penalty 0 (a division by zero), frequency_penalty -1e300 (an
infinite logit), min_p 5 (every token dropped) and NaN anywhere are refused with a message that
names the option and its range. Importing this module does not import torch (the store uses it).
"""

from __future__ import annotations

import math
from typing import Any

from .errors import HerdError

MAX_TOKENS = 1 << 24  # no context is longer (Llama 3.1's is 131,072); bounds num_ctx and friends
MAX_STOPS = 64  # stop strings a request may give
MAX_STOP_CHARS = 1000  # characters in one stop string

# name: (kind, lowest, highest). Ranges are where sampling is well defined, wider than the usual
# ones (OpenAI's penalties are -2..2) so that no client's reasonable value is refused.
RULES: dict[str, tuple[type, float | None, float | None]] = {
    "temperature": (float, 0.0, 100.0),
    "top_k": (int, 0, MAX_TOKENS),
    "top_p": (float, 0.0, 1.0),
    "min_p": (float, 0.0, 1.0),
    "repeat_penalty": (float, 0.01, 100.0),
    "repeat_last_n": (int, -1, MAX_TOKENS),
    "presence_penalty": (float, -100.0, 100.0),
    "frequency_penalty": (float, -100.0, 100.0),
    "seed": (int, -(1 << 63), (1 << 64) - 1),  # what torch.Generator.manual_seed takes
    "num_predict": (int, -2, MAX_TOKENS),
    "num_ctx": (int, 1, MAX_TOKENS),
    "speculate": (int, 0, 64),
    "stop": (list, None, None),
}
# Below this a temperature divides logits (up to ~1e2) past float32's range: 0 (greedy) or more.
MIN_TEMPERATURE = 1e-4


def check_option(name: str, value: Any) -> Any:
    """`value` as the option `name` takes it (an int, a float, a tuple of stop strings), or a
    `HerdError` saying what is wrong. Integral floats are accepted for integers (JSON has one
    number type); booleans, strings, NaN and infinities are not numbers here."""
    rule = RULES.get(name)
    if rule is None:
        raise HerdError(f"unknown option {name!r}; known: {', '.join(sorted(RULES))}")
    kind, lo, hi = rule
    if kind is list:
        return _stops(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or (kind is int and value != int(value)):
        raise HerdError(f"option {name} must be {'an integer' if kind is int else 'a finite number'}, got {value!r}")
    value = kind(value)
    if not lo <= value <= hi:
        raise HerdError(f"option {name} must be between {_show(lo)} and {_show(hi)}, got {value!r}")
    if name == "temperature" and 0 < value < MIN_TEMPERATURE:
        raise HerdError(f"option temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {value!r}")
    return value


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise HerdError("option stop must be a string or a list of strings")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise HerdError(f"option stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
    return tuple(s for s in stops if s)


def check_options(options: Any, unknown: str = "ignore") -> dict[str, Any]:
    """A dict of options, each checked by `check_option` (None values dropped).

    Args:
        options: name -> value, as a request or a Modelfile gives them.
        unknown: "ignore" (the APIs: Ollama's options hold many that have no effect here) or
            "error" (what is stored with a model: a typo would be kept for good).
    Returns:
        The checked values; `stop` as a list (it is stored as JSON).
    """
    if not isinstance(options, dict):
        raise HerdError("options must be an object")
    out = {}
    for name, value in options.items():
        if name not in RULES:
            if unknown == "error":
                check_option(name, value)  # raises, naming the known ones
            continue
        if value is not None:
            checked = check_option(name, value)
            out[name] = list(checked) if name == "stop" else checked
    return out
