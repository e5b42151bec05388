"""Shared test setup: the Triton interpreter on machines without CUDA, one intra-op thread,
the ``slow`` / ``gpu`` / ``distributed`` markers, and seeded generators."""
import os
import subprocess
import sys
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The whole suite runs with one intra-op thread: its tensors are small, and on a shared 2-core
# machine torch's spin-waiting threads make them several times slower (the 2000-step tests took
# 72 s instead of 5 s). It is set once and raised only inside a test that needs it: with torch
# 2.13's CPU build, while a count >= 2 set by torch.set_num_threads is in effect, batched
# torch.linalg.solve_ex of 256 x 256 matrices returns garbage with info = 0 (or raises "Pivots
# given to lu_solve must all be >= 1"), and the tests' float64 oracles use it (the ops' CPU
# kernel is the native one at every k: stiefel_kernels/ops.py).
torch.set_num_threads(1)

#: registered here so that pyproject.toml need not list them; they select tests (``-m "not slow"``),
#: nothing is deselected by default (tests/README.md)
MARKERS = {
    "slow": "takes more than about 5 s on a 2-core CPU machine (deselect with -m \"not slow\")",
    "gpu": "runs only on a machine with a CUDA device (skipped elsewhere)",
    "distributed": "launches several processes (torch.distributed, gloo)",
}


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


@pytest.fixture
def gen(request):
    """A generator seeded from the test's name: fresh random inputs per test, reproducible."""
    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def compile_for_gpu_without_one(script: str) -> None:
    """Run ``script`` (an ahead-of-time ``triton.compile`` for a GPU target that prints
    "compiled") in a fresh interpreter without ``TRITON_INTERPRET``, so a GPU-only compile
    error is caught on CPU CI."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
