"""The extension links the shared C++ runtime, so an error raised inside it reaches Python.

On the lent GPU machines (2026-11-26) ``CXX`` is a wrapper that finds only a static
``libstdc++.a``; the extension it linked carried its own runtime, and the first bad argument given
to a native op crashed the process (segmentation fault in ``std::ostream``) instead of raising.
setup.py now detects such a driver and links ``libstdc++.so.6``; ``_native`` refuses a module
built otherwise (stiefel_kernels/_elf.py).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stiefel_kernels import _elf, _native

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")
BUILT = importlib.util.find_spec("stiefel_kernels._C") is not None
needs_module = pytest.mark.skipif(not (BUILT and sys.platform.startswith("linux")),
                                  reason="the extension is not built (or not an ELF module)")
SOURCE = ("#include <sstream>\n#include <string>\n"
          "std::string probe(long x) { std::ostringstream s; s << x; return s.str(); }\n")


def _static_runtime_available() -> bool:
    if CXX is None or not sys.platform.startswith("linux"):
        return False
    out = subprocess.run([CXX, "-print-file-name=libstdc++.a"], capture_output=True, text=True)
    return os.path.isabs(out.stdout.strip())  # a bare name: the archive is not installed


needs_static = pytest.mark.skipif(not _static_runtime_available(),
                                  reason="no C++ compiler with a static libstdc++.a")


def _wrapper(tmp_path) -> Path:
    """Stands in for the GPU image's ``g++``: a driver that links the runtime statically."""
    wrapper = tmp_path / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {CXX} -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@needs_module
def test_the_extension_asks_for_the_shared_cxx_runtime():
    path = importlib.util.find_spec("stiefel_kernels._C").origin
    needed = _elf.needed_libraries(path)
    assert needed is not None and any(n.startswith("libstdc++.so") for n in needed), needed
    assert not _elf.links_cxx_runtime_statically(path)
    assert _native.available, _native.load_error  # and _native loaded it


@needs_module
def test_needed_libraries_of_files_that_are_not_shared_objects(tmp_path):
    assert _elf.needed_libraries(__file__) is None
    assert _elf.needed_libraries(str(tmp_path / "missing.so")) is None
    data = open(importlib.util.find_spec("stiefel_kernels._C").origin, "rb").read()
    for cut in (100, len(data) // 2):  # the section table or the strings cut off
        truncated = tmp_path / f"truncated{cut}.so"
        truncated.write_bytes(data[:cut])
        assert _elf.needed_libraries(str(truncated)) is None
        assert not _elf.links_cxx_runtime_statically(str(truncated))


@needs_static
def test_a_driver_that_links_the_runtime_statically_is_detected(tmp_path):
    """The wrapper's shared objects ask for no ``libstdc++.so``; ``-l:libstdc++.so.6`` (what
    setup.py adds) makes them ask for it again."""
    wrapper = _wrapper(tmp_path)
    if _elf.driver_links_cxx_runtime_statically([CXX], str(tmp_path)):
        pytest.skip(f"{CXX} itself links the runtime statically")
    assert _elf.driver_links_cxx_runtime_statically([str(wrapper)], str(tmp_path))
    assert not _elf.driver_links_cxx_runtime_statically([str(tmp_path / "no-such-g++")],
                                                        str(tmp_path))
    src, out = tmp_path / "probe.cpp", tmp_path / "fixed.so"
    src.write_text(SOURCE)
    subprocess.run([str(wrapper), "-shared", "-fPIC", str(src), "-o", str(out),
                    "-l:libstdc++.so.6"], check=True)
    assert not _elf.links_cxx_runtime_statically(str(out))


_TOY_BUILD = r"""
import os, runpy, sys
import setuptools
from torch.utils import cpp_extension
root, src, which, build = sys.argv[1:5]
real_setup, seen = setuptools.setup, {}
setuptools.setup = lambda **kw: seen.update(kw)
runpy.run_path(os.path.join(root, "setup.py"), run_name="__main__")  # its build_ext class only
setuptools.setup = real_setup
cls = seen["cmdclass"]["build_ext"] if which == "ours" else cpp_extension.BuildExtension
real_setup(name="toy", ext_modules=[cpp_extension.CppExtension("toy", [src])],
           cmdclass={"build_ext": cls.with_options(use_ninja=False)},
           script_args=["-q", "build_ext", "--build-lib", os.path.join(build, "lib"),
                        "--build-temp", os.path.join(build, "temp")])
"""


@needs_static
def test_setup_links_the_shared_runtime_even_over_an_older_static_build(tmp_path):
    """setup.py's build_ext with the wrapper as ``CXX``: torch's own BuildExtension leaves the
    runtime inside the module; setup.py's, run next over the same build folders (the module up
    to date), links it again against ``libstdc++.so.6``."""
    src = tmp_path / "toy.cpp"
    src.write_text(SOURCE)
    env = {**os.environ, "CXX": str(_wrapper(tmp_path)), "STIEFEL_KERNELS_WITH_CUDA": "0"}
    built = []
    for which in ("torch", "ours"):
        proc = subprocess.run([sys.executable, "-c", _TOY_BUILD, str(ROOT), str(src), which,
                               str(tmp_path / "build")], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (module,) = (tmp_path / "build" / "lib").glob("toy*.so")
        built.append(_elf.links_cxx_runtime_statically(str(module)))
    assert built == [True, False]


@needs_module
def test_a_module_with_its_own_runtime_is_not_loaded(monkeypatch):
    _native._refuse_own_cxx_runtime()  # this build: loads
    monkeypatch.setattr(_native._elf, "links_cxx_runtime_statically", lambda path: True)
    with pytest.raises(ImportError, match="C\\+\\+ runtime linked into it"):
        _native._refuse_own_cxx_runtime()


@needs_module
def test_an_error_inside_the_extension_reaches_python():
    """In a separate process: a crash there fails this test instead of the test session."""
    code = textwrap.dedent("""
        import torch, stiefel_kernels
        from stiefel_kernels import _native
        assert _native.available, _native.load_error
        z = torch.zeros(4, 4)
        try:
            torch.ops.stiefel_kernels.cayley_fp_step(z, z, z, torch.ones(1), 2, 1e-6)
        except RuntimeError as exc:
            print("raised:", str(exc).splitlines()[0])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "raised: stiefel_kernels::cayley_fp_step: expected k of shape (F, r, r)" in proc.stdout
