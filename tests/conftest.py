"""Shared test setup: the Triton interpreter on machines without CUDA, and seeded generators."""
import os
import subprocess
import sys
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def gen(request):
    """A generator seeded from the test's name: fresh random inputs per test, reproducible."""
    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids spin-wait slowdowns on a shared 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
