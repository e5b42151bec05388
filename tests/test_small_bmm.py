"""``torch.ops.stiefel_kernels.small_bmm`` (``add + alpha * (a @ b)``, the ``r x r`` products of
the small step) and its wrapper :func:`stiefel_kernels.smallmat.bmm`.

The native CPU kernel (csrc/small_bmm_cpu.cpp) and the default kernel (``torch.baddbmm``) are
compared with float64 math on the very inputs (tolerance policy: tests/README.md, native ops vs
float64: 1e-5 in float32, 1e-12 in float64), on odd sizes and on strided views of every operand;
the native kernel's bits do not depend on the thread count.
"""
from __future__ import annotations

import pytest
import torch

from stiefel_kernels import _native, ops, smallmat

OPS = torch.ops.stiefel_kernels
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# (batch, m, k, n): r = 1, sizes around the vector widths (8 / 16 lanes) and the 4-row tiles,
# r = 64 and 128 (the shapes the optimizer runs), a non-square product
SHAPES = [(3, 1, 1, 1), (2, 3, 5, 7), (4, 16, 16, 16), (2, 17, 9, 33), (3, 64, 64, 64),
          (2, 128, 128, 64), (5, 5, 128, 65), (1, 130, 3, 8)]


def _native_cpu() -> bool:
    return _native.has_cpu_kernel("small_bmm")


def rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


