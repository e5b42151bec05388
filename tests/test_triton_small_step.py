"""The Triton small-step kernel (cayley_fp, newton_schulz) against the float64 torch math of
:mod:`stiefel_kernels.gram` on fresh random Gram matrices.

Without CUDA the kernel runs under the Triton interpreter on CPU tensors.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from stiefel_kernels import gram  # noqa: E402
from stiefel_kernels.backends import triton_backend as tb  # noqa: E402
from stiefel_kernels.geometry import newton_schulz_scale  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5  # the orthonormality correction's threshold
RANKS = [r for r in (1, 3, 12, 48, 128) if r <= tb.SMALL_STEP_MAX_RANK]


def _grams(gen, num, r):
    """fp32 ``K, G, H`` of ``X`` (orthonormal, perturbed by a per-factor amount: about half the
    factors above ``TOL``) and ``D`` (per-factor scales over six decades)."""
    n = 2 * r + 7
    x = torch.linalg.qr(torch.randn(num, n, r, generator=gen, dtype=torch.float64))[0]
    drift = torch.logspace(-9, -3, num, dtype=torch.float64)[torch.randperm(num, generator=gen)]
    x = x + drift[:, None, None] * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    scale = torch.logspace(-4, 2, num, dtype=torch.float64)[torch.randperm(num, generator=gen)]
    d = scale[:, None, None] * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return [t.float().contiguous() for t in (x.mT @ x, x.mT @ d, d.mT @ d)]


def _reference(k, g, h, lr, retraction):
    k, g, h = k.double(), g.double(), h.double()
    c, e, info = gram.step_coefficients(k, g, h, lr, retraction, tol=TOL, cayley_iters=3,
                                        ns_steps=5)
    assert int(info.abs().sum()) == 0
    return c, e


def _uncorrected_error(k, g, h, lr, retraction):
    """``||Y^T Y - I||_F`` of the retraction before the orthonormality correction, ``(F,)``."""
    k, g, h = k.double(), g.double(), h.double()
    c, e, _ = gram.retraction_coefficients(k, g, h, lr, retraction, cayley_iters=3, ns_steps=5)
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    return torch.linalg.matrix_norm(gram.coefficient_gram(k, g, h, c, e) - eye)


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("retraction", ["cayley_fp", "newton_schulz"])
@pytest.mark.parametrize("r", RANKS)
def test_kernel_matches_gram_math(gen, retraction, r):
    num = 9
    k, g, h = (t.to(DEVICE) for t in _grams(gen, num, r))
    lr = 0.3
    if retraction == "cayley_fp":  # the step clipping takes both ways
        w1 = 1.0 / gram.cayley_step_size(k.double(), g.double(), h.double(),
                                         torch.tensor(float("inf"), dtype=torch.float64))
        clipped = w1.flatten() * lr > 1
        assert clipped.any() and not clipped.all()
    corrected = _uncorrected_error(k, g, h, lr, retraction) > TOL  # and the correction too
    assert corrected.any() and not corrected.all()
    c = torch.full((num, r, r), float("nan"), device=DEVICE)
    e = torch.full_like(c, float("nan"))
    tb.small_step_launch(k, g, h, c, e, lr, retraction, cayley_iters=3, ns_steps=5, tol=TOL)
    c_ref, e_ref = _reference(k, g, h, lr, retraction)
    for i in range(num):
        assert _rel(c[i], c_ref[i]) < 1e-5, (i, _rel(c[i], c_ref[i]))
        assert _rel(e[i], e_ref[i]) < 1e-5, (i, _rel(e[i], e_ref[i]))


def test_inner_slices_fit_the_installed_triton():
    """Every ``BK`` the launcher picks is at least the smallest fp32 ``tl.dot`` the installed
    Triton allows (Triton 3.6 refuses K = 8, which 3.9 accepts; the kernel report compiles
    them) and divides ``R_PAD``."""
    from stiefel_kernels.kernels import launch

    k = launch.min_fp32_dot_k()
    assert k >= 1 and k & (k - 1) == 0
    for r_pad in (16, 32, 64):
        bk, _ = launch.small_step_config(r_pad)
        assert launch.min_fp32_dot_k() <= bk <= r_pad and r_pad % bk == 0


@pytest.mark.parametrize("retraction", ["cayley_fp", "newton_schulz"])
def test_wider_inner_slices_where_triton_needs_them(gen, monkeypatch, retraction):
    """With a Triton whose smallest fp32 dot is K = 16 the rank-48 step streams 16-wide slices
    (not 8) through the scratch: the same coefficients as the float64 math."""
    from stiefel_kernels.kernels import launch

    monkeypatch.setattr(launch, "min_fp32_dot_k", lambda: 16)
    assert launch.small_step_config(64)[0] == 16
    num, r = 7, 48
    k, g, h = (t.to(DEVICE) for t in _grams(gen, num, r))
    c = torch.full((num, r, r), float("nan"), device=DEVICE)
    e = torch.full_like(c, float("nan"))
    tb.small_step_launch(k, g, h, c, e, 0.3, retraction, cayley_iters=3, ns_steps=5, tol=TOL)
    c_ref, e_ref = _reference(k, g, h, 0.3, retraction)
    for i in range(num):
        assert _rel(c[i], c_ref[i]) < 1e-5, (i, _rel(c[i], c_ref[i]))
        assert _rel(e[i], e_ref[i]) < 1e-5, (i, _rel(e[i], e_ref[i]))


@pytest.mark.parametrize("retraction", ["cayley_fp", "newton_schulz"])
def test_padded_coefficients_from_padded_grams(gen, retraction):
    """The backend's layout: ``K, G, H`` read from a zero-padded ``(F, 3, R_PAD, R_PAD)`` buffer
    (garbage outside ``[:r, :r]``), ``C - I`` and ``E`` written with their zero padding."""
    num, r, r_pad = 5, 12, 16
    buf = torch.randn(num, 3, r_pad, r_pad, generator=gen).to(DEVICE)
    for j, t in enumerate(_grams(gen, num, r)):
        buf[:, j, :r, :r] = t.to(DEVICE)
    grams = buf[..., :r, :r]
    hp = tb.StiefelHyperparams(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False,
                               maximize=False, retraction=retraction, cayley_iters=3, ns_steps=5,
                               drift_tol=TOL)
    coef, count = tb.small_step(grams, hp, r_pad)
    assert count is None and coef.shape == (num, 2, r_pad, r_pad)
    c_ref, e_ref = _reference(*grams.unbind(1), hp.lr, retraction)
    eye = torch.eye(r, dtype=torch.float64, device=DEVICE)
    assert _rel(coef[:, 0, :r, :r] + eye, c_ref) < 1e-5
    assert _rel(coef[:, 1, :r, :r], e_ref) < 1e-5
    pad = torch.ones(r_pad, r_pad, dtype=torch.bool, device=DEVICE)
    pad[:r, :r] = False
    assert bool((coef[:, :, pad] == 0).all())


def test_newton_schulz_scale_active(gen):
    """A large ``lr``: ``newton_schulz_scale < 1`` for some factors, and the kernel agrees."""
    num, r = 6, 12
    k, g, h = (t.to(DEVICE) for t in _grams(gen, num, r))
    lr = 2.0
    eye = torch.eye(r, dtype=torch.float64, device=DEVICE)
    c0 = eye + lr * 0.5 * (g.double() + g.double().mT)
    m = gram.coefficient_gram(k.double(), g.double(), h.double(), c0, -lr * eye)
    assert bool((newton_schulz_scale(m) < 1).any())
    c = torch.full((num, r, r), float("nan"), device=DEVICE)
    e = torch.full_like(c, float("nan"))
    tb.small_step_launch(k, g, h, c, e, lr, "newton_schulz", ns_steps=5, tol=TOL)
    c_ref, e_ref = _reference(k, g, h, lr, "newton_schulz")
    assert _rel(c, c_ref) < 1e-5 and _rel(e, e_ref) < 1e-5


def test_launch_rejects_bad_layouts():
    k = torch.zeros(2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError):
        tb.small_step_launch(k.double(), k, k, k, k, 0.1, "cayley_fp")
    with pytest.raises(ValueError):
        tb.small_step_launch(k, k, k, torch.zeros(2, 5, 5, device=DEVICE),
                             torch.zeros(2, 5, 5, device=DEVICE), 0.1, "cayley_fp")
