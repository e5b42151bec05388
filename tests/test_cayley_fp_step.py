"""``torch.ops.stiefel_kernels.cayley_fp_step``: the whole ``r x r`` step of ``cayley_fp``
(coefficients and orthonormality correction). Its CPU kernel (csrc/cayley_step_cpu.cpp) is
compared with the torch formulation (:func:`stiefel_kernels.gram._step_coefficients_torch`, the
op's default kernel) and with float64 math, on fresh Gram matrices where some factors drift (the
correction fires) and others do not, odd ranks, stacks and strided views (tolerance policy:
tests/README.md; float64 1e-10, float32 1e-5).
"""
from __future__ import annotations

import pytest
import torch

from stiefel_kernels import gram, ops

OPS = torch.ops.stiefel_kernels
F64 = torch.float64
TOL = {torch.float32: 1e-5, F64: 1e-10}
DRIFT_TOL = {torch.float32: 1e-6, F64: 1e-10}


def grams(gen, batch, n, r, dtype, drifts):
    """``K, G, H`` of ``(*batch, n, r)`` orthonormal factors plus noise of the given sizes
    (cycled over the flattened batch) and random directions."""
    x = torch.linalg.qr(torch.randn(*batch, n, r, generator=gen, dtype=F64))[0]
    noise = torch.randn(*batch, n, r, generator=gen, dtype=F64)
    scale = torch.tensor([drifts[i % len(drifts)] for i in range(x[..., 0, 0].numel())], dtype=F64)
    x = x + noise * scale.reshape(*batch, 1, 1)
    d = torch.randn(*batch, n, r, generator=gen, dtype=F64)
    return tuple(t.to(dtype) for t in (x.mT @ x, x.mT @ d, d.mT @ d))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def native(k, g, h, lr, iters, tol):
    r = k.shape[-1]
    lr_t = torch.as_tensor(lr, dtype=F64).reshape(-1)
    c, e = OPS.cayley_fp_step(k.reshape(-1, r, r), g.reshape(-1, r, r), h.reshape(-1, r, r), lr_t,
                              iters, tol)
    return c.reshape(k.shape), e.reshape(k.shape)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("r,batch,n", [(1, (4,), 9), (5, (3,), 40), (16, (2, 3), 100),
                                       (17, (5,), 60), (64, (3,), 300)])
