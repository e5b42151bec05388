"""Geometry and the Gram/coefficient form, in float64 against the literal definitions."""
import pytest
import torch

import stiefel_kernels as sk
from stiefel_kernels import geometry as geo
from stiefel_kernels import gram

F64 = torch.float64
FULL = {
    "qr": geo.retract_qr,
    "polar": geo.retract_polar,
    "newton_schulz": lambda x, xi: geo.retract_newton_schulz(x, xi, 6),
    "cayley": geo.retract_cayley,
    "cayley_fp": lambda x, xi: geo.retract_cayley_fixed_point(x, xi, 2),
}
# column-form sizes (n, r): odd sizes, n = r, r = 1, a long one
SIZES = [(7, 3), (5, 5), (9, 1), (33, 12), (4097, 4)]


def rand_point(gen, *shape):
    x = torch.randn(*shape, dtype=F64, generator=gen)
    sk.orthonormalize_(x)
    return x


def rel(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.mark.parametrize("n,r", SIZES)
def test_projection_is_tangent_and_idempotent(gen, n, r):
    x = rand_point(gen, 3, n, r)
    d = torch.randn(3, n, r, dtype=F64, generator=gen)
    xi = geo.project_tangent(x, d)
    xtxi = x.mT @ xi
    assert torch.allclose(xtxi, -xtxi.mT, atol=1e-12 * d.norm())  # X^T xi skew
    assert rel(geo.project_tangent(x, xi), xi) < 1e-12
    # orthogonal projection: the residual is normal to every tangent vector
    assert abs(torch.sum((d - xi) * xi).item()) < 1e-10 * d.norm().item() ** 2


@pytest.mark.parametrize("name", list(FULL))
@pytest.mark.parametrize("n,r", SIZES)
def test_gram_form_equals_full_matrix_form(gen, name, n, r):
    x = rand_point(gen, 2, n, r)  # a stack of two
    d = torch.randn(2, n, r, dtype=F64, generator=gen)
    lr = 0.3 / d.norm(dim=(-2, -1), keepdim=True)  # a step of norm ~0.3
    eta = geo.project_tangent(x, d)
    step = geo.cayley_step_size(x, eta, lr) if name == "cayley_fp" else lr
    y_full = FULL[name](x, -step * eta)
    k, g, h = gram.gram_pass(x, d)
    c, e, info = gram.retraction_coefficients(k, g, h, lr, name)
    y = gram.apply_coefficients(x, d, c, e)
    assert (info == 0).all()
    assert rel(y, y_full) < 1e-12


@pytest.mark.parametrize("name", [k for k in FULL if k != "cayley_fp"] + ["cayley_fp"])
@pytest.mark.parametrize("n,r", SIZES[:4])
def test_retractions_orthonormal_and_first_order(gen, name, n, r):
    x = rand_point(gen, n, r)
    d = torch.randn(n, r, dtype=F64, generator=gen)
    xi = geo.project_tangent(x, d)
    xi = xi / xi.norm()
    errs = []
    for t in (1e-2, 1e-3):
        y = FULL[name](x, t * xi)
        ortho = geo.orthogonality_error(y).item()
        # exact retractions are orthonormal to rounding; the fixed point to O(t^4)
        assert ortho < (1e-13 if name != "cayley_fp" else 10 * t**4 + 1e-13)
        errs.append((y - (x + t * xi)).norm().item())
    # R_X(t xi) = X + t xi + O(t^2): error shrinks ~100x when t shrinks 10x
    assert errs[1] < errs[0] / 30
    assert errs[0] < 5e-4 * max(1, r)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_cayley_step_size_clips_large_steps(gen, scale):
    x = rand_point(gen, 2, 25, 4)
    d = scale * torch.randn(2, 25, 4, dtype=F64, generator=gen)
    eta = geo.project_tangent(x, d)
    t = geo.cayley_step_size(x, eta, 0.5)
    pxi = eta - 0.5 * x @ (x.mT @ eta)
    w = pxi @ x.mT - x @ pxi.mT
    w_norm = torch.linalg.matrix_norm(w)[..., None, None]
    assert torch.allclose(t, torch.clamp(1.0 / w_norm, max=0.5), rtol=1e-12)
    k, g, h = gram.gram_pass(x, d)
    assert torch.allclose(gram.cayley_step_size(k, g, h, torch.tensor(0.5, dtype=F64)), t, rtol=1e-10)
    # with the clipped step the fixed point stays near the manifold even for huge directions
    y = geo.retract_cayley_fixed_point(x, -t * eta, 2)
    assert geo.orthogonality_error(y).max() < 0.05


def test_cayley_direct_equals_woodbury(gen):
    x = rand_point(gen, 3, 20, 6)
    xi = 0.2 * geo.project_tangent(x, torch.randn(3, 20, 6, dtype=F64, generator=gen))
    assert rel(geo.retract_cayley(x, xi), geo.retract_cayley_direct(x, xi)) < 1e-13


def test_polar_is_closest_orthonormal(gen):
    x = rand_point(gen, 15, 4)
    xi = 0.5 * geo.project_tangent(x, torch.randn(15, 4, dtype=F64, generator=gen))
    y = geo.retract_polar(x, xi)
    z = x + xi
    for name in ("qr", "cayley"):
        assert (z - y).norm() <= (z - FULL[name](x, xi)).norm() + 1e-12


def test_newton_schulz_converges_for_large_steps(gen):
    x = rand_point(gen, 30, 5)
    xi = 3.0 * geo.project_tangent(x, torch.randn(30, 5, dtype=F64, generator=gen))  # |sigma| >> sqrt(3)
    y = geo.retract_newton_schulz(x, xi, steps=30)
    assert rel(y, geo.retract_polar(x, xi)) < 1e-10


@pytest.mark.parametrize("shape", [(3, 10), (10, 3), (4, 4), (2, 3, 7), (1, 5)])
def test_orthonormalize_keeps_product(gen, shape):
    a = torch.randn(*shape, dtype=F64, generator=gen)
    b = torch.randn(6, shape[-2], dtype=F64, generator=gen)
    before = b @ a
    a_new = a.clone()
    r = sk.orthonormalize_(a_new)
    assert (geo.orthogonality_error(a_new) < 1e-13).all()
    if geo.is_row_orthonormal(shape):  # A_old = R^T A_new
        assert rel(r.mT @ a_new, a) < 1e-13
        assert rel((b @ r.mT) @ a_new, before) < 1e-13
    else:  # X_old = X_new R
        assert rel(a_new @ r, a) < 1e-13


def test_orthonormalize_rejects_bad_input():
    with pytest.raises(ValueError, match="rank deficient"):
        sk.orthonormalize_(torch.ones(3, 8))
    with pytest.raises(ValueError, match="matrix"):
        sk.orthonormalize_(torch.ones(8))
    with pytest.raises(ValueError, match="real"):
        sk.orthonormalize_(torch.ones(2, 8, dtype=torch.complex64))


def test_orientation_and_error():
    a = sk.random_stiefel(3, 50, dtype=F64)
    assert torch.allclose(a @ a.T, torch.eye(3, dtype=F64), atol=1e-13)
    assert geo.as_column_form(a).shape == (50, 3)
    assert geo.as_column_form(torch.empty(50, 3)).shape == (50, 3)
    assert geo.orthogonality_error(2 * a).item() == pytest.approx(3 * 3**0.5, rel=1e-12)
    with pytest.raises(ValueError):
        geo.is_row_orthonormal((5,))


def test_canonical_retraction_names():
    assert gram.canonical_retraction("cayley_smw") == "cayley"
    assert gram.canonical_retraction("cayley_direct") == "cayley"
    assert gram.canonical_retraction("QR") == "qr"
    with pytest.raises(ValueError, match="unknown retraction 'exp'"):
        gram.canonical_retraction("exp")


@pytest.mark.parametrize("retraction", list(gram.RETRACTIONS))
def test_orthonormality_correction_makes_the_output_the_polar_factor(gen, retraction):
    """``step_coefficients`` = the retraction's coefficients times ``(Y^T Y)^(-1/2)``, which turns
    a drifted input and a large step into ``polar(Y)`` (float64, so the tolerance is 1e-10)."""
    x = rand_point(gen, 40, 6)
    x = x @ (torch.eye(6, dtype=F64) + 1e-4 * torch.randn(6, 6, dtype=F64, generator=gen))
    d = torch.randn(40, 6, dtype=F64, generator=gen)
    k, g, h = gram.gram_pass(x, d)
    lr = 0.5
    c0, e0, _ = gram.retraction_coefficients(k, g, h, lr, retraction)
    y0 = gram.apply_coefficients(x, d, c0, e0)
    if retraction.startswith("cayley"):  # the others normalize from the measured K
        assert geo.orthogonality_error(y0).item() > 1e-5  # drift and the step leave the manifold
    c, e, _ = gram.step_coefficients(k, g, h, lr, retraction, tol=1e-12)
    y = gram.apply_coefficients(x, d, c, e)
    u, _, vh = torch.linalg.svd(y0, full_matrices=False)
    assert rel(y, u @ vh) < 1e-10
    if retraction in ("qr", "polar"):  # already orthonormal: the correction leaves them alone
        assert torch.equal(c, c0) and torch.equal(e, e0)
    assert geo.orthogonality_error(y).item() < 1e-13
    # below the threshold nothing changes
    s = gram.orthonormality_correction(k, g, h, c0, e0, tol=1.0)
    assert torch.equal(s, torch.eye(6, dtype=F64))
