"""Which kernel the ``stiefel_kernels::`` ops run (one mechanism: the dispatcher), and the
Newton–Schulz inverse square root of :mod:`stiefel_kernels.smallmat`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stiefel_kernels import _native, ops, smallmat

from _smallmat_inputs import orthogonal, rel_err, rtol, seeded_gen, spd

ROOT = Path(__file__).resolve().parents[1]
NOT_BUILT = pytest.mark.skipif(not _native.available,
                               reason="native extension stiefel_kernels._C not built")


def _inputs(k=6):
    gen = seeded_gen("dispatch", k)
    m = spd((3,), k, 10.0, gen)
    b = torch.randn(3, k, 2, generator=gen, dtype=torch.float64)
    return {"inv_sqrt_spd": (m,), "cholesky_upper_inverse": (m,), "solve": (m, b)}


FORMULATIONS = {"inv_sqrt_spd": smallmat.inv_sqrt_spd_torch,
                "cholesky_upper_inverse": smallmat.cholesky_upper_inverse_torch,
                "solve": smallmat.solve_torch}
ENTRY_POINTS = {"inv_sqrt_spd": smallmat.inv_sqrt_spd,
                "cholesky_upper_inverse": smallmat.cholesky_upper_inverse, "solve": smallmat.solve}


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                          timeout=300)


def test_ops_exist_with_their_default_kernels_without_the_extension():
    """Without ``_C`` the ops are still there and run the torch.linalg formulations, bit for bit
    (a fresh interpreter in which importing ``_C`` fails)."""
    code = """
import sys, warnings
sys.modules["stiefel_kernels._C"] = None  # import of the extension fails
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from stiefel_kernels import _native, smallmat
assert not _native.available and any("_C" in str(w.message) for w in caught)
sys.path.insert(0, "tests")
from test_smallmat_dispatch import FORMULATIONS, ENTRY_POINTS, _inputs
for name, args in _inputs().items():
    got, want = ENTRY_POINTS[name](*args), FORMULATIONS[name](*args)
    assert all(torch.equal(x, y) for x, y in zip(got, want)), name
    assert not _native.has_op(name, "cpu")
print("defaults ok")
"""
    res = _run(code)
    assert res.returncode == 0 and "defaults ok" in res.stdout, res.stderr[-3000:]


@NOT_BUILT
def test_native_cpu_kernels_override_the_defaults():
    """With ``_C`` loaded, the CPU kernel registered by ``csrc/ops_cpu.cpp`` runs: the dispatcher
    lists it next to the default, and its contract (NaN where ``info`` is nonzero) shows."""
    for name in ops.OPS:
        table = torch._C._dispatch_dump(f"stiefel_kernels::{name}")
        assert "CPU: registered at" in table and "ops_cpu.cpp" in table, table
        assert "CompositeExplicitAutograd[alias]: registered at" in table, table
        assert _native.has_op(name, "cpu")
    m = -torch.eye(4, dtype=torch.float64).expand(2, 4, 4).clone()  # not positive definite
    x, info = smallmat.cholesky_upper_inverse(m)
    _, info_default = smallmat.cholesky_upper_inverse_torch(m)
    assert (info != 0).all() and (info_default != 0).all()
    assert torch.isnan(x).all()  # the native kernel's fill; the default leaves LAPACK's output
    for name, args in _inputs(12).items():  # and the two agree where both succeed
        (x, info), (ref, ref_info) = ENTRY_POINTS[name](*args), FORMULATIONS[name](*args)
        assert torch.equal(info, ref_info) and rel_err(x, ref) < 1e-12, name


def test_cuda_kernels_are_opt_in():
    """Unmeasured on a GPU, the CUDA kernels run only when asked for; asking where they were
    not built is an error (at import: a warning) and changes nothing."""
    assert not _native.has_op("solve", "cuda") or _native.cuda_kernels_enabled
    if not (_native.available and _native._C.with_cuda):
        with pytest.raises(RuntimeError, match="CUDA"):
            _native.enable_cuda_kernels()
        assert not _native.cuda_kernels_enabled and not _native.has_op("solve", "cuda")
        res = _run("import warnings; warnings.simplefilter('error', RuntimeWarning)\n"
                   "try:\n    import stiefel_kernels\nexcept RuntimeWarning as w:\n    print('warned', w)",
                   STIEFEL_KERNELS_CUDA_KERNELS="1")
        assert res.returncode == 0 and "warned" in res.stdout and "STIEFEL_KERNELS_CUDA_KERNELS" in res.stdout, \
            res.stdout + res.stderr[-2000:]
    else:  # a CUDA build: enable, check the dispatcher, take them back
        was = _native.cuda_kernels_enabled
        _native.enable_cuda_kernels()
        assert _native.has_op("solve", "cuda")
        assert "CUDA: registered at" in torch._C._dispatch_dump("stiefel_kernels::solve")
        _native.disable_cuda_kernels()
        assert "CUDA: registered at" not in torch._C._dispatch_dump("stiefel_kernels::solve")
        if was:
            _native.enable_cuda_kernels()


def test_default_kernels_check_arguments_like_the_native_ones():
    m = torch.zeros(2, 3, 4, dtype=torch.float64)
    for op in (ops._inv_sqrt_spd_default, ops._cholesky_upper_inverse_default):
        with pytest.raises(RuntimeError, match="expected square matrices"):
            op(m)
    with pytest.raises(RuntimeError, match="expected float32 or float64"):
        ops._inv_sqrt_spd_default(torch.zeros(2, 3, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="b must have 3 rows"):
        ops._solve_default(torch.eye(3, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k", [1, 8, 33])
def test_newton_schulz_inv_sqrt_matches_eigh(k, dtype):
    m = spd((5,), k, 100.0, seeded_gen("ns", k, dtype)).to(dtype)
    x, info = smallmat.inv_sqrt_spd_newton_schulz(m)
    ref, _ = smallmat.inv_sqrt_spd_torch(m.double())
    assert (info == 0).all()
    assert rel_err(x, ref) < rtol(dtype, 100.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("iters", [0, 1, 2, 5])
def test_newton_schulz_inv_sqrt_equals_the_literal_iteration(iters, dtype):
    """The implementation skips the first step's products with Z = I and the last step's Y
    update; products with the identity are exact, so the result is the literal coupled
    iteration's, bit for bit."""
    m = spd((3,), 9, 50.0, seeded_gen("ns-literal", iters, dtype)).to(dtype)
    eye = torch.eye(9, dtype=dtype).expand_as(m)
    z, c = smallmat.newton_schulz_inv_sqrt(m, iters)
    y, z_ref = m / c, eye
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z_ref @ y)
        y, z_ref = y @ t, t @ z_ref
    assert torch.equal(z, z_ref)