@pytest.mark.parametrize("iters", [1, 2, 3])
def test_native_kernel_matches_torch_formulation(gen, r, batch, n, iters, dtype):
    assert gram._NATIVE_CAYLEY_STEP, "the native extension is built in CI: its kernel must be registered"
    k, g, h = grams(gen, batch, n, r, dtype, drifts=[0.0, 1e-3, 0.0, 3e-2])
    for lr in (1e-3, 0.3, 50.0):  # 50: cayley_fp clips the step to 1/||W_1||_F
        want_c, want_e, _ = gram._step_coefficients_torch(k, g, h, lr, "cayley_fp",
                                                         tol=DRIFT_TOL[dtype], cayley_iters=iters)
        got_c, got_e = native(k, g, h, lr, iters, DRIFT_TOL[dtype])
        assert rel(got_c, want_c) < TOL[dtype] and rel(got_e, want_e) < TOL[dtype], lr
        # and the dispatcher: step_coefficients takes the native kernel on the CPU
        c, e, info = gram.step_coefficients(k, g, h, lr, "cayley_fp", tol=DRIFT_TOL[dtype],
                                            cayley_iters=iters)
        assert torch.equal(c, got_c) and torch.equal(e, got_e) and (info == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_correction_makes_the_new_point_orthonormal(gen, dtype):
    """Where the drift test fires, ``Y^T Y`` of the corrected coefficients (float64 math on the
    kernel's inputs) is the identity to the dtype's rounding; where it does not, ``(C, E)`` are
    the retraction's."""
    k, g, h = grams(gen, (6,), 80, 12, dtype, drifts=[1e-2, 0.0])
    c, e = native(k, g, h, 1e-2, 2, DRIFT_TOL[dtype])
    yty = gram.coefficient_gram(*(t.double() for t in (k, g, h, c, e)))
    err = torch.linalg.matrix_norm(yty - torch.eye(12, dtype=F64))
    bound = 1e-5 if dtype == torch.float32 else 1e-12
    assert (err[0::2] < bound).all(), err  # drifted by 1e-2: corrected
    c0, e0, _ = gram.retraction_coefficients(k, g, h, 1e-2, "cayley_fp")
    no_fire = native(k, g, h, 1e-2, 2, 1.0)  # tol above every drift: nothing corrected
    assert rel(no_fire[0], c0) < TOL[dtype] and rel(no_fire[1], e0) < TOL[dtype]


def test_per_factor_learning_rates(gen):
    k, g, h = grams(gen, (5,), 30, 4, F64, drifts=[0.0])
    lrs = torch.tensor([1e-3, 0.1, 1.0, 10.0, 0.0], dtype=F64)
    got_c, got_e = native(k, g, h, lrs, 2, 1e-10)
    for i in range(5):
        want_c, want_e, _ = gram._step_coefficients_torch(k[i:i + 1], g[i:i + 1], h[i:i + 1],
                                                         float(lrs[i]), "cayley_fp", tol=1e-10)
        assert rel(got_c[i:i + 1], want_c) < 1e-10 and rel(got_e[i:i + 1], want_e) < 1e-10
    assert torch.equal(got_e[4], torch.zeros(4, 4, dtype=F64))  # lr 0: E = 0


def test_strided_views_and_mixed_layouts(gen):
    """The views of pass 1's ``(F, 3, r, r)`` output (one layout), and k, g, h in different
    layouts (copied inside)."""
    for r in (7, 16):  # r = 16: whole-vector transposes in the kernel
        k, g, h = grams(gen, (4,), 50, r, torch.float32, drifts=[1e-3])
        stacked = torch.stack([k, g, h], dim=1)
        kv, gv, hv = stacked.unbind(1)
        want = native(k.contiguous(), g.contiguous(), h.contiguous(), 0.05, 2, 1e-6)
        col = [t.mT.contiguous().mT for t in (k, g, h)]  # one layout, not row-major: gathered
        for args in [(kv, gv, hv), (k, g.mT.contiguous().mT, h), col]:
            got = native(*args, 0.05, 2, 1e-6)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_same_bits_at_one_and_two_threads(gen, dtype):
    k, g, h = grams(gen, (24,), 200, 32, dtype, drifts=[0.0, 1e-3])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native(k, g, h, 1e-2, 2, DRIFT_TOL[dtype])
        torch.set_num_threads(2)
        two = native(k, g, h, 1e-2, 2, DRIFT_TOL[dtype])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_non_finite_input_is_not_corrected_and_stays_non_finite(gen):
    """A NaN in a factor's Gram matrices gives NaN coefficients for that factor (as the torch
    formulation does: its drift test is False on NaN), and the other factors are unaffected."""
    k, g, h = grams(gen, (3,), 30, 4, torch.float32, drifts=[0.0])
    g[1, 0, 0] = float("nan")
    c, e = native(k, g, h, 1e-2, 2, 1e-6)
    assert not torch.isfinite(c[1]).all()
    want_c, want_e = native(k[[0, 2]], g[[0, 2]], h[[0, 2]], 1e-2, 2, 1e-6)
    assert torch.equal(c[[0, 2]], want_c) and torch.equal(e[[0, 2]], want_e)


def test_empty_batch():
    z = torch.zeros(0, 4, 4)
    c, e = OPS.cayley_fp_step(z, z, z, torch.tensor([1e-3]), 2, 1e-6)
    assert c.shape == e.shape == (0, 4, 4)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4), torch.ones(1), 2), "shape \\(F, r, r\\)"),
    ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(1), 2), "shape \\(F, r, r\\)"),
    ((torch.zeros(2, 4, 4), torch.zeros(3, 4, 4), torch.zeros(2, 4, 4), torch.ones(1), 2), "one shape"),
    ((torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=F64), torch.zeros(2, 4, 4), torch.ones(1), 2),
     "float32 or float64"),
    ((torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), torch.ones(3), 2), "lr must have"),
    ((torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), torch.ones(1), 0), "iters must be"),
])
def test_rejects_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        OPS.cayley_fp_step(*args, 1e-6)
    with pytest.raises(RuntimeError, match=match):
        ops._cayley_fp_step_default(*args, 1e-6)


def test_fake_kernel_gives_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(3, 5, 5)
        c, e = OPS.cayley_fp_step(z, z, z, torch.empty(3), 2, 1e-6)
    assert c.shape == e.shape == (3, 5, 5)


def test_default_kernel_is_the_torch_formulation(gen):
    k, g, h = grams(gen, (3,), 30, 6, F64, drifts=[1e-3, 0.0])
    c, e = ops._cayley_fp_step_default(k, g, h, torch.tensor([0.1], dtype=F64), 2, 1e-10)
    want_c, want_e, _ = gram._step_coefficients_torch(k, g, h, 0.1, "cayley_fp", tol=1e-10)
    assert torch.equal(c, want_c) and torch.equal(e, want_e)


