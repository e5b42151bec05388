"""Which implementation :mod:`stiefel_kernels.smallmat` runs, and its Newton–Schulz formulation."""
from __future__ import annotations

import pytest
import torch

from stiefel_kernels import _native, smallmat

from _smallmat_inputs import orthogonal, rel_err, rtol, seeded_gen, spd

OPS = ("inv_sqrt_spd", "cholesky_upper_inverse", "solve")


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("STIEFEL_KERNELS_SMALLMAT", raising=False)
    monkeypatch.delenv("STIEFEL_KERNELS_NO_NATIVE", raising=False)
    return monkeypatch


def _pretend_built(monkeypatch, devices=("cpu", "cuda")):
    monkeypatch.setattr(_native, "has_op", lambda op, device_type: device_type in devices)


@pytest.mark.parametrize("op", OPS)
def test_auto_policy_is_the_measured_one(env, op):
    _pretend_built(env)
    assert smallmat.implementation(op, "cpu", 8) == "native"
    limit = smallmat.NATIVE_CPU_MAX_K[op]
    assert smallmat.implementation(op, "cpu", limit or 512) == "native"
    if limit is not None:
        assert smallmat.implementation(op, "cpu", limit + 1) == "torch"
    # CUDA kernels are opt-in until a GPU has measured them.
    assert smallmat.NATIVE_CUDA_DEFAULT is False
    assert smallmat.implementation(op, "cuda", 8) == "torch"
    env.setattr(smallmat, "NATIVE_CUDA_DEFAULT", True)
    assert smallmat.implementation(op, "cuda", 8) == "native"


@pytest.mark.parametrize("op", OPS)
def test_environment_forces_an_implementation(env, op):
    _pretend_built(env)
    env.setenv("STIEFEL_KERNELS_SMALLMAT", "native")
    assert smallmat.implementation(op, "cuda", 8) == "native"
    assert smallmat.implementation(op, "cpu", 512) == "native"
    env.setenv("STIEFEL_KERNELS_SMALLMAT", "torch")
    assert smallmat.implementation(op, "cpu", 8) == "torch"
    env.setenv("STIEFEL_KERNELS_SMALLMAT", "auto")
    env.setenv("STIEFEL_KERNELS_NO_NATIVE", "1")
    assert smallmat.implementation(op, "cpu", 8) == "torch"


def test_forcing_a_kernel_that_is_not_built_raises(env):
    _pretend_built(env, devices=("cpu",))
    env.setenv("STIEFEL_KERNELS_SMALLMAT", "native")
    with pytest.raises(RuntimeError, match="no cuda kernel for solve"):
        smallmat.implementation("solve", "cuda", 8)
    assert smallmat.implementation("solve", "cpu", 8) == "native"
    env.setenv("STIEFEL_KERNELS_SMALLMAT", "fast")
    with pytest.raises(ValueError, match="STIEFEL_KERNELS_SMALLMAT must be one of"):
        smallmat.implementation("solve", "cpu", 8)


def test_not_built_falls_back_to_torch(env):
    _pretend_built(env, devices=())
    for op in OPS:
        assert smallmat.implementation(op, "cpu", 8) == "torch"
        assert smallmat.implementation(op, "cuda", 8) == "torch"


@pytest.mark.skipif(not _native.available, reason="native extension stiefel_kernels._C not built")
def test_entry_points_run_what_implementation_says(env):
    """Bitwise the native op under 'native', bitwise torch.linalg under 'torch'."""
    gen = seeded_gen("dispatch")
    m = spd((3,), 6, 10.0, gen)
    b = torch.randn(3, 6, 2, generator=gen, dtype=torch.float64)
    calls = {
        "inv_sqrt_spd": (smallmat.inv_sqrt_spd, smallmat.inv_sqrt_spd_torch, (m,)),
        "cholesky_upper_inverse": (smallmat.cholesky_upper_inverse,
                                   smallmat.cholesky_upper_inverse_torch, (m,)),
        "solve": (smallmat.solve, smallmat.solve_torch, (m, b)),
    }
    for op, (entry, torch_impl, args) in calls.items():
        env.setenv("STIEFEL_KERNELS_SMALLMAT", "native")
        native = getattr(torch.ops.stiefel_kernels, op)(*args)
        assert all(torch.equal(x, y) for x, y in zip(entry(*args), native)), op
        env.setenv("STIEFEL_KERNELS_SMALLMAT", "torch")
        assert all(torch.equal(x, y) for x, y in zip(entry(*args), torch_impl(*args))), op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k", [1, 8, 33])
def test_newton_schulz_inv_sqrt_matches_eigh(k, dtype):
    m = spd((5,), k, 100.0, seeded_gen("ns", k, dtype)).to(dtype)
    x, info = smallmat.inv_sqrt_spd_newton_schulz(m)
    ref, _ = smallmat.inv_sqrt_spd_torch(m.double())
    assert (info == 0).all()
    assert rel_err(x, ref) < rtol(dtype, 100.0)


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
    assert smallmat.implementation("solve", "cpu", 256) == "native"
    assert (info == 0).all()
    assert float((a @ x - b).norm() / b.norm()) < 1e-12
