"""The native ops ``torch.ops.stiefel_kernels.*`` (extension ``stiefel_kernels._C``; CPU and CUDA kernels).

Each op is compared with its torch.linalg formulation in :mod:`stiefel_kernels.smallmat`
evaluated in float64 on the very input the op got (a float32 input is widened exactly), on fresh
random inputs with a condition number the test constructs. Failures must show up in ``info`` for
exactly the bad batch entries (whose outputs are NaN), never as a silent wrong answer.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("stiefel_kernels._C", reason="native extension stiefel_kernels._C not built")

from stiefel_kernels import _native, smallmat  # noqa: E402

from _smallmat_inputs import (BAD, check_flags, nonsingular, orthogonal,  # noqa: E402
                              pd_with_negative_pivot, rel_err, rtol, seeded_gen, spd)

OPS = torch.ops.stiefel_kernels
# The CUDA kernels join every device-generic test below on a machine with a GPU and a CUDA build
# of the extension (there the same assertions hold them to the same float64 oracles).
CUDA_NATIVE = torch.cuda.is_available() and _native.available and _native._C.with_cuda
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if CUDA_NATIVE else [])


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_enabled():
    """The native CUDA kernels are opt-in (stiefel_kernels.ops): on for this module only."""
    was = _native.cuda_kernels_enabled
    if CUDA_NATIVE:
        _native.enable_cuda_kernels()
    yield
    if CUDA_NATIVE and not was:
        _native.disable_cuda_kernels()
DTYPES = [torch.float32, torch.float64]
# (k, batch shape): sizes 1..256, unbatched and batched, total runtime a few seconds.
CASES = [(1, ()), (1, (7,)), (3, ()), (3, (2, 5)), (12, (6,)), (12, ()), (48, (3,)),
         (48, (2, 2)), (128, (2,)), (128, ()), (256, ()), (256, (2,))]




class _OnDevice:
    """``torch.ops.stiefel_kernels`` run on ``device``: inputs moved there, results back to CPU."""

    def __init__(self, device: str):
        self.device = device

    def __getattr__(self, name):
        op = getattr(OPS, name)

        def run(*args):
            return tuple(t.cpu() for t in op(*(a.to(self.device) for a in args)))
        return run


@pytest.fixture(params=DEVICES)
def ops(request):
    """The native ops on each device this machine has a kernel for (CPU: the ops themselves)."""
    return OPS if request.param == "cpu" else _OnDevice(request.param)


# ------------------------------------------------------------------------------ accuracy


def test_all_ops_registered_for_cpu():
    assert _native.available
    for name in ("inv_sqrt_spd", "cholesky_upper_inverse", "solve"):
        assert _native.has_op(name, "cpu"), name
    from stiefel_kernels import _C
    assert "inv_sqrt_spd" in _C.__doc__ and _C.with_cuda in (True, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,batch", CASES)
def test_inv_sqrt_spd_matches_eigh(ops, k, batch, dtype):
    cond = 1e3
    m = spd(batch, k, cond, seeded_gen("isq", k, batch, dtype)).to(dtype)
    x, info = ops.inv_sqrt_spd(m)
    ref, ref_info = smallmat.inv_sqrt_spd_torch(m.double())
    assert x.dtype == dtype and x.shape == m.shape
    assert info.dtype == torch.int32 and info.shape == m.shape[:-2]
    assert (info == 0).all() and (ref_info == 0).all()
    assert torch.isfinite(x).all()
    assert torch.equal(x, x.mT)  # symmetric by construction
    assert rel_err(x, ref) < rtol(dtype, cond)
    # and it is an inverse square root: X M X = I
    eye = torch.eye(k, dtype=torch.float64)
    assert rel_err(x.double() @ m.double() @ x.double(), eye.expand_as(ref)) < 10 * rtol(dtype, cond)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,batch", CASES)
def test_cholesky_upper_inverse_matches_torch(ops, k, batch, dtype):
    cond = 1e3
    m = spd(batch, k, cond, seeded_gen("chol", k, batch, dtype)).to(dtype)
    x, info = ops.cholesky_upper_inverse(m)
    ref, ref_info = smallmat.cholesky_upper_inverse_torch(m.double())
    assert x.dtype == dtype and x.shape == m.shape
    assert info.dtype == torch.int32 and info.shape == m.shape[:-2]
    assert (info == 0).all() and (ref_info == 0).all()
    assert torch.isfinite(x).all()
    assert torch.equal(x, x.triu())  # upper triangular, exactly
    assert (torch.diagonal(x, dim1=-2, dim2=-1) > 0).all()
    assert rel_err(x, ref) < rtol(dtype, cond)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,batch", CASES)
def test_solve_matches_torch(ops, k, batch, dtype):
    cond = 1e3
    gen = seeded_gen("solve", k, batch, dtype)
    a = nonsingular(batch, k, cond, gen).to(dtype)
    b = torch.randn(*batch, k, 3, generator=gen, dtype=torch.float64).to(dtype)
    x, info = ops.solve(a, b)
    ref, ref_info = smallmat.solve_torch(a.double(), b.double())
    assert x.dtype == dtype and x.shape == b.shape
    assert info.dtype == torch.int32 and info.shape == a.shape[:-2]
    assert (info == 0).all() and (ref_info == 0).all()
    assert torch.isfinite(x).all()
    assert rel_err(x, ref) < rtol(dtype, cond)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_scales_with_condition_number(ops, dtype):
    """Still accurate (tolerance scaled by cond) for cond 1e5 (fp32) / 1e9 (fp64)."""
    cond = 1e5 if dtype == torch.float32 else 1e9
    gen, k = seeded_gen("cond", dtype), 24
    m = spd((4,), k, cond, gen).to(dtype)
    a = nonsingular((4,), k, cond, gen).to(dtype)
    b = torch.randn(4, k, 2, generator=gen, dtype=dtype)
    for (x, info), (ref, _) in [
        (ops.inv_sqrt_spd(m), smallmat.inv_sqrt_spd_torch(m.double())),
        (ops.cholesky_upper_inverse(m), smallmat.cholesky_upper_inverse_torch(m.double())),
        (ops.solve(a, b), smallmat.solve_torch(a.double(), b.double())),
    ]:
        assert (info == 0).all()
        assert rel_err(x, ref) < rtol(dtype, cond)


@pytest.mark.parametrize("ncols", [1, 17])
def test_solve_column_counts_and_broadcasting(ops, ncols):
    gen, k = seeded_gen("bcast", ncols), 9
    a = nonsingular((3, 1), k, 10.0, gen)
    b = torch.randn(4, k, ncols, generator=gen, dtype=torch.float64)
    x, info = ops.solve(a, b)
    ref, _ = torch.linalg.solve_ex(a, b)
    assert x.shape == (3, 4, k, ncols) and info.shape == (3, 4) and (info == 0).all()
    assert rel_err(x, ref) < 1e-12
    x1, info1 = ops.solve(a[0, 0], b)  # unbatched a, batched b
    assert x1.shape == (4, k, ncols) and info1.shape == (4,)
    assert rel_err(x1, torch.linalg.solve(a[0, 0], b)) < 1e-12


def test_noncontiguous_inputs_and_lower_triangle_semantics(ops):
    gen, k = seeded_gen("strides"), 10
    m = spd((3,), k, 50.0, gen)
    mt = m.transpose(0, 2).contiguous().transpose(0, 2)  # same values, other strides
    assert not mt.is_contiguous()
    for op in (ops.inv_sqrt_spd, ops.cholesky_upper_inverse):
        assert torch.equal(op(mt)[0], op(m)[0])
        # like torch.linalg (UPLO='L'), only the lower triangle is read
        junk = m.tril() + torch.randn(3, k, k, generator=gen, dtype=torch.float64).triu(1)
        assert torch.equal(op(junk)[0], op(m)[0])
    a = nonsingular((3,), k, 10.0, gen)
    b = torch.randn(3, 5, k, generator=gen, dtype=torch.float64).mT  # non-contiguous b
    assert rel_err(ops.solve(a.mT, b)[0], torch.linalg.solve(a.mT, b)) < 1e-12


def test_empty_batch_and_empty_matrices(ops):
    for dtype in DTYPES:
        m = torch.empty(0, 4, 4, dtype=dtype)
        for x, info in (ops.inv_sqrt_spd(m), ops.cholesky_upper_inverse(m),
                        ops.solve(m, torch.empty(0, 4, 2, dtype=dtype))):
            assert x.shape[0] == 0 and info.shape == (0,) and info.dtype == torch.int32
        m = torch.empty(3, 0, 0, dtype=dtype)  # k = 0, as torch.linalg allows
        for x, info in (ops.inv_sqrt_spd(m), ops.cholesky_upper_inverse(m),
                        ops.solve(m, torch.empty(3, 0, 2, dtype=dtype))):
            assert x.shape[0] == 3 and x.numel() == 0 and torch.equal(info, torch.zeros(3, dtype=torch.int32))


def test_thread_count_does_not_change_results():
    gen, k = seeded_gen("threads"), 16
    m = spd((64,), k, 100.0, gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.inv_sqrt_spd(m)[0], OPS.cholesky_upper_inverse(m)[0], OPS.solve(m, m)[0]
        torch.set_num_threads(max(2, old))
        many = OPS.inv_sqrt_spd(m)[0], OPS.cholesky_upper_inverse(m)[0], OPS.solve(m, m)[0]
    finally:
        torch.set_num_threads(old)
    for x, y in zip(one, many):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_inv_sqrt_spd_flags_exactly_the_bad_entries(ops, k, dtype):
    gen = seeded_gen("isq-bad", k, dtype)
    m = spd((6,), k, 10.0, gen)
    q = orthogonal((), k, gen)
    nneg = min(2, k)
    lam = torch.linspace(1, 2, k, dtype=torch.float64)
    lam[:nneg] = -lam[:nneg]
    m[1] = (q * lam) @ q.T  # indefinite: nneg negative eigenvalues
    eps = torch.finfo(dtype).eps
    lam = torch.linspace(1, 2, k, dtype=torch.float64)
    lam[0] = 1e-3 * eps  # numerically singular for this dtype
    m[4] = (q * lam) @ q.T
    if k == 1:
        m[4] = 0.0  # a lone tiny eigenvalue is well conditioned (the test is scale-invariant)
    x, info = ops.inv_sqrt_spd(m.to(dtype))
    check_flags(x, info)
    assert info[1] == nneg  # counts the non-positive eigenvalues, like the eigh formulation
    ref, _ = smallmat.inv_sqrt_spd_torch(m.to(dtype).double())
    good = [0, 2, 3, 5]
    assert rel_err(x[good], ref[good]) < rtol(dtype, 10.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_cholesky_flags_exactly_the_bad_entries(ops, k, dtype):
    gen = seeded_gen("chol-bad", k, dtype)
    m = spd((6,), k, 10.0, gen)
    p = k // 2
    m[1] = pd_with_negative_pivot(k, p, gen)
    m[4] = 0.0
    m[4, ..., 0, 0] = 1.0  # PSD, singular: second pivot is zero (or first when k == 1)
    if k == 1:
        m[4] = 0.0
    x, info = ops.cholesky_upper_inverse(m.to(dtype))
    check_flags(x, info)
    assert info[1].item() == p + 1  # LAPACK potrf convention: order of the failing minor
    assert info[1].item() == torch.linalg.cholesky_ex(m[1]).info.item()
    assert info[4].item() == (1 if k == 1 else 2)
    ref, _ = smallmat.cholesky_upper_inverse_torch(m.to(dtype).double())
    good = [0, 2, 3, 5]
    assert rel_err(x[good], ref[good]) < rtol(dtype, 10.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_solve_flags_exactly_the_bad_entries(ops, k, dtype):
    gen = seeded_gen("solve-bad", k, dtype)
    a = nonsingular((6,), k, 10.0, gen)
    b = torch.randn(6, k, 3, generator=gen, dtype=torch.float64)
    if k == 1:
        a[1] = 0.0
    else:
        a[1, k - 1] = a[1, 0]  # two equal rows: exactly singular
    a[4] = torch.outer(torch.randn(k, generator=gen, dtype=torch.float64),
                       torch.randn(k, generator=gen, dtype=torch.float64))  # rank one
    if k > 1:
        a[4, 0, 0] += 1e-3 * torch.finfo(dtype).eps * a[4].abs().max()  # within rounding of rank one
    else:
        a[4] = 0.0
    x, info = ops.solve(a.to(dtype), b.to(dtype))
    check_flags(x, info)
    assert (info[[1, 4]] > 0).all()  # 1-based index of the failing pivot
    ref, _ = smallmat.solve_torch(a.to(dtype).double(), b.to(dtype).double())
    good = [0, 2, 3, 5]
    assert rel_err(x[good], ref[good]) < rtol(dtype, 10.0)


@pytest.mark.parametrize("where", ["nan", "inf"])
def test_non_finite_inputs_give_info_minus_one(ops, where):
    gen, k = seeded_gen("nonfinite", where), 6
    bad = float("nan") if where == "nan" else float("inf")
    m = spd((6,), k, 10.0, gen)
    m[1, 3, 2] = bad  # lower triangle: read by every op
    m[4, 0, 0] = bad
    b = torch.randn(6, k, 2, generator=gen, dtype=torch.float64)
    for x, info in (ops.inv_sqrt_spd(m), ops.cholesky_upper_inverse(m), ops.solve(m, b)):
        check_flags(x, info)
        assert (info[list(BAD)] == -1).all()
    b[2, 0, 1] = bad  # a bad right-hand side fails that entry of solve too
    x, info = ops.solve(m, b)
    check_flags(x, info, bad=(1, 2, 4))


# ------------------------------------------------------------------------------ argument checks


@pytest.mark.parametrize("op", ["inv_sqrt_spd", "cholesky_upper_inverse"])
def test_bad_arguments_raise_clear_errors(op):
    f = getattr(OPS, op)
    with pytest.raises(RuntimeError, match=f"stiefel_kernels::{op}: expected a .*at least 2 dims"):
        f(torch.ones(3))
    with pytest.raises(RuntimeError, match="square"):
        f(torch.ones(2, 3, 4))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        f(torch.eye(3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        f(torch.eye(3, dtype=torch.int64))


def test_solve_bad_arguments_raise_clear_errors():
    a = torch.eye(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="square"):
        OPS.solve(torch.ones(3, 4, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must have 3 rows"):
        OPS.solve(a, torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        OPS.solve(a, torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="same dtype"):
        OPS.solve(a, torch.ones(3, 2, dtype=torch.float32))
    with pytest.raises(RuntimeError):  # batch dims that do not broadcast
        OPS.solve(a.expand(2, 3, 3), torch.ones(5, 3, 2, dtype=torch.float64))


# ------------------------------------------------------------------------------ torch.compile


def _opcheck_args():
    gen = seeded_gen("opcheck")
    for shape, k, dtype in [((), 4, torch.float64), ((3,), 5, torch.float32), ((2, 2), 3, torch.float64)]:
        m = spd(shape, k, 10.0, gen).to(dtype)
        b = torch.randn(*shape, k, 2, generator=gen, dtype=torch.float64).to(dtype)
        yield m, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["inv_sqrt_spd", "cholesky_upper_inverse", "solve"])
def test_opcheck(name, device):
    op = getattr(OPS, name).default
    for m, b in _opcheck_args():
        args = (m.to(device), b.to(device)) if name == "solve" else (m.to(device),)
        torch.library.opcheck(op, args)


def test_meta_shapes():
    m = torch.empty(2, 3, 5, 5, device="meta")
    x, info = OPS.inv_sqrt_spd(m)
    assert x.shape == m.shape and info.shape == (2, 3) and info.dtype == torch.int32
    x, info = OPS.cholesky_upper_inverse(m)
    assert x.shape == m.shape and info.shape == (2, 3)
    x, info = OPS.solve(m, torch.empty(3, 5, 7, device="meta"))
    assert x.shape == (2, 3, 5, 7) and info.shape == (2, 3)
    with pytest.raises(RuntimeError, match="square"):
        OPS.inv_sqrt_spd(torch.empty(2, 3, 4, device="meta"))


def _step(m, b):
    x, i1 = OPS.inv_sqrt_spd(m)
    r, i2 = OPS.cholesky_upper_inverse(m)
    y, i3 = OPS.solve(m, b)
    return x, i1, r, i2, y, i3


@pytest.mark.parametrize("backend,dynamic", [("inductor", False), ("aot_eager", True)])
def test_torch_compile_fullgraph(backend, dynamic):
    """Traces through the fake kernels; inductor calls the ops as extern kernels."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True, backend=backend, dynamic=dynamic)
    gen = seeded_gen("compile", backend)
    for batch, k in [((4,), 6), ((2, 3), 5)]:
        m = spd(batch, k, 10.0, gen).float()
        b = torch.randn(*batch, k, 3, generator=gen)
        out, ref = compiled(m, b), _step(m, b)
        for o, r in zip(out, ref):
            assert o.shape == r.shape and o.dtype == r.dtype
            torch.testing.assert_close(o, r, rtol=0, atol=0)
