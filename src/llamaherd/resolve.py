"""What a user's model argument means, for `herd run` and `llamaherd.load` alike.

A name in the store wins; a name that is not there is pulled first when the catalog knows it (as
`ollama run` does); otherwise an existing file or directory is used as it is. A name that is none
of these is one error that says so, not a hint to pull what cannot be pulled.
"""

from __future__ import annotations

from pathlib import Path

from .errors import HerdError

DEFAULT_MODEL = "smollm2:135m"


def resolve_model(model: str | Path, progress=None):
    """A `store.ResolvedModel` for `model` (a store name, a `.gguf` file, a HF or Meta directory).

    Args:
        model: what the user typed. A `Path` is always a path.
        progress: receives pull progress events (see `Store.pull`) when the model is pulled.
    Returns:
        the stored model (with its parameters, template, system prompt...), or for a path a
        `ResolvedModel` with only `path` set.
    """
    from .store import ModelNotFound, ResolvedModel, Store, parse_name
    from .store.sources import catalog_names

    path = Path(model).expanduser()
    try:
        name = None if isinstance(model, Path) else parse_name(model)
    except HerdError:
        name = None
    if name is not None:
        store = Store()
        if store.has(name) or (not path.exists() and store.pullable(str(model))):
            return store.resolve(str(model), pull=True, progress=progress)
        if not path.exists():
            examples = [DEFAULT_MODEL] + [n for n in catalog_names() if n != DEFAULT_MODEL][:3]
            raise ModelNotFound(str(model),
                f"model '{model}' not found: it is not in the store ({store.root}; see herd list) nor in the "
                f"catalog ({', '.join(examples)}, ... or hf.co/{{user}}/{{repo}}:{{quant}}), "
                "and no file or directory has that name")
    if path.exists():
        return ResolvedModel(name=str(model), path=path, format="")
    raise HerdError(f"model '{model}' not found: give a model name (e.g. {DEFAULT_MODEL}), a .gguf file, "
                    "or a Hugging Face or Meta checkpoint directory")
