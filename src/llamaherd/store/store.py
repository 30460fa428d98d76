"""`Store`: named models on disk — pull, list, show, resolve, remove, copy, create.

    $HERD_HOME/                    (default ~/.llamaherd)
      blobs/sha256-<hex>           content-addressed files, shared between models
      manifests/<host>/<namespace>/<model>/<tag>
      models/<key>/                directory models (HF / Meta) as symlinks to their blobs
      partial/<key>/               downloads in progress (kept so an interrupted pull can resume)
      locks/                       flock files

Crash safety: sources download into `partial/`; only when every file is there and verified does
the store take its lock, move the files into `blobs/` (`os.replace`) and write the manifest
(atomically, last). A pull killed at any earlier point leaves no blob and no manifest behind. Two
pulls of the same source take turns on a per-source lock; the second finds the blobs present. The
store lock also covers `remove`'s garbage collection, so it can't free a blob a pull is committing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import HerdError, ModelNotFound
from ..formats import GGUF_MAGIC
from . import manifest as mt
from .blobs import BlobStore, atomic_write, copy_hashing, digest_bytes, digest_file, file_lock
from .details import model_details
from .manifest import Layer, Manifest
from .modelfile import Modelfile, check_definition, check_parameters, format_modelfile, parse_modelfile
from .names import ModelName, parse_name
from .sources import HF_MODEL_FILES, Fetched, Progress, Source, catalog_names, catalog_source

_BLOB_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_DIGEST_IN_TEXT = re.compile(rb"sha256[:-]([0-9a-f]{64})")


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def herd_home() -> Path:
    """The store's folder: `$HERD_HOME`, else `~/.llamaherd`."""
    from .. import settings

    return settings.home()


@dataclass
class ResolvedModel:
    """Everything needed to run a stored model.

    Attributes:
        name: the model's name (`smollm2:135m`).
        path: what `llamaherd.load()` takes: the GGUF blob, or a directory of links to the blobs.
        format: "gguf", "safetensors" or "meta".
        params: stored generation options (`{"temperature": 0.0, "stop": [...]}`).
        system: stored system prompt, or None.
        template: stored Jinja chat template, or None (the model's own applies).
        messages: stored conversation that starts every chat (`[{"role", "content"}]`).
        license: stored license text(s), or None.
        adapters: paths of LoRA adapters (files or directories).
        digest: the manifest's `sha256:<hex>`.
        details: architecture, parameter count, context length, quantization... (see `model_details`).
    """

    name: str
    path: Path
    format: str
    params: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    template: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    license: str | None = None
    adapters: list[Path] = field(default_factory=list)
    digest: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelEntry:
    """A line of `herd list`: name, manifest digest, total size, modification time (POSIX seconds),
    and for a model that cannot be read (a damaged manifest or config), what is wrong with it."""

    name: str
    digest: str
    size: int
    modified: float
    details: dict[str, Any]
    error: str | None = None

    @property
    def id(self) -> str:
        """The short id Ollama shows: 12 hex digits of the manifest digest."""
        return self.digest.removeprefix("sha256:")[:12]