def _views(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (B, p, q) in another memory layout."""
    if layout == "transposed":
        return t.mT.contiguous().mT
    if layout == "sliced":  # every other batch entry of a bigger tensor, inner stride 1
        big = torch.empty(2 * t.shape[0], t.shape[1], t.shape[2] + 3, dtype=t.dtype).fill_(float("nan"))
        big[::2, :, :t.shape[2]] = t
        return big[::2, :, :t.shape[2]]
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_kernel_matches_float64(gen, shape, dtype):
    assert _native_cpu(), "the native extension is built in CI: its CPU kernel must be registered"
    b_, m, k, n = shape
    a = torch.randn(b_, m, k, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(b_, k, n, generator=gen, dtype=torch.float64).to(dtype)
    d = torch.randn(b_, m, n, generator=gen, dtype=torch.float64).to(dtype)
    for alpha in (1.0, -0.5, 2.0):
        want_plain = alpha * (a.double() @ b.double())
        want_add = d.double() + want_plain
        for la, lb, ld in [("plain", "plain", "plain"), ("transposed", "plain", "transposed"),
                           ("plain", "transposed", "sliced"), ("sliced", "sliced", "plain")]:
            av, bv, dv = _views(a, la), _views(b, lb), _views(d, ld)
            got = OPS.small_bmm(av, bv, dv, alpha)
            assert got.dtype == dtype and got.is_contiguous()
            assert rel(got, want_add) < TOL[dtype], (alpha, la, lb, ld)
            assert rel(OPS.small_bmm(av, bv, None, alpha), want_plain) < TOL[dtype]


def test_default_kernel_matches_float64(gen):
    a = torch.randn(3, 9, 7, generator=gen)
    b = torch.randn(3, 7, 5, generator=gen)
    d = torch.randn(3, 9, 5, generator=gen)
    want = d.double() - 0.5 * (a.double() @ b.double())
    assert rel(ops._small_bmm_default(a, b, d, -0.5), want) < TOL[torch.float32]
    assert rel(ops._small_bmm_default(a, b, None, 2.0), 2.0 * (a.double() @ b.double())) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_same_bits_at_one_and_two_threads(gen, dtype):
    assert _native_cpu()
    a = torch.randn(24, 64, 64, generator=gen, dtype=dtype)
    b = torch.randn(24, 64, 64, generator=gen, dtype=dtype)
    d = torch.randn(24, 64, 64, generator=gen, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.small_bmm(a, b, d, 0.3)
        torch.set_num_threads(2)
        two = OPS.small_bmm(a, b, d, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [16, 64, 48])
def test_in_place_and_packed_paths_give_the_same_bits(gen, dtype, n):
    """Rows of B that are whole vectors are read in place and the epilogue is done in registers
    (small_matmul.h); a transposed B is packed and a transposed add goes through the scalar
    epilogue. Both are the same sums in the same order and one FMA for add + alpha * acc."""
    assert _native_cpu()
    a = torch.randn(3, 37, 29, generator=gen, dtype=dtype)
    b = torch.randn(3, 29, n, generator=gen, dtype=dtype)
    d = torch.randn(3, 37, n, generator=gen, dtype=dtype)
    for alpha in (1.0, -0.7):
        direct = OPS.small_bmm(a, b, d, alpha)
        packed = OPS.small_bmm(a, _views(b, "transposed"), _views(d, "transposed"), alpha)
        assert torch.equal(direct, packed), alpha
        # B in place with the scalar epilogue (a transposed add), B packed with the register one
        assert torch.equal(OPS.small_bmm(a, b, _views(d, "transposed"), alpha), direct)
        assert torch.equal(OPS.small_bmm(a, _views(b, "transposed"), d, alpha), direct)
        assert torch.equal(OPS.small_bmm(a, b, None, alpha), OPS.small_bmm(a, _views(b, "transposed"), None, alpha))


def test_smallmat_bmm_batch_shapes(gen):
    """The wrapper takes any batch shape (also none) and returns ``add + alpha * a @ b``."""
    for batch in [(), (4,), (2, 3)]:
        a = torch.randn(*batch, 6, 4, generator=gen, dtype=torch.float64)
        b = torch.randn(*batch, 4, 5, generator=gen, dtype=torch.float64)
        d = torch.randn(*batch, 6, 5, generator=gen, dtype=torch.float64)
        got = smallmat.bmm(a, b, d, alpha=-2.0)
        assert got.shape == (*batch, 6, 5)
        assert rel(got, d - 2.0 * (a @ b)) < TOL[torch.float64]
        assert rel(smallmat.bmm(a.mT.mT, b), a @ b) < TOL[torch.float64]


def test_empty_batch_and_empty_sum():
    assert OPS.small_bmm(torch.zeros(0, 4, 4), torch.zeros(0, 4, 4), None, 1.0).shape == (0, 4, 4)
    d = torch.randn(2, 3, 5)
    out = OPS.small_bmm(torch.zeros(2, 3, 0), torch.zeros(2, 0, 5), d, 1.0)
    assert torch.equal(out, d)
    assert torch.equal(OPS.small_bmm(torch.zeros(2, 3, 0), torch.zeros(2, 0, 5), None, 1.0),
                       torch.zeros(2, 3, 5))


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(4, 4), torch.zeros(4, 4), None), "3-dim"),
    ((torch.zeros(2, 3, 4), torch.zeros(2, 5, 4), None), "do not multiply"),
    ((torch.zeros(2, 3, 4), torch.zeros(3, 4, 4), None), "do not multiply"),
    ((torch.zeros(2, 3, 4), torch.zeros(2, 4, 4, dtype=torch.float64), None), "float32 or float64"),
    ((torch.zeros(2, 3, 4, dtype=torch.int32), torch.zeros(2, 4, 4, dtype=torch.int32), None),
     "float32 or float64"),
    ((torch.zeros(2, 3, 4), torch.zeros(2, 4, 4), torch.zeros(2, 4, 3)), "add must have shape"),
])
def test_rejects_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        OPS.small_bmm(*args, 1.0)
    with pytest.raises(RuntimeError, match=match):
        ops._small_bmm_default(*args, 1.0)


def test_fake_kernel_gives_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = OPS.small_bmm(torch.empty(3, 5, 7), torch.empty(3, 7, 2), torch.empty(3, 5, 2), 1.0)
    assert out.shape == (3, 5, 2) and out.dtype == torch.float32


def test_add_of_another_dtype_is_rejected():
    args = (torch.zeros(2, 3, 4), torch.zeros(2, 4, 4), torch.zeros(2, 3, 4, dtype=torch.float64))
    for fn in (OPS.small_bmm, ops._small_bmm_default):
        with pytest.raises(RuntimeError, match="add must have shape"):
            fn(*args, 1.0)


def test_smallmat_bmm_falls_back_to_torch(gen):
    """Half dtypes (no kernel of the op), operands that need gradients (the op has no autograd
    formula) and zero-size matrices go through torch."""
    a = torch.randn(3, 5, 4, generator=gen)
    b = torch.randn(3, 4, 6, generator=gen)
    got = smallmat.bmm(a.bfloat16(), b.bfloat16(), alpha=2.0)
    assert got.dtype == torch.bfloat16 and rel(got, 2.0 * (a.bfloat16().double() @ b.bfloat16().double())) < 1e-2
    a.requires_grad_(True)
    out = smallmat.bmm(a, b, torch.ones(3, 5, 6))
    out.sum().backward()
    assert torch.allclose(a.grad, torch.ones(3, 5, 6) @ b.mT)
    assert smallmat.bmm(torch.zeros(2, 0, 4), torch.zeros(2, 4, 3)).shape == (2, 0, 3)
    assert torch.equal(smallmat.bmm(torch.zeros(2, 3, 0), torch.zeros(2, 0, 5)), torch.zeros(2, 3, 5))


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(3, 5, 4, generator=gen, dtype=dtype)
        b = torch.randn(3, 4, 6, generator=gen, dtype=dtype)
        d = torch.randn(3, 5, 6, generator=gen, dtype=dtype)
        torch.library.opcheck(OPS.small_bmm.default, (a, b, d, 0.5))
        torch.library.opcheck(OPS.small_bmm.default, (a, b, None, 1.0))
