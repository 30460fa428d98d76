"""Imports point down: the engine never imports what stands on it (the facade, the server, the CLI,
training, evaluation, safety), not even lazily inside a function."""

import ast
from pathlib import Path

import llamaherd

ABOVE_THE_ENGINE = {"llm", "server", "cli", "train", "eval", "safety"}


def upward_imports(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                # `from ..llm import X` (level 2: llamaherd.llm) or `from .. import llm`
                names = [node.module or ""] if node.level != 1 else []
                if node.module is None and node.level == 2:
                    names = [alias.name for alias in node.names]
                if node.level == 0 and (node.module or "").startswith("llamaherd."):
                    names = [node.module.split(".")[1]]
                found += [f"{path.name}: {name}" for name in names if name.split(".")[0] in ABOVE_THE_ENGINE]
    return found


def test_the_engine_imports_nothing_above_it():
    assert upward_imports(Path(llamaherd.__file__).parent / "engine") == []