def test_nan_only_in_h_gives_what_the_torch_formulation_gives(gen):
    """A NaN in ``H`` alone: the step size is NaN (torch's clamp_min / minimum keep it), so both
    formulations give non-finite coefficients for that factor."""
    k, g, h = grams(gen, (2,), 30, 4, torch.float32, drifts=[0.0])
    h[0, 1, 2] = float("nan")
    for iters in (1, 2):
        c, e = native(k, g, h, 1e-2, iters, 1e-6)
        want_c, want_e, _ = gram._step_coefficients_torch(k, g, h, 1e-2, "cayley_fp", tol=1e-6,
                                                         cayley_iters=iters)
        assert torch.equal(torch.isfinite(c), torch.isfinite(want_c))
        assert torch.equal(torch.isfinite(e), torch.isfinite(want_e))
        assert not torch.isfinite(e[0]).all() and torch.isfinite(e[1]).all()


def test_per_factor_lr_through_step_coefficients_with_batch_dims(gen):
    """A per-factor ``lr`` tensor of a ``(2, 3)`` stack, through ``step_coefficients`` (native)
    and ``retraction_coefficients`` (torch), factor by factor against scalar ``lr``; and an empty
    stack with a per-factor ``lr`` of no elements."""
    k, g, h = grams(gen, (2, 3), 40, 5, F64, drifts=[0.0, 1e-3])
    lr = torch.tensor([[1e-3, 0.1, 2.0], [0.5, 0.0, 30.0]], dtype=F64)[..., None, None]
    c, e, _ = gram.step_coefficients(k, g, h, lr, "cayley_fp", tol=1e-10)
    c1, e1, _ = gram.retraction_coefficients(k, g, h, lr, "cayley_fp")
    for i in range(2):
        for j in range(3):
            one = (k[i, j], g[i, j], h[i, j])
            wc, we, _ = gram._step_coefficients_torch(*one, float(lr[i, j]), "cayley_fp", tol=1e-10)
            assert rel(c[i, j], wc) < 1e-10 and rel(e[i, j], we) < 1e-10
            wc, we, _ = gram.retraction_coefficients(*one, float(lr[i, j]), "cayley_fp")
            assert rel(c1[i, j], wc) < 1e-10 and rel(e1[i, j], we) < 1e-10
    z = torch.zeros(0, 4, 4)
    for fn in (gram.step_coefficients, gram._step_coefficients_torch):
        c, e, info = fn(z, z, z, torch.zeros(0, 1, 1), "cayley_fp", tol=1e-6)
        assert c.shape == e.shape == (0, 4, 4) and info.shape == (0,)


def test_native_correction_table_mirrors_gram():
    """csrc/cayley_step_cpu.cpp repeats gram._CORRECTION_STEPS and CORRECTION_ITERS (the kernel
    cannot import them); the two must say the same."""
    import pathlib
    import re

    src = (pathlib.Path(__file__).parents[1] / "csrc" / "cayley_step_cpu.cpp").read_text()

    def array(name):
        body = re.search(rf"{name}\[\] = \{{([^}}]*)\}}", src).group(1)
        return [float(x) for x in body.split(",")]

    for dtype, suffix in ((F64, "64"), (torch.float32, "32")):
        table = gram._CORRECTION_STEPS[dtype]
        assert array(f"kBound{suffix}") == [b for b, _ in table]
        assert array(f"kSteps{suffix}") == [s for _, s in table]
    assert re.search(r"return (\d+);  // gram.CORRECTION_ITERS", src).group(1) == str(gram.CORRECTION_ITERS)


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, F64):
        k, g, h = grams(gen, (3,), 20, 4, dtype, drifts=[0.0, 1e-3])
        torch.library.opcheck(OPS.cayley_fp_step.default, (k, g, h, torch.tensor([1e-2]), 2, 1e-6))
        torch.library.opcheck(OPS.cayley_fp_step.default,
                              (k, g, h, torch.tensor([1e-2, 0.1, 1.0], dtype=F64), 1, 1e-6))


