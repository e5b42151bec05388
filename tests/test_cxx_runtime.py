"""The extension links the shared C++ runtime, so an error raised inside it reaches Python.

On the lent GPU machines (2026-11-26) ``CXX`` is a wrapper that finds only a static
``libstdc++.a``; the extension it linked carried its own runtime, and the first bad argument given
to a native op crashed the process (segmentation fault in ``std::ostream``) instead of raising.
setup.py now detects such a driver and links ``libstdc++.so.6``; ``_native`` refuses a module
built otherwise (stiefel_kernels/_elf.py).
"""
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from stiefel_kernels import _elf, _native

CXX = shutil.which("g++") or shutil.which("c++")


def test_the_extension_asks_for_the_shared_cxx_runtime():
    assert _native.available, _native.load_error
    from stiefel_kernels import _C

    needed = _elf.needed_libraries(_C.__file__)
    assert needed is not None and any(n.startswith("libstdc++.so") for n in needed), needed
    assert not _elf.links_cxx_runtime_statically(_C.__file__)


def test_needed_libraries_of_files_that_are_not_shared_objects(tmp_path):
    assert _elf.needed_libraries(__file__) is None
    assert _elf.needed_libraries(str(tmp_path / "missing.so")) is None
    truncated = tmp_path / "truncated.so"
    from stiefel_kernels import _C

    truncated.write_bytes(open(_C.__file__, "rb").read()[:100])
    assert _elf.needed_libraries(str(truncated)) is None
    assert not _elf.links_cxx_runtime_statically(str(truncated))


@pytest.mark.skipif(CXX is None, reason="no C++ compiler to make the shared objects")
def test_a_driver_that_links_the_runtime_statically_is_detected(tmp_path):
    """A wrapper that adds ``-static-libstdc++`` stands in for the GPU image's ``g++``: its
    shared objects ask for no ``libstdc++.so``, and ``-l:libstdc++.so.6`` (what setup.py adds)
    makes them ask for it again."""
    wrapper = tmp_path / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {CXX} -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    assert not _elf.driver_links_cxx_runtime_statically([CXX], str(tmp_path))
    assert _elf.driver_links_cxx_runtime_statically([str(wrapper)], str(tmp_path))
    assert not _elf.driver_links_cxx_runtime_statically([str(tmp_path / "no-such-g++")],
                                                        str(tmp_path))
    src, out = tmp_path / "cxx_runtime_probe.cpp", tmp_path / "fixed.so"
    subprocess.run([str(wrapper), "-shared", "-fPIC", str(src), "-o", str(out),
                    "-l:libstdc++.so.6"], check=True)
    assert not _elf.links_cxx_runtime_statically(str(out))


def test_a_module_with_its_own_runtime_is_not_loaded(monkeypatch):
    _native._refuse_own_cxx_runtime()  # this build: loads
    monkeypatch.setattr(_native._elf, "links_cxx_runtime_statically", lambda path: True)
    with pytest.raises(ImportError, match="C\\+\\+ runtime linked into it"):
        _native._refuse_own_cxx_runtime()


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
    assert torch.ops.stiefel_kernels.cayley_fp_step.default is not None