def _training_output(path: Path) -> tuple[Path, Path | None]:
    """What FROM a `herd train` output directory (one with train.json) means: a full run's
    `model/`; a LoRA run's base model (train.json's `model_path`) with its `adapter/` as an
    ADAPTER. Returns (model path, adapter or None); any other path is returned as it is."""
    if not (path / "train.json").is_file():
        return path, None
    if (path / "model").is_dir():
        return path / "model", None
    try:
        base = json.loads((path / "train.json").read_text()).get("model_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not (path / "adapter").is_dir() or not isinstance(base, str):
        raise HerdError(f"{path} is a training output with neither model/ nor adapter/ and its base model "
                        "in train.json")
    if not Path(base).exists():
        raise HerdError(f"{path}: its base model {base} (train.json) is not on this disk")
    return Path(base), path / "adapter"


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _no_progress(event: dict[str, Any]) -> None:
    pass


@contextmanager
def _disk_errors(root: Path) -> Iterator[None]:
    """A full disk, a read-only store or one we may not write as a one-line error (what was
    written so far stays under partial/)."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"no space left on the disk of {root}: free some and try again "
                               "(a download resumes where it stopped)", 507) from None
        if e.errno == errno.EROFS:
            raise StorageError(f"the model store {root} is on a read-only file system") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise StorageError(f"no permission to write in the model store {root}") from None
        raise


class StorageError(HerdError):
    """The store's disk refused a write (full, read-only, no permission): the server's condition,
    not the client's mistake, so a server answers `status` (507 full, else 503)."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


class Store:
    """The model store under `root` (default `herd_home()`).

    `catalog` maps a name to a `Source` (or None); tests and embedders may give their own.
    """

    def __init__(self, root: str | Path | None = None,
                 catalog: Callable[[ModelName], Source | None] = catalog_source):
        self.root = Path(root).expanduser() if root else herd_home()
        self.blobs = BlobStore(self.root / "blobs")
        self.catalog = catalog

    # -- paths and locks ------------------------------------------------------------------

    def _manifest_path(self, name: ModelName) -> Path:
        return self.root.joinpath("manifests", *name.key())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The store lock: held to commit a model and to collect garbage."""
        with file_lock(self.root / "locks" / "store.lock"):
            yield

    # -- reading --------------------------------------------------------------------------

    def has(self, name: str | ModelName) -> bool:
        """Whether the store holds `name`."""
        n = parse_name(name) if isinstance(name, str) else name
        return self._manifest_path(n).is_file()

    def _read(self, name: str | ModelName) -> tuple[ModelName, Manifest, bytes]:
        n = parse_name(name) if isinstance(name, str) else name
        path = self._manifest_path(n)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ModelNotFound(name, f"model '{name}' not found, try pulling it first: herd pull {name}") from None
        return n, Manifest.from_bytes(data, f"the manifest of {n.display()}"), data

    def _text(self, layer: Layer | None) -> str | None:
        return None if layer is None else self.blobs.read_bytes(layer.digest).decode("utf-8")

    def _json(self, layer: Layer | None, default):
        if layer is None:
            return default
        try:
            return json.loads(self.blobs.read_bytes(layer.digest))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HerdError(f"blob {layer.digest} is corrupt: {e}") from None

    def _details(self, manifest: Manifest) -> dict[str, Any]:
        details = self._json(manifest.config, {})
        if not isinstance(details, dict):  # valid JSON, but not the object a config is
            raise HerdError(f"blob {manifest.config.digest} is corrupt: the model's config is not a JSON object")
        return details

    def _manifest_files(self) -> Iterator[Path]:
        """Every manifest file (a name's `<host>/<namespace>/<model>/<tag>`)."""
        base = self.root / "manifests"
        for path in sorted(base.glob("*/*/*/*")) if base.is_dir() else []:
            if path.is_file() and not path.name.startswith("."):
                yield path

    def _display_name(self, path: Path) -> str:
        """The name a manifest file stands for (its path's parts, if they are not a valid name)."""
        parts = path.relative_to(self.root / "manifests").parts
        try:
            return parse_name(_name_from_parts(*parts)).display()
        except HerdError:
            return "/".join(parts)

    def list(self) -> list[ModelEntry]:
        """Every model in the store, most recently modified first. A model that cannot be read is
        listed too, with `error` saying why (it is never hidden: its blobs are still kept)."""
        entries = []
        for path in self._manifest_files():
            name = self._display_name(path)
            try:
                data = path.read_bytes()
            except OSError as e:
                entries.append(ModelEntry(name, "", 0, 0.0, {}, f"cannot read its manifest: {e.strerror}"))
                continue
            modified = path.stat().st_mtime
            try:
                manifest = Manifest.from_bytes(data, "its manifest")
                details = {k: v for k, v in self._details(manifest).items() if k != "chat_template"}
            except HerdError as e:
                entries.append(ModelEntry(name, digest_bytes(data), len(data), modified, {}, str(e)))
                continue
            entries.append(ModelEntry(name, digest_bytes(data), manifest.size, modified, details))
        return sorted(entries, key=lambda e: (-e.modified, e.name))

    def resolve(self, name: str, pull: bool = False, progress: Progress | None = None) -> ResolvedModel:
        """A stored model, ready to load. With `pull`, a model not in the store is pulled first
        if the catalog knows it; otherwise `ModelNotFound`."""
        n = parse_name(name)
        if not self.has(n) and pull and self.catalog(n) is not None:
            self.pull(name, progress)
        n, manifest, data = self._read(name)
        details = self._details(manifest)
        model_layers = manifest.of_type(mt.MODEL)
        if not model_layers:
            raise HerdError(f"model '{name}' has no weights in its manifest")
        adapters = []
        for group in sorted({l.group for l in manifest.of_type(mt.ADAPTER)}):
            adapters.append(self._materialise([l for l in manifest.of_type(mt.ADAPTER) if l.group == group]))
        licenses = [self._text(l) for l in manifest.of_type(mt.LICENSE)]
        return ResolvedModel(
            name=n.display(),
            path=self._materialise(model_layers),
            format=details.get("format", "gguf"),
            params=self._json(manifest.first(mt.PARAMS), {}),
            system=self._text(manifest.first(mt.SYSTEM)),
            template=self._text(manifest.first(mt.TEMPLATE)),
            messages=self._json(manifest.first(mt.MESSAGES), []),
            license="\n\n".join(licenses) if licenses else None,
            adapters=adapters,
            digest=digest_bytes(data),
            details={k: v for k, v in details.items() if k != "chat_template"},
        )

    def show(self, name: str) -> dict[str, Any]:
        """What `herd show` prints, as data: details, parameters, template (the stored one, else
        the model's own), system, license (stored, else the model's), messages, adapters, the path
        of the weights, and the Modelfile that recreates the model."""
        model = self.resolve(name)
        _, manifest, _ = self._read(name)
        details = self._details(manifest)
        return {
            "name": model.name,
            "digest": model.digest,
            "size": manifest.size,
            "details": model.details,
            "parameters": model.params,
            "template": model.template if model.template is not None else details.get("chat_template"),
            "system": model.system,
            "license": model.license if model.license is not None else details.get("license"),
            "messages": model.messages,
            "adapters": [str(p) for p in model.adapters],
            "path": str(model.path),
            "modelfile": self.modelfile(name),
        }

    def modelfile(self, name: str) -> str:
        """A Modelfile that recreates `name` (its FROM is the stored weights)."""
        model = self.resolve(name)
        mf = Modelfile(from_=str(model.path), parameters=model.params, template=model.template,
                       system=model.system, messages=model.messages,
                       licenses=[self._text(l) for l in self._read(name)[1].of_type(mt.LICENSE)],
                       adapters=[str(p) for p in model.adapters])
        comment = ('Modelfile generated by "herd show"\n'
                   "To build a new Modelfile based on this, replace FROM with:\n"
                   f"FROM {model.name}")
        return format_modelfile(mf, comment)

    # -- pulling --------------------------------------------------------------------------

    def source(self, name: str | ModelName) -> Source:
        """Where `name` would be pulled from; `ModelNotFound` if nowhere."""
        n = parse_name(name) if isinstance(name, str) else name
        src = self.catalog(n)
        if src is None:
            raise ModelNotFound(name, f"model '{name}' is not in the catalog: pull one of {', '.join(catalog_names())} "
                                "or hf.co/{user}/{repo}:{quant}, or make one with herd create")
        return src

    def pullable(self, name: str) -> bool:
        """Whether `pull(name)` knows where to look (it may still fail to download)."""
        return self.catalog(parse_name(name)) is not None

    def pull(self, name: str, progress: Progress | None = None) -> str:
        """Fetch `name` from its source, verify it and store it; returns the manifest digest.

        `progress` receives Ollama-style events: `{"status": "pulling manifest"}`, then per file
        `{"status": "pulling <12 hex>", "digest", "total", "completed"}`, `{"status": "verifying
        sha256 digest"}`, `{"status": "writing manifest"}` and finally `{"status": "success"}`.
        """
        progress = progress or _no_progress
        n = parse_name(name)
        source = self.source(n)
        progress({"status": "pulling manifest"})
        key = _key(source.key)
        work = self.root / "partial" / key
        with _disk_errors(self.root), file_lock(self.root / "locks" / f"pull-{key}.lock"):
            work.mkdir(parents=True, exist_ok=True)
            try:
                files = source.fetch(work, self.blobs, progress)
            except BaseException:
                _remove_if_empty(work)  # keep only what a retry can resume from
                raise
            details = self._details_of(files, work)
            progress({"status": "writing manifest"})
            digest = self._commit(n, files, details, source=source.describe(), params=getattr(source, "params", None))
            shutil.rmtree(work, ignore_errors=True)
        progress({"status": "success"})
        return digest

    def _details_of(self, files: list[Fetched], work: Path) -> dict[str, Any]:
        """Model details of fetched files, before they are blobs."""
        paths = {f.name: f.path or self.blobs.path(f.digest) for f in files}
        if len(files) == 1 and files[0].name is None:
            return model_details(paths[None])
        if None in paths:
            raise HerdError("a model is either one file or a directory of named files")
        with tempfile.TemporaryDirectory(dir=work, prefix=".details-") as tmp:
            for name, path in paths.items():
                os.symlink(path.resolve(), Path(tmp) / name)
            return model_details(Path(tmp))

    def _put(self, f: Fetched, media_type: str, group: int = 0) -> Layer:
        """Commit one fetched file as a blob (store lock held) and return its layer."""
        if f.path is not None:
            self.blobs.commit(f.path, f.digest)
        elif not self.blobs.has(f.digest):
            raise HerdError(f"blob {f.digest} disappeared while the model was being stored "
                            "(removed by a concurrent herd rm?); try again")
        return Layer(media_type, f.digest, f.size, f.name, group)

    def _small(self, media_type: str, data: bytes) -> Layer:
        return Layer(media_type, self.blobs.put_bytes(data), len(data))

    def _commit(self, name: ModelName, files: list[Fetched], details: dict[str, Any], *, source: str,
                params: dict | None = None, template: str | None = None, system: str | None = None,
                messages: list | None = None, licenses: list[str] = (),
                adapters: list[list[Fetched]] = ()) -> str:
        """Move files into blobs and write the manifest of `name`, atomically; returns its digest."""
        with self._locked():
            layers = [self._put(f, mt.MODEL) for f in files]
            for group, adapter in enumerate(adapters, 1):
                layers += [self._put(f, mt.ADAPTER, group) for f in adapter]
            if params:
                layers.append(self._small(mt.PARAMS, json.dumps(params, indent=2).encode()))
            if template is not None:
                layers.append(self._small(mt.TEMPLATE, template.encode()))
            if system is not None:
                layers.append(self._small(mt.SYSTEM, system.encode()))
            if messages:
                layers.append(self._small(mt.MESSAGES, json.dumps(messages, indent=2).encode()))
            for text in licenses:
                layers.append(self._small(mt.LICENSE, text.encode()))
            config = json.dumps({**details, "source": source}, indent=2, sort_keys=True).encode()
            manifest = Manifest(Layer(mt.CONFIG_TYPE, self.blobs.put_bytes(config), len(config)), layers)
            data = manifest.to_bytes()
            atomic_write(self._manifest_path(name), data)
        return digest_bytes(data)

    # -- directory models -----------------------------------------------------------------

    def _materialise(self, layers: list[Layer]) -> Path:
        """The path a loader takes for `layers`: the blob of a single file, else a directory of
        symlinks named as the files (`models/<key>/config.json -> ../../blobs/sha256-...`)."""
        if len(layers) == 1 and layers[0].name is None:
            return self._blob_path(layers[0])
        for layer in layers:
            self._blob_path(layer)  # every blob must be there
        target = self.root / "models" / _dir_key(layers)
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        for layer in layers:
            os.symlink(Path("..", "..", "blobs", layer.digest.replace(":", "-")), tmp / mt.check_file_name(layer.name))
        try:
            os.rename(tmp, target)  # atomic; fails if another process made it first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
        return target

    def _blob_path(self, layer: Layer) -> Path:
        path = self.blobs.path(layer.digest)
        if not path.is_file():
            raise HerdError(f"blob {layer.digest} is missing from the store; pull or create the model again")
        return path

    # -- removing and copying ---------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Remove `name`; blobs no other model uses are deleted."""
        n = parse_name(name)
        with _disk_errors(self.root), self._locked():
            path = self._manifest_path(n)
            if not path.is_file():
                raise ModelNotFound(name)
            path.unlink()
            for parent in list(path.parents)[:3]:  # model, namespace, host folders, if now empty
                try:
                    parent.rmdir()
                except OSError:
                    break
            self._collect_garbage()

    def prune(self) -> int:
        """Delete blobs and model directories no manifest uses; returns the bytes freed."""
        with _disk_errors(self.root), self._locked():
            return self._collect_garbage()

    def _collect_garbage(self) -> int:
        """Delete the blobs and model folders no manifest uses (store lock held); returns bytes freed.

        A manifest that cannot be parsed may still be a model someone wants back (a schemaVersion
        a newer herd wrote, a file an editor truncated): every digest that appears in its text is
        kept, and if its text is not even JSON (truncated: the digests it named past the cut are
        unknown) nothing is deleted at all. Losing weights for good is worse than keeping a few."""
        used: set[str] = set()
        dirs: set[str] = set()
        for path in self._manifest_files():
            try:
                data = path.read_bytes()
            except OSError:
                return 0  # cannot tell what it uses
            try:
                manifest = Manifest.from_bytes(data)
            except HerdError:
                if not _is_json(data):
                    return 0
                used |= {"sha256:" + h.decode() for h in _DIGEST_IN_TEXT.findall(data)}
                dirs.add("*")  # keep every model folder too
                continue
            used |= manifest.digests()
            for media in (mt.MODEL, mt.ADAPTER):
                for group in {l.group for l in manifest.of_type(media)}:
                    layers = [l for l in manifest.of_type(media) if l.group == group]
                    dirs.add(_dir_key(layers))
        freed = 0
        for digest in self.blobs.digests() - used:
            path = self.blobs.path(digest)
            with contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
                path.unlink()
        models = self.root / "models"
        for d in models.iterdir() if models.is_dir() and "*" not in dirs else []:
            if d.name not in dirs and not d.name.startswith(".tmp-"):  # .tmp-: being made by a resolve
                shutil.rmtree(d, ignore_errors=True)
        return freed

    def clean_temporary(self) -> None:
        """Delete what killed uploads left in `blobs/` (`.upload-*`); `herd serve` does it at start."""
        for path in self.blobs.dir.glob(".upload-*") if self.blobs.dir.is_dir() else []:
            path.unlink(missing_ok=True)

    def check(self) -> list[tuple[str, str]]:
        """Verify every manifest and every blob it names (present, the right size, the right sha256,
        configs and parameters readable): `(model, what is wrong)` pairs, empty when all is well.
        What `herd doctor` prints. Reads every blob: minutes for a store of large models."""
        problems: list[tuple[str, str]] = []
        verified: dict[str, str | None] = {}  # digest -> problem (each blob is hashed once)
        for path in self._manifest_files():
            name = self._display_name(path)
            try:
                manifest = Manifest.from_bytes(path.read_bytes(), "its manifest")
            except (OSError, HerdError) as e:
                problems.append((name, str(e) if isinstance(e, HerdError) else f"cannot read its manifest: "
                                 f"{e.strerror}"))
                continue
            for layer in [manifest.config, *manifest.layers]:
                if layer.digest not in verified:
                    verified[layer.digest] = self._check_blob(layer)
                if verified[layer.digest]:
                    problems.append((name, verified[layer.digest]))
            if any(verified[l.digest] for l in [manifest.config, *manifest.layers]):
                continue
            try:
                self._details(manifest)
                params = self._json(manifest.first(mt.PARAMS), {})
                if not isinstance(params, dict):
                    raise HerdError("its parameters are not a JSON object")
                check_parameters(params)
                for layer in manifest.of_type(mt.MESSAGES):
                    if not isinstance(self._json(layer, []), list):
                        raise HerdError("its messages are not a JSON list")
            except HerdError as e:
                problems.append((name, str(e)))
        return problems

    def _check_blob(self, layer: Layer) -> str | None:
        path = self.blobs.path(layer.digest)
        try:
            size = path.stat().st_size
            if size != layer.size:
                return f"blob {layer.digest} has {size} bytes, its manifest says {layer.size}"
            if digest_file(path) != layer.digest:
                return f"blob {layer.digest} is corrupt: its content has another sha256"
        except FileNotFoundError:
            return f"blob {layer.digest} is missing"
        except OSError as e:
            return f"blob {layer.digest} cannot be read: {e.strerror}"
        return None

    def copy(self, src: str, dst: str) -> None:
        """Make `dst` another name for `src` (the same manifest; no blob is copied)."""
        _, _, data = self._read(src)
        d = parse_name(dst)
        with _disk_errors(self.root), self._locked():
            atomic_write(self._manifest_path(d), data)

    # -- creating -------------------------------------------------------------------------

    def create(self, name: str, modelfile: str | Modelfile, base_dir: str | Path | None = ".",
               progress: Progress | None = None, quantize: str | None = None) -> str:
        """Create (or replace) `name` from a Modelfile (its text, or a `Modelfile` built directly, as
        `/api/create` does); returns the manifest digest. Progress events as for `pull`.

        Args:
            base_dir: the folder relative paths in FROM and ADAPTER start from; None: paths are
                not accepted at all (a server's clients name only stored models and blobs).
        FROM may also be `sha256:<hex>`, a GGUF blob already in the store (an upload): it is used
        in place, not copied. The parameters, template and messages are checked before anything
        is written (`check_parameters`, the template's syntax, num_ctx against the model's context).
        `quantize` (q8_0, q4_0, q4_k), as `ollama create --quantize`: the weights are stored as a GGUF
        file of that quantization, made from FROM's weights (`_quantized`).
        """
        progress = progress or _no_progress
        n = parse_name(name)
        if quantize is not None:
            from ..quantize.blocks import check_scheme

            quantize = check_scheme(quantize)
        mf = parse_modelfile(modelfile) if isinstance(modelfile, str) else modelfile
        check_definition(mf)
        if base_dir is None and mf.adapters:
            raise HerdError("adapters are not accepted here")
        params: dict[str, Any] = {}
        template = system = None
        messages: list = []
        licenses: list[str] = []
        adapters: list[list[Fetched]] = []
        key = _key(f"create:{n.display()}")
        work = self.root / "partial" / key
        with _disk_errors(self.root), file_lock(self.root / "locks" / f"pull-{key}.lock"):
            work.mkdir(parents=True, exist_ok=True)
            base = self._base_model(mf, base_dir, progress)
            if isinstance(base, Manifest):  # FROM a stored model: inherit what it has
                files = [Fetched(l.digest, l.size, None, l.name) for l in base.of_type(mt.MODEL)]
                details = {k: v for k, v in self._details(base).items() if k != "source"}
                params = self._json(base.first(mt.PARAMS), {})
                template = self._text(base.first(mt.TEMPLATE))
                system = self._text(base.first(mt.SYSTEM))
                messages = self._json(base.first(mt.MESSAGES), [])
                licenses = [self._text(l) for l in base.of_type(mt.LICENSE)]
                for group in sorted({l.group for l in base.of_type(mt.ADAPTER)}):
                    adapters.append([Fetched(l.digest, l.size, None, l.name)
                                     for l in base.of_type(mt.ADAPTER) if l.group == group])
            elif isinstance(base, str):  # FROM an uploaded blob: used in place
                path = self.blobs.path(base)
                with open(path, "rb") as f:
                    if f.read(4) != GGUF_MAGIC:
                        raise HerdError(f"blob {base} is not a GGUF file")
                files = [Fetched(base, path.stat().st_size, None, None)]
                details = model_details(path)
            else:
                base, run_adapter = _training_output(base)
                progress({"status": f"copying model files from {base}"})
                files = self._import(base, work / "model")
                details = self._details_of(files, work)
                if run_adapter is not None:  # FROM a LoRA training output: its base, with its adapter
                    adapters.append(self._import(run_adapter, work / "adapter-run", adapter=True))
            if quantize is not None:
                progress({"status": f"quantizing model weights to {quantize}"})
                files = self._quantized(files, work, quantize)
                details = self._details_of(files, work)
            for i, adapter in enumerate(mf.adapters):
                path = (Path(base_dir) / Path(adapter).expanduser())
                if not path.exists():
                    raise HerdError(f"ADAPTER {adapter}: no such file or directory")
                progress({"status": f"copying adapter {adapter}"})
                adapters.append(self._import(path, work / f"adapter{i}", adapter=True))
            params = check_parameters({**params, **mf.parameters}, details.get("context_length"))
            template = mf.template if mf.template is not None else template
            system = mf.system if mf.system is not None else system
            messages = mf.messages or messages
            licenses = mf.licenses or licenses
            progress({"status": "writing manifest"})
            digest = self._commit(n, files, details, source=f"created from {mf.from_}", params=params,
                                  template=template, system=system, messages=messages, licenses=licenses,
                                  adapters=adapters)
            shutil.rmtree(work, ignore_errors=True)
        progress({"status": "success"})
        return digest

    def _quantized(self, files: list[Fetched], work: Path, scheme: str) -> list[Fetched]:
        """A GGUF file of quantization `scheme` made from the model `files` (fetched or stored), ready
        to commit: the weights read as float32 and quantized (`quantize.blocks`), the tokenizer and
        chat template carried over."""
        from ..weights.quantized import quantized_gguf

        paths = {f.name: f.path or self.blobs.path(f.digest) for f in files}
        with tempfile.TemporaryDirectory(dir=work, prefix=".source-") as tmp:
            if len(files) == 1 and files[0].name is None:
                source = paths[None]
            else:
                for file_name, path in paths.items():
                    os.symlink(Path(path).resolve(), Path(tmp) / file_name)
                source = Path(tmp)
            out = quantized_gguf(source, work / "quantized.gguf", scheme)
        return self._import(out, work / "quantized")

    def check_create(self, name: str, mf: Modelfile) -> None:
        """What `create(name, mf, base_dir=None)` would refuse before it starts (a bad name or
        definition, a FROM that names no stored model, catalog model or blob): a server answers
        these with a 4xx rather than in the progress stream."""
        parse_name(name)
        check_definition(mf)
        if _BLOB_DIGEST.fullmatch(mf.from_):
            if not self.blobs.has(mf.from_):
                raise HerdError(f"from {mf.from_!r}: no such blob (upload it first: POST /api/blobs/{mf.from_})")
            return
        base = parse_name(mf.from_)
        if not self.has(base) and self.catalog(base) is None:
            raise ModelNotFound(mf.from_, f"from {mf.from_!r}: no such model")

    def _base_model(self, mf: Modelfile, base_dir: Path | None, progress: Progress) -> Manifest | Path | str:
        """What FROM names: a stored model's manifest (pulled first if needed), a stored blob's
        digest, or (with a `base_dir`) a path."""
        where = f"Modelfile line {mf.from_line}: FROM {mf.from_}" if mf.from_line else f"from {mf.from_!r}"
        if _BLOB_DIGEST.fullmatch(mf.from_):
            if not self.blobs.has(mf.from_):
                raise HerdError(f"{where}: no such blob (upload it first: POST /api/blobs/{mf.from_})")
            return mf.from_
        try:
            name = parse_name(mf.from_)
        except HerdError:
            name = None
        if name is not None and self.has(name):
            return self._read(name)[1]
        if base_dir is not None:
            path = Path(base_dir).expanduser() / Path(mf.from_).expanduser()
            if path.exists():
                return path
        if name is not None and self.catalog(name) is not None:
            self.pull(mf.from_, progress)
            return self._read(name)[1]
        raise HerdError(f"{where}: no such model, file or directory" if base_dir is not None
                        else f"{where}: no such model")

    # -- uploads ----------------------------------------------------------------------------

    def upload_file(self) -> tuple[int, Path]:
        """A new temporary file for an upload, beside the blobs (`.upload-*`: deleted at the next
        server start if the upload never finishes). Returns (fd, path)."""
        with _disk_errors(self.root):
            self.blobs.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.blobs.dir, prefix=".upload-")
        return fd, Path(tmp)

    def commit_upload(self, tmp: Path, digest: str) -> None:
        """Keep a finished, verified upload as the blob `digest`: an ordinary blob, collected like
        any other once no model uses it (a create that names it must come before the next
        collection: a `herd rm`, `prune` or a server start)."""
        with _disk_errors(self.root), self._locked():
            self.blobs.commit(tmp, digest)

    def _import(self, path: Path, work: Path, adapter: bool = False) -> list[Fetched]:
        """Copy a model (or adapter) file or directory into `work`, hashing it; no blob is written."""
        work.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            if not adapter:
                with open(path, "rb") as f:
                    if f.read(4) != GGUF_MAGIC:
                        raise HerdError(f"{path} is not a GGUF file; FROM takes a .gguf file, a Hugging Face or "
                                        "Meta checkpoint directory, or a model name")
            return [self._copy_in(path, work / "file.partial", None)]
        if adapter:
            names = [p.name for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".gguf")]
        elif (path / "config.json").is_file():
            names = [p.name for p in path.iterdir() if p.is_file() and HF_MODEL_FILES.fullmatch(p.name)]
        elif (path / "params.json").is_file():
            names = [p.name for p in path.iterdir() if p.is_file()
                     and (p.name in ("params.json", "tokenizer.model") or
                          (p.name.startswith("consolidated.") and p.suffix == ".pth"))]
            if "tokenizer.model" not in names and (path.parent / "tokenizer.model").is_file():
                names.append("../tokenizer.model")  # Meta's downloads keep it one level up
        else:
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise HerdError(f"{path} holds no model: expected config.json (Hugging Face), params.json (Meta) "
                                "or one .gguf file")
            return self._import(ggufs[0], work)
        if not names:
            raise HerdError(f"{path} holds no model files")
        return [self._copy_in(path / n, work / f"{i}.partial", mt.check_file_name(Path(n).name))
                for i, n in enumerate(sorted(names))]

    def _copy_in(self, src: Path, dst: Path, name: str | None) -> Fetched:
        digest = copy_hashing(src, dst)
        size = dst.stat().st_size
        if self.blobs.has(digest):  # already stored: drop the copy
            dst.unlink()
            return Fetched(digest, size, None, name)
        return Fetched(digest, size, dst, name)


def _remove_if_empty(work: Path) -> None:
    """Remove a pull's `partial/<key>` folder (and `partial/`) when it holds no file."""
    if not any(p.is_file() for p in work.rglob("*")):
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.parent.rmdir()
        except OSError:  # other pulls' folders are there
            pass


def _dir_key(layers: list[Layer]) -> str:
    """The `models/` folder name for a set of named files: a digest of their names and digests."""
    return _key("\n".join(sorted(f"{l.name}\t{l.digest}" for l in layers)))


def _name_from_parts(host: str, namespace: str, model: str, tag: str) -> str:
    """The name a manifest path stands for."""
    return str(ModelName(host, namespace, model, tag))