# ------------------------------------------------------------------ cayley_fp_step_into
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_into_writes_the_same_bits(gen, dtype):
    """C, E into caller buffers (first filled with NaN: every element must be written) are the
    allocating op's, bit for bit; K, G, H as strided views of one (F, 3, r, r) buffer, as the
    optimizer passes them."""
    k, g, h = grams(gen, (5,), 40, 16, dtype, drifts=[0.0, 1e-5, 1e-3, 0.0, 0.05])
    kgh = torch.stack([k, g, h], dim=1)
    k, g, h = kgh.unbind(1)
    lr = torch.tensor([1e-2, 0.1, 1.0, 3.0, 1e-3], dtype=F64)
    want_c, want_e = OPS.cayley_fp_step(k, g, h, lr, 2, 1e-6)
    c = torch.full_like(want_c, float("nan"))
    e = torch.full_like(want_e, float("nan"))
    assert OPS.cayley_fp_step_into(k, g, h, lr, 2, 1e-6, c, e) is None
    assert torch.equal(c, want_c) and torch.equal(e, want_e)
    # through step_coefficients(out=...): the buffers themselves come back
    c2, e2 = torch.empty_like(c), torch.empty_like(e)
    cc, ee, _ = gram.step_coefficients(k, g, h, lr.view(-1, 1, 1), "cayley_fp", tol=1e-6, out=(c2, e2))
    assert cc.data_ptr() == c2.data_ptr() and ee.data_ptr() == e2.data_ptr()
    assert torch.equal(cc, want_c) and torch.equal(ee, want_e)


def test_step_coefficients_without_the_into_kernel_allocates(gen, monkeypatch):
    """An extension built before cayley_fp_step_into: step_coefficients leaves out= alone and
    runs the allocating native op (not the _into op's pure-torch default)."""
    k, g, h = grams(gen, (3,), 30, 8, torch.float32, drifts=[0.0, 1e-3, 0.0])
    lr = torch.tensor(1e-2, dtype=F64)
    want_c, want_e, _ = gram.step_coefficients(k, g, h, lr, "cayley_fp", tol=1e-6)
    monkeypatch.setattr(gram, "_NATIVE_CAYLEY_STEP_INTO", False)
    c, e = torch.zeros_like(k), torch.zeros_like(k)
    cc, ee, _ = gram.step_coefficients(k, g, h, lr, "cayley_fp", tol=1e-6, out=(c, e))
    assert torch.equal(cc, want_c) and torch.equal(ee, want_e)
    assert not c.any() and not e.any()


def test_into_rejects_bad_buffers(gen):
    k, g, h = grams(gen, (3,), 20, 4, torch.float32, drifts=[0.0, 1e-3, 0.0])
    lr = torch.tensor([1e-2])
    ok = torch.empty(3, 4, 4)
    bad = {
        "shape": (torch.empty(3, 4, 5), ok, "must be contiguous CPU tensors of k's shape"),
        "dtype": (torch.empty(3, 4, 4, dtype=F64), ok, "must be contiguous CPU tensors of k's shape"),
        "layout": (torch.empty(3, 4, 4).mT, ok, "must be contiguous CPU tensors of k's shape"),
        "same": (ok, ok, "c and e must not share memory"),
    }
    for name, (c, e, match) in bad.items():
        with pytest.raises(RuntimeError, match=match):
            OPS.cayley_fp_step_into(k, g, h, lr, 2, 1e-6, c, e)
    # an output over the inputs: C written over G would be read after it is written
    kgh = torch.stack([k, g, h], dim=1).contiguous()
    kk, gg, hh = kgh.unbind(1)
    over = kgh.view(-1)[16:16 + 48].view(3, 4, 4)
    with pytest.raises(RuntimeError, match="must not share memory with k, g, h or lr"):
        OPS.cayley_fp_step_into(kk, gg, hh, lr, 2, 1e-6, over, torch.empty(3, 4, 4))


def test_into_opcheck_and_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, F64):
        k, g, h = grams(gen, (3,), 20, 4, dtype, drifts=[0.0, 1e-3, 0.0])
        c, e = torch.empty_like(k), torch.empty_like(k)
        torch.library.opcheck(OPS.cayley_fp_step_into.default,
                              (k, g, h, torch.tensor([1e-2, 0.1, 1.0], dtype=F64), 2, 1e-6, c, e))
    with FakeTensorMode():
        k = torch.empty(2, 4, 4)
        with pytest.raises(RuntimeError, match="c must be a contiguous tensor of shape"):
            OPS.cayley_fp_step_into(k, k, k, torch.empty(1), 2, 1e-6, torch.empty(2, 4, 5), torch.empty(2, 4, 4))


def test_into_default_kernel_writes_the_torch_formulation(gen):
    """The default kernel (other devices) writes what the allocating default gives."""
    k, g, h = grams(gen, (4,), 30, 8, F64, drifts=[0.0, 1e-3, 0.0, 0.02])
    lr = torch.tensor([1e-2])
    want_c, want_e = ops._cayley_fp_step_default(k, g, h, lr, 2, 1e-10)
    c, e = torch.empty_like(want_c), torch.empty_like(want_e)
    ops._cayley_fp_step_into_default(k, g, h, lr, 2, 1e-10, c, e)
    assert torch.equal(c, want_c) and torch.equal(e, want_e)
