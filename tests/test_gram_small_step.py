"""The ``r x r`` step of :mod:`stiefel_kernels.gram` without redundant work: ``M N`` by blocks
(once per step), and on the CPU the orthonormality correction only where the drift test fires.
Compared with the dense formulas in float64 (tolerance policy: tests/README.md)."""
from __future__ import annotations

import pytest
import torch

from stiefel_kernels import gram, smallmat
from stiefel_kernels.geometry import sym

F64 = torch.float64


def grams(gen, batch, n, r, dtype=F64, drift=0.0):
    x = torch.linalg.qr(torch.randn(*batch, n, r, generator=gen, dtype=F64))[0]
    x = x + drift * torch.randn(*batch, n, r, generator=gen, dtype=F64)
    d = torch.randn(*batch, n, r, generator=gen, dtype=F64)
    return tuple(t.to(dtype) for t in (x.mT @ x, x.mT @ d, d.mT @ d))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("r,batch", [(1, (3,)), (5, ()), (16, (2, 3)), (64, (4,))])
def test_block_mn_equals_dense_product(gen, r, batch):
    k, g, h = grams(gen, batch, 3 * r + 2, r)
    dense = gram._cayley_generator(k, g, sym(g), torch.ones((), dtype=F64)) @ gram._gram_2r(k, g, h)
    assert rel(gram._cayley_mn1(k, g, h, sym(g)), dense) < 1e-10


def _dense_correction(k, g, h, c, e, tol):
    """The correction as defined: Newton-Schulz on every factor, the identity where the drift
    test does not fire."""
    eye = torch.eye(k.shape[-1], dtype=k.dtype).expand_as(k)
    m = sym(gram.coefficient_gram(k, g, h, c, e))
    err = torch.linalg.matrix_norm(m - eye)
    z, scale = smallmat.newton_schulz_inv_sqrt(m, gram.CORRECTION_ITERS)
    return torch.where((err > tol)[..., None, None], z * scale.rsqrt(), eye), err > tol


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-6)], ids=str)
def test_correction_only_where_the_drift_test_fires(gen, dtype, tol):
    # factors 0, 2 drift (the test fires), the others do not
    batch = 5
    k, g, h = grams(gen, (batch,), 40, 6, dtype)
    drifted = grams(gen, (batch,), 40, 6, dtype, drift=1e-2)
    for i in (0, 2):
        k[i], g[i], h[i] = drifted[0][i], drifted[1][i], drifted[2][i]
    c, e, _ = gram.retraction_coefficients(k, g, h, 1e-3, "cayley", cayley_iters=2)
    want, fire = _dense_correction(k, g, h, c, e, tol)
    assert fire[0] and fire[2]
    got = gram.orthonormality_correction(k, g, h, c, e, tol)
    bound = 1e-10 if dtype == F64 else 1e-5
    assert rel(got, want) < bound
    assert torch.equal(got[~fire], want[~fire])  # the identity, exactly
    c2, e2, _ = gram.step_coefficients(k, g, h, 1e-3, "cayley", tol=tol)
    assert rel(c2, c @ want) < bound and rel(e2, e @ want) < bound


def test_no_drift_returns_the_retraction_coefficients(gen):
    """Where no factor drifts, ``(C, E)`` are the retraction's, bit for bit (``C S = C`` for
    ``S = I``), and the stacked form agrees with the unstacked one."""
    k, g, h = grams(gen, (2, 3), 50, 4)
    c, e, _ = gram.retraction_coefficients(k, g, h, 1e-3, "cayley", cayley_iters=2)
    _, fire = _dense_correction(k, g, h, c, e, 1.0)
    assert not fire.any()
    assert gram._correction_or_none(k, g, h, c, e, 1.0) is None
    c2, e2, _ = gram.step_coefficients(k, g, h, 1e-3, "cayley", tol=1.0)
    assert torch.equal(c2, c) and torch.equal(e2, e)
    assert torch.equal(gram.orthonormality_correction(k, g, h, c, e, 1.0),
                       torch.eye(4, dtype=F64).expand(2, 3, 4, 4))


