"""The CUDA kernels' arithmetic, run on the CPU: ``csrc/cuda/smallmat_block.cuh`` under emulation.

The one-block-per-matrix CUDA kernels (``csrc/cuda/smallmat_cuda.cu``) are thin wrappers around
the block-generic functions of ``smallmat_block.cuh``. ``tests/csrc/block_emulator.cpp`` runs the
same functions with a "block" of std::threads meeting at a barrier where CUDA has
``__syncthreads()``, compiled with ThreadSanitizer: a missing barrier is a data race TSan reports
(the program then exits 66), a barrier some thread skips deadlocks (the run times out), and a read
of workspace nobody wrote gives NaN (the workspace is poisoned). Several block sizes (1, odd, more
threads than work) and grid-stride layouts (a block taking several matrices) are covered.

Oracles: the CPU native ops (same ``info`` semantics, exactly) and float64 torch.linalg, with the
dtype-derived tolerances of tests/README.md. A GPU run of the real kernels is still pending
(no GPU in the session that wrote them); these tests are what holds them to the math meanwhile.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("stiefel_kernels._C", reason="native extension stiefel_kernels._C not built")

from _smallmat_inputs import (check_flags, nonsingular, orthogonal,  # noqa: E402
                              pd_with_negative_pivot, rel_err, rtol, seeded_gen, spd)

ROOT = Path(__file__).resolve().parents[1]
OPS = torch.ops.stiefel_kernels
DTYPES = [torch.float32, torch.float64]
# (k, threads per block, blocks): k from 1 to 64; 1 thread, odd counts, more threads than work.
LAYOUTS = [(1, 1, 1), (2, 7, 2), (5, 3, 1), (16, 32, 3), (33, 7, 2), (64, 8, 1)]
TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"}
TIMEOUT_S = 120  # a skipped barrier deadlocks the emulated block


def _compile(out: Path, include_dir: Path) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the package's own build needs one too)"
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", "-Wall", "-Wextra",
           "-Werror", f"-I{include_dir}", str(ROOT / "tests" / "csrc" / "block_emulator.cpp"),
           "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    return _compile(tmp_path_factory.mktemp("emu") / "block_emulator", ROOT / "csrc")


def _run(exe: Path, op: str, a: torch.Tensor, b: torch.Tensor | None, threads: int, blocks: int,
         workdir: Path) -> tuple[torch.Tensor, torch.Tensor, subprocess.CompletedProcess]:
    """Runs ``op`` on the batch ``a`` (``(batch, k, k)``; ``b`` ``(batch, k, n)`` for solve)."""
    batch, k, _ = a.shape
    n = b.shape[-1] if b is not None else 0
    files = {name: workdir / f"{op}-{name}.bin" for name in ("a", "b", "out", "info")}
    a.contiguous().numpy().tofile(files["a"])
    if b is not None:
        b.contiguous().numpy().tofile(files["b"])
    proc = subprocess.run(
        [str(exe), op, "f64" if a.dtype == torch.float64 else "f32", str(batch), str(k), str(n),
         str(threads), str(blocks), str(files["a"]), str(files["b"]) if b is not None else "-",
         str(files["out"]), str(files["info"])],
        capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, **TSAN_ENV})
    if proc.returncode != 0:
        return None, None, proc
    cols = n if b is not None else k
    out = torch.from_numpy(np.fromfile(files["out"], dtype=a.numpy().dtype)).view(batch, k, cols)
    info = torch.from_numpy(np.fromfile(files["info"], dtype=np.int32))
    return out, info, proc


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"emulator exit {proc.returncode}:\n{proc.stderr[-4000:]}"


def _inputs(op: str, k: int, dtype: torch.dtype, key) -> tuple[torch.Tensor, torch.Tensor | None]:
    """6 matrices, entries 1 and 4 bad (like tests/test_native_ops.py), the rest cond 100."""
    gen = seeded_gen("block", op, k, dtype, *key)
    if op == "solve":
        a = nonsingular((6,), k, 100.0, gen)
        b = torch.randn(6, k, 3, generator=gen, dtype=torch.float64)
        a[1] = 0.0 if k == 1 else torch.cat([a[1, :-1], a[1, :1]])  # two equal rows
        a[4, ..., 0] = float("nan")
        return a.to(dtype), b.to(dtype)
    m = spd((6,), k, 100.0, gen)
    if op == "inv_sqrt_spd":
        q = orthogonal((), k, gen)
        lam = torch.linspace(1, 2, k, dtype=torch.float64)
        lam[: min(2, k)] *= -1  # indefinite
        m[1] = (q * lam) @ q.T
    else:
        m[1] = pd_with_negative_pivot(k, k // 2, gen)
    m[4, -1, 0] = float("inf")  # lower triangle: read by both ops
    return m.to(dtype), None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,threads,blocks", LAYOUTS)
@pytest.mark.parametrize("op", ["inv_sqrt_spd", "cholesky_upper_inverse", "solve"])
def test_emulated_block_kernel_matches_cpu_op_and_float64(emulator, tmp_path, op, k, threads,
                                                          blocks, dtype):
    a, b = _inputs(op, k, dtype, (threads, blocks))
    out, info, proc = _run(emulator, op, a, b, threads, blocks, tmp_path)
    _ok(proc)
    cpu_out, cpu_info = getattr(OPS, op)(*([a] if b is None else [a, b]))
    check_flags(out, info)
    assert torch.equal(info, cpu_info), (info, cpu_info)  # same codes, not only same entries
    assert info[4] == -1
    good = [0, 2, 3, 5]
    if op == "solve":
        ref, _ = torch.linalg.solve_ex(a[good].double(), b[good].double())
    elif op == "inv_sqrt_spd":
        w, v = torch.linalg.eigh(a[good].double())
        ref = (v * w.rsqrt().unsqueeze(-2)) @ v.mT
    else:
        ref = torch.linalg.inv(torch.linalg.cholesky(a[good].double()).mT)
    assert rel_err(out[good], ref) < rtol(dtype, 100.0)
    assert rel_err(out[good], cpu_out[good]) < rtol(dtype, 100.0)
    if op == "inv_sqrt_spd":
        assert torch.equal(out[good], out[good].mT)  # exactly symmetric by construction


def test_emulated_kernels_on_empty_and_tiny_batches(emulator, tmp_path):
    gen = seeded_gen("block-tiny")
    m = spd((1,), 3, 10.0, gen)
    for op in ("inv_sqrt_spd", "cholesky_upper_inverse"):
        # more blocks than matrices: the idle blocks must not touch anything
        out, info, proc = _run(emulator, op, m, None, 4, 3, tmp_path)
        _ok(proc)
        ref, ref_info = getattr(OPS, op)(m)
        assert torch.equal(info, ref_info) and rel_err(out, ref) < 1e-12
    zero = torch.zeros(2, 4, 4, dtype=torch.float64)
    out, info, proc = _run(emulator, "inv_sqrt_spd", zero, None, 5, 1, tmp_path)
    _ok(proc)
    assert info.tolist() == [4, 4] and torch.isnan(out).all()  # every eigenvalue non-positive


def test_ill_conditioned_inputs_are_accurate_or_flagged(emulator, tmp_path):
    """Accuracy degrades with the condition number like LAPACK's; past 1/eps it is flagged."""
    gen = seeded_gen("block-cond")
    k = 12
    for cond in (1e4, 1e8):
        m = spd((3,), k, cond, gen)
        out, info, proc = _run(emulator, "inv_sqrt_spd", m, None, 8, 1, tmp_path)
        _ok(proc)
        w, v = torch.linalg.eigh(m)
        ref = (v * w.rsqrt().unsqueeze(-2)) @ v.mT
        assert (info == 0).all() and rel_err(out, ref) < rtol(torch.float64, cond)
    q = orthogonal((), k, gen)
    lam = torch.logspace(0, 1, k, dtype=torch.float64)
    lam[3] = 1e-20  # far below k * eps * max|w|: numerically singular
    m = ((q * lam) @ q.T).unsqueeze(0)
    for op in ("inv_sqrt_spd", "cholesky_upper_inverse"):
        out, info, proc = _run(emulator, op, m, None, 8, 1, tmp_path)
        _ok(proc)
        assert info.item() != 0 and torch.isnan(out).all()
        assert info.item() == getattr(OPS, op)(m)[1].item()


def test_a_missing_barrier_is_caught(tmp_path):
    """The harness can fail: drop one __syncthreads() from the Cholesky kernel and TSan objects."""
    header = (ROOT / "csrc" / "cuda" / "smallmat_block.cuh").read_text()
    needle = "    if (t == 0) diag[j] = rjj;\n    blk.sync();\n"
    assert header.count(needle) == 1, "the barrier this test removes has moved; update the test"
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "smallmat_block.cuh").write_text(
        header.replace(needle, "    if (t == 0) diag[j] = rjj;\n"))
    exe = _compile(tmp_path / "block_emulator_racy", tmp_path)
    m = spd((2,), 16, 10.0, seeded_gen("block-racy"))
    _, _, proc = _run(exe, "cholesky_upper_inverse", m, None, 8, 1, tmp_path)
    assert proc.returncode == 66 and "data race" in proc.stderr
