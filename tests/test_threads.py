"""OpenMP's wait policy and thread count, set before torch loads its OpenMP runtime (see
`settings.openmp_env`: a competing CPU load must not make every barrier of a decode step spin)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from llamaherd import settings

SRC = Path(__file__).resolve().parents[1] / "src"
PROBE = ("import os, json, llamaherd, torch; "
         "print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), torch.get_num_threads()]))")


def probe(**env) -> list:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "HERD_"))}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHONPATH": str(SRC), **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_importing_llamaherd_sets_a_short_spin_and_keeps_a_users_own():
    spin, threads = probe()
    assert spin == settings.OMP_SPINCOUNT and threads == (os.cpu_count() or 1)
    assert probe(HERD_NUM_THREADS="1", GOMP_SPINCOUNT="5000") == ["5000", 1]  # HERD_NUM_THREADS: torch's too


def test_the_variables():
    assert settings.openmp_env({}) == {"GOMP_SPINCOUNT": settings.OMP_SPINCOUNT}
    assert settings.openmp_env({"OMP_WAIT_POLICY": "active", "HERD_NUM_THREADS": "3"}) == {"OMP_NUM_THREADS": "3"}
    assert settings.openmp_env({"HERD_NUM_THREADS": "many"}) == {"GOMP_SPINCOUNT": settings.OMP_SPINCOUNT}