@pytest.mark.parametrize("retraction,iters", [("cayley_fp", 0), ("cayley_fp", 1), ("cayley_fp", 3),
                                              ("cayley", 3)])
def test_cayley_coefficients_match_dense_formulas(gen, retraction, iters):
    """``(C, E)`` from the block ``M N`` against the dense ``2r x 2r`` formulas (float64)."""
    k, g, h = grams(gen, (3,), 30, 5)
    lr = torch.tensor(0.3, dtype=F64)
    c, e, _ = gram.retraction_coefficients(k, g, h, lr, retraction, cayley_iters=iters)
    step = gram.cayley_step_size(k, g, h, lr) if retraction == "cayley_fp" else lr
    amat = gram._cayley_generator(k, g, sym(g), step) @ gram._gram_2r(k, g, h)
    eye = torch.eye(5, dtype=F64).expand(3, 5, 5)
    e1 = torch.cat([eye, torch.zeros_like(eye)], dim=-2)
    if retraction == "cayley":
        want = torch.linalg.solve(torch.eye(10, dtype=F64) - 0.5 * amat, e1 + 0.5 * amat @ e1)
    else:
        want = torch.cat([eye + step * sym(g), -step * eye], dim=-2)
        for _ in range(iters):
            want = e1 + 0.5 * amat @ (e1 + want)
    assert rel(torch.cat([c, e], dim=-2), want) < 1e-10


@pytest.mark.parametrize("dtype,target", [(F64, 1e-12), (torch.float32, 1e-8)], ids=str)
@pytest.mark.parametrize("drift", [1e-7, 5e-6, 3e-5, 1e-4, 3e-3, 5e-3, 1e-2, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("r", [1, 16, 64])
def test_correction_iters_for_reach_rounding(gen, drift, r, dtype, target):
    """The Newton–Schulz steps the CPU correction takes for a drift (``correction_iters_for``)
    bring a symmetric ``M = I + A``, ``||A||_F = drift``, to ``||X M X - I||_F`` below the
    rounding target of the step's dtype (computed in float64; 1e-8 for float32 steps, a tenth of
    its epsilon): fewer steps would leave more (checked one step short where it matters)."""
    a = torch.randn(8, r, r, generator=gen, dtype=torch.float64)
    a = a + a.mT
    m = torch.eye(r, dtype=torch.float64) + a / torch.linalg.matrix_norm(a)[:, None, None] * drift
    steps = gram.correction_iters_for(drift, dtype)

    def residual(k):
        z, c = smallmat.newton_schulz_inv_sqrt(m, k)
        x = z * c.rsqrt()
        return float(torch.linalg.matrix_norm(x @ m @ x - torch.eye(r, dtype=torch.float64)).max())

    assert residual(steps) < target
    if r > 1 and ((dtype == F64 and drift >= 1e-2) or (dtype != F64 and 1e-4 <= drift <= 0.1)):
        assert residual(steps - 1) > target  # the mapping is not loose by a step


def test_float32_correction_takes_one_step_at_rounding_drift():
    """At the drift a float32 step measures from its own rounding (~5e-6 at r = 64) the
    correction is one Newton–Schulz step, which multiplies nothing (its products are with the
    identity)."""
    assert gram.correction_iters_for(5e-6, torch.float32) == 1
    assert gram.correction_iters_for(5e-6, torch.float64) == 2


def test_step_coefficients_of_an_empty_batch():
    """A rank whose shard holds no matrix of a stack steps an empty batch: nothing to correct,
    empty coefficients (the drift of no factor is not a host value to read)."""
    k = torch.zeros(0, 4, 4)
    c, e, info = gram.step_coefficients(k, k.clone(), k.clone(), 1e-2, "cayley_fp", tol=1e-6)
    assert c.shape == e.shape == (0, 4, 4) and info.shape == (0,)
