"""Content-addressed blobs, atomic writes and file locks: the store's crash-safety primitives.

A blob is `blobs/sha256-<hex>`; its name is its content's digest, so two models that share a file
share one blob, and a blob is never modified once written. Every write goes to a temporary file
in the same folder, is fsync'ed, then `os.replace`d into place: a reader (or a crash) sees the old
file or the new one, never half of one. Locks are `flock(2)` locks on files under `locks/`; the
kernel drops them when a process dies, so a killed pull never leaves the store locked.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import HerdError

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent pulls there are not protected
    fcntl = None

CHUNK = 1 << 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest(digest: str) -> str:
    """`digest` if it is `sha256:<64 hex>`, else `HerdError` (digests become file names)."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise HerdError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return digest


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """sha256 of a file, read in 1 MiB chunks; `progress(bytes_done)` after each."""
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done)
    return "sha256:" + h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that it is either the old content or all of the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with _ignore_missing():
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextmanager
def _ignore_missing():
    try:
        yield
    except FileNotFoundError:
        pass


@contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive (or shared) lock on `path` for the `with` block; blocks until granted.

    flock locks belong to the open file, so two threads of one process exclude each other too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class BlobStore:
    """The `blobs/` folder: `sha256-<hex>` files named by their content's digest."""

    def __init__(self, root: Path):
        self.dir = Path(root)

    def path(self, digest: str) -> Path:
        return self.dir / check_digest(digest).replace(":", "-")

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def put_bytes(self, data: bytes) -> str:
        """Store small content (parameters, a template...); returns its digest."""
        digest = digest_bytes(data)
        if not self.has(digest):
            atomic_write(self.path(digest), data)
        return digest

    def read_bytes(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise HerdError(f"blob {digest} is missing from the store (pull or create the model again)") from None

    def commit(self, src: Path, digest: str) -> Path:
        """Move a verified file (already fsync'ed, on the same file system) into place as a blob."""
        target = self.path(digest)
        self.dir.mkdir(parents=True, exist_ok=True)
        if target.is_file():  # another pull got there first: same content, keep theirs
            src.unlink(missing_ok=True)
            return target
        os.chmod(src, 0o644)
        os.replace(src, target)
        fsync_dir(self.dir)
        return target

    def digests(self) -> set[str]:
        """Digests of every blob on disk."""
        if not self.dir.is_dir():
            return set()
        return {p.name.replace("-", ":", 1) for p in self.dir.iterdir()
                if p.is_file() and _DIGEST.fullmatch(p.name.replace("-", ":", 1))}


def verify_file(path: Path, expected: str | None,
                progress: Callable[[int], None] | None = None, what: str = "") -> str:
    """Digest of `path`; if it differs from `expected`, delete the file and raise `HerdError`."""
    digest = digest_file(path, progress)
    if expected is not None and digest != expected:
        path.unlink(missing_ok=True)
        raise HerdError(f"digest mismatch for {what or path.name}: expected {expected}, got {digest}; "
                        "the download was removed, try again")
    return digest


def copy_hashing(src: Path, dst: Path, progress: Callable[[int], None] | None = None) -> str:
    """Copy `src` to `dst` (fsync'ed) and return the copy's digest, reading the source once."""
    h = hashlib.sha256()
    done = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
            done += len(chunk)
            if progress:
                progress(done)
        fout.flush()
        os.fsync(fout.fileno())
    return "sha256:" + h.hexdigest()

