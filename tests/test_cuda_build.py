"""The CUDA sources (csrc/cuda/) compile and link, on any machine with nvcc.

A CPU-only torch builds ``stiefel_kernels._C`` without them, so without this test a broken CUDA
file would land unnoticed until someone builds on a GPU machine. CMake's compile-check target
``stiefel_cuda_check`` (CMakeLists.txt) builds the kernels with nvcc for sm_80 and sm_90, the
torch glue with the C++ compiler against the installed torch's headers, both with warnings as
errors, and links them with ``-Wl,--no-undefined``: every launcher the glue calls must exist with
the signature it expects.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _find_tool(name: str) -> str:
    """From this interpreter's environment (the pip ``cmake``/``ninja`` the README installs)."""
    tool = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    assert tool, f"{name} not found: install the build requirements (README)"
    return tool


@pytest.mark.slow
@pytest.mark.skipif(_find_nvcc() is None,
                    reason="no CUDA toolkit (nvcc) on this machine: nothing to compile the .cu with")
def test_cuda_sources_compile_and_link(tmp_path):
    build = tmp_path / "build"
    configure = [
        _find_tool("cmake"), "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={_find_tool('ninja')}",
        f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}",
        f"-DPython_EXECUTABLE={sys.executable}",
        "-DSTIEFEL_CUDA_COMPILE_CHECK=ON",
        f"-DSTIEFEL_OUTPUT_DIR={tmp_path / 'unused'}",  # the _C target is not built here
    ]
    for cmd in (configure, [_find_tool("cmake"), "--build", str(build), "--target",
                            "stiefel_cuda_check"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    libs = list(build.glob("libstiefel_cuda_check*"))
    assert libs, list(build.iterdir())
    # Both dtypes of every op were instantiated and exported by the kernels' object file.
    symbols = subprocess.run(["nm", "-DC", str(libs[0])], capture_output=True, text=True).stdout
    for op in ("launch_inv_sqrt_spd", "launch_cholesky_upper_inverse", "launch_solve"):
        for dtype in ("float", "double"):
            assert f"stiefel_kernels::cuda::{op}<{dtype}>" in symbols, (op, dtype)
