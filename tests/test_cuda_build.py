"""The CUDA sources (csrc/cuda/) compile and link, on any machine with nvcc; setup.py builds them.

A CPU-only torch builds ``stiefel_kernels._C`` without them, so without these tests a broken
CUDA file or a broken CUDA branch of setup.py would land unnoticed until someone builds on a GPU
machine.

* CMake's compile-check target ``stiefel_cuda_check`` (CMakeLists.txt) builds the kernels with
  nvcc for sm_80 and sm_90, the torch glue with the C++ compiler against the installed torch's
  headers, both with warnings as errors, and links them with ``-Wl,--no-undefined``: every
  launcher the glue calls must exist with the signature it expects.
* setup.py's choice of extension is checked without compiling (a full CUDA build takes minutes
  on two cores; ``tools/check_cuda_torch_build.sh`` does it against a CUDA build of torch).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _find_tool(name: str) -> str | None:
    """From this interpreter's environment (the pip ``cmake``/``ninja`` the README installs)."""
    return shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)


needs_nvcc = pytest.mark.skipif(
    _find_nvcc() is None,
    reason="no CUDA toolkit (nvcc) on this machine: nothing to compile the .cu with")


@pytest.mark.slow
@needs_nvcc
def test_cuda_sources_compile_and_link(tmp_path):
    cmake = _find_tool("cmake")
    if cmake is None and torch.version.cuda:
        # A GPU machine without CMake: there the installed _C itself is built with the CUDA
        # sources (bench/gpu_checks.sh asserts it).
        pytest.skip("no cmake, and torch is a CUDA build (its _C build compiles csrc/cuda)")
    assert cmake, "cmake not found: install the build requirements (README)"
    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build),
                 f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}", f"-DPython_EXECUTABLE={sys.executable}"]
    ninja = _find_tool("ninja")
    if ninja:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    for cmd in (configure, [cmake, "--build", str(build), "--target", "stiefel_cuda_check"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, \
            f"{' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    libs = list(build.glob("libstiefel_cuda_check*"))
    assert libs, list(build.iterdir())
    # Both dtypes of every op were instantiated and exported by the kernels' object file.
    symbols = subprocess.run(["nm", "-DC", str(libs[0])], capture_output=True, text=True).stdout
    for op in ("launch_inv_sqrt_spd", "launch_cholesky_upper_inverse", "launch_solve"):
        for dtype in ("float", "double"):
            assert f"stiefel_kernels::cuda::{op}<{dtype}>" in symbols, (op, dtype)


_SETUP_PROBE = r"""
import json, os, runpy, sys
import setuptools
seen = {}
setuptools.setup = lambda **kw: seen.update(kw)
runpy.run_path("setup.py", run_name="__main__")
(ext,) = seen["ext_modules"]
from torch.utils import cpp_extension
print(json.dumps({
    "name": ext.name,
    "sources": ext.sources,
    "macros": dict(ext.define_macros),
    "cxx": ext.extra_compile_args["cxx"],
    "nvcc": ext.extra_compile_args.get("nvcc"),
    "libraries": ext.libraries,
    "build_ext": issubclass(seen["cmdclass"]["build_ext"], cpp_extension.BuildExtension),
    "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    "cuda_home": cpp_extension.CUDA_HOME,
}))
"""


def _setup_config(**env) -> dict:
    """The extension setup.py would build, from running it with ``setup()`` replaced."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("STIEFEL_KERNELS_WITH_CUDA", "STIEFEL_KERNELS_SKIP_NATIVE",
                             "TORCH_CUDA_ARCH_LIST")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", _SETUP_PROBE], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CPU_SOURCES = ["csrc/module.cpp", "csrc/op_checks.cpp", "csrc/ops_cpu.cpp", "csrc/fused_step_cpu.cpp",
               "csrc/small_bmm_cpu.cpp", "csrc/cayley_step_cpu.cpp"]
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for pattern in ("*.cu", "*.cpp")
                      for p in (ROOT / "csrc" / "cuda").glob(pattern))


def test_setup_builds_the_cpu_module_without_cuda():
    cfg = _setup_config(STIEFEL_KERNELS_WITH_CUDA="0")
    assert cfg["name"] == "stiefel_kernels._C" and cfg["build_ext"]
    assert cfg["sources"] == CPU_SOURCES
    assert cfg["macros"]["STIEFEL_WITH_CUDA"] == "0"
    assert "-fopenmp" in cfg["cxx"] and "-O3" in cfg["cxx"]  # at::parallel_for runs on OpenMP
    assert "-std=c++20" in cfg["cxx"]
    assert "cudart" not in cfg["libraries"]


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build")
def test_setup_auto_is_cpu_only_with_a_cpu_torch():
    cfg = _setup_config()
    assert cfg["sources"] == CPU_SOURCES and cfg["macros"]["STIEFEL_WITH_CUDA"] == "0"


@needs_nvcc
def test_setup_builds_the_cuda_kernels_for_sm_90():
    cfg = _setup_config(STIEFEL_KERNELS_WITH_CUDA="1")
    assert CUDA_SOURCES and set(CUDA_SOURCES) <= set(cfg["sources"])
    assert set(CPU_SOURCES) <= set(cfg["sources"])
    assert cfg["macros"]["STIEFEL_WITH_CUDA"] == "1"
    assert "cudart" in cfg["libraries"]
    assert "-std=c++20" in cfg["nvcc"] and "-std=c++20" in cfg["cxx"]
    # The default architectures: SASS for sm_80 and sm_90 (H100/H200), PTX for newer GPUs.
    assert cfg["arch_list"] == "8.0;9.0+PTX"
    assert (Path(cfg["cuda_home"]) / "bin" / "nvcc").exists()
    assert (Path(cfg["cuda_home"]) / "include" / "cuda_runtime.h").exists(), cfg["cuda_home"]
    # A caller's list wins.
    cfg = _setup_config(STIEFEL_KERNELS_WITH_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0")
    assert cfg["arch_list"] == "9.0"