def test_newton_schulz_inv_sqrt_flags_what_it_cannot_invert():
    gen = seeded_gen("ns-bad")
    k = 7
    m = spd((4,), k, 10.0, gen)
    q = orthogonal((), k, gen)
    lam = torch.linspace(1, 2, k, dtype=torch.float64)
    lam[0] = -1.0
    m[1] = (q * lam) @ q.T  # indefinite: the iteration cannot converge
    m[2, 3, 1] = float("nan")
    m[3] = spd((), k, 1e12, gen)  # far too ill-conditioned for 20 steps
    x, info = smallmat.inv_sqrt_spd_newton_schulz(m)
    assert info.tolist() == [0, -2, -1, -2]
    assert torch.isfinite(x[0]).all()


@pytest.mark.skipif(not _native.available, reason="native extension stiefel_kernels._C not built")
def test_cpu_solve_is_right_after_threads_were_raised():
    """torch 2.13 (CPU): while ``torch.set_num_threads(n >= 2)`` is in effect, batched
    ``torch.linalg.solve_ex`` of 256 x 256 matrices returns wrong solutions with ``info = 0``.
    The dispatched solve (exact Cayley's ``2r x 2r`` step at rank 128) must stay right."""
    gen = seeded_gen("solve after threads")
    a = torch.randn(2, 256, 256, generator=gen, dtype=torch.float64) + 16 * torch.eye(256, dtype=torch.float64)
    b = torch.randn(2, 256, 3, generator=gen, dtype=torch.float64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, old))
        x, info = smallmat.solve(a, b)
    finally:
        torch.set_num_threads(old)
    assert _native.has_op("solve", "cpu")
    assert (info == 0).all()
    assert float((a @ x - b).norm() / b.norm()) < 1e-12


@pytest.mark.parametrize("cond", [1e1, 1e4, 1e7])
@pytest.mark.parametrize("k", [1, 16, 64])
def test_sync_free_cuda_inverse_square_root_converges(cond, k):
    """What ``smallmat.inv_sqrt_spd`` runs on CUDA without the native kernels (so ``polar`` never
    waits for the device): float64 Newton–Schulz, ``CUDA_NS_ITERS`` steps, to float64 rounding
    times the condition number, with ``info == 0``, up to condition number 1e7."""
    gen = seeded_gen("ns-cuda", k, int(cond))
    q = orthogonal((4,), k, gen)
    ev = torch.logspace(0, float(torch.log10(torch.tensor(cond))), k, dtype=torch.float64)
    m = (q * ev) @ q.mT
    ref = (q * ev.rsqrt()) @ q.mT
    x, info = smallmat.inv_sqrt_spd_newton_schulz(m, smallmat.CUDA_NS_ITERS)
    assert info.eq(0).all()
    assert rel_err(x, ref) < 1e-12 * max(1.0, cond / 1e3)  # the policy's float64 bound
