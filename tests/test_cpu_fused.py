"""The native CPU passes of a Stiefel-AdamW step (``stiefel_kernels.cpu_fused``,
``csrc/fused_step_cpu.cpp``).

Checked against the torch backend's formulation (``torch._foreach_*`` moments, bit for bit;
``D`` bit for bit with a correctly rounded ``sqrt``: :func:`sqrt_rn`) and against float64 math on the very inputs the kernels got (Gram matrices
and pass 2, relative Frobenius error within the tolerance of the working dtype:
tests/README.md), on odd shapes, both orientations, r = 1, stacks, strided views, AMSGrad,
maximize, bfloat16 / float64 parameters; the same bits at 1 and 2 threads; a whole step against
the torch backend.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("stiefel_kernels._C", reason="native extension stiefel_kernels._C not built")

from stiefel_kernels import cpu_fused, gram  # noqa: E402
from stiefel_kernels.backends import StiefelHyperparams, bias_corrections, get_backend  # noqa: E402
from stiefel_kernels.backends import torch_backend  # noqa: E402
from stiefel_kernels.geometry import is_row_orthonormal  # noqa: E402

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
#: relative Frobenius bound by working dtype (tests/README.md, tolerance policy)
RTOL = {F32: 1e-5, F64: 1e-10}
#: parameters stored in bfloat16: the written point is rounded to bfloat16 (policy: 2e-2)
RTOL_BF16_PARAM = 2e-2

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason="fused CPU passes not built")


def hyper(amsgrad=False, maximize=False, beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-2,
          retraction="cayley_fp", drift_tol=1e-6):
    return StiefelHyperparams(lr=lr, beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad,
                              maximize=maximize, retraction=retraction, cayley_iters=2,
                              ns_steps=6, drift_tol=drift_tol)


def working(dtype):
    return F64 if dtype == F64 else F32


def make_bucket(gen, shape, count, dtype, amsgrad=False, orthonormal=True):
    """Parameters (orthonormal in column form), gradients, and nonzero moments of a bucket."""
    work = working(dtype)
    rows = is_row_orthonormal(shape)
    a, b = shape[-2:]
    col = (*shape[:-2], b, a) if rows else tuple(shape)
    ps = []
    for _ in range(count):
        z = torch.randn(col, generator=gen, dtype=F64)
        q = torch.linalg.qr(z)[0] if orthonormal else z
        ps.append((q.mT if rows else q).contiguous().to(dtype))
    gs = [torch.randn(shape, generator=gen, dtype=F64).to(dtype) for _ in range(count)]
    ms = [(0.1 * torch.randn(shape, generator=gen, dtype=F64)).to(work) for _ in range(count)]
    vs = [(0.01 * torch.rand(shape, generator=gen, dtype=F64) + 1e-6).to(work) for _ in range(count)]
    maxs = ([(0.012 * torch.rand(shape, generator=gen, dtype=F64)).to(work) for _ in range(count)]
            if amsgrad else None)
    return ps, gs, ms, vs, maxs


def clone(ts):
    return None if ts is None else [t.clone() for t in ts]


def bias(count, gen):
    steps = [torch.tensor(float(s)) for s in torch.randint(1, 50, (count,), generator=gen)]
    bc1, bc2 = bias_corrections(steps, 0.9, 0.999)
    return bc1, bc2, cpu_fused.bias_correction_tensor(bc1, bc2)


def reference_moments(gs, ms, vs, maxs, bc1, bc2, hp, work):
    """The torch backend's formulation: moments in place, returns D (stacked, stored layout)."""
    gs = [g.to(work) for g in gs]
    if hp.maximize:
        gs = torch._foreach_neg(gs)
    torch._foreach_lerp_(ms, gs, 1 - hp.beta1)
    torch._foreach_mul_(vs, hp.beta2)
    torch._foreach_addcmul_(vs, gs, gs, 1 - hp.beta2)
    if hp.amsgrad:
        torch._foreach_maximum_(maxs, vs)
        vs = maxs
    m = torch.stack(ms)
    shape = (-1, *([1] * (m.dim() - 1)))
    b1 = torch.tensor(bc1, dtype=work).view(shape)
    b2 = torch.tensor(bc2, dtype=work).view(shape)
    return (m / b1) / (sqrt_rn(torch.stack(vs)) / b2 + hp.eps)


def sqrt_rn(v):
    """Correctly rounded square root. The kernels use it (as the Triton kernels' ``sqrt_rn``);
    torch's CPU ``sqrt`` (MKL VML) is not correctly rounded: it differs in the last bit for
    about 16% of random float32 inputs on this project's machine, so the torch backend's ``D``
    can differ from the kernels' by one rounding."""
    return torch.from_numpy(np.sqrt(v.numpy()))


def column(t, rows):
    return t.mT if rows else t


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# (stored shape, count): wide and tall, odd sizes, more than one 4096-row chunk, r = 1, square,
# stacks (3-D parameters), n = r; tall with r a multiple of 16 (float32: pass 2 writes in place),
# one of them ending in a sub-block of 6 rows (copied through scratch)
SHAPES = [((16, 300), 3), ((70, 13), 2), ((5, 4100), 2), ((4097, 3), 1), ((1, 37), 3),
          ((37, 1), 2), ((7, 7), 2), ((3, 6, 20), 2), ((2, 4099, 5), 1), ((64, 64), 1),
          ((33, 17), 2), ((200, 32), 2), ((1030, 16), 1)]


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("shape,count", SHAPES, ids=[f"{s}x{c}" for s, c in SHAPES])
def test_pass1_matches_torch_formulation_and_float64(gen, shape, count, dtype):
    work = working(dtype)
    hp = hyper()
    ps, gs, ms, vs, _ = make_bucket(gen, shape, count, dtype)
    bc1, bc2, bc = bias(count, gen)
    rms, rvs = clone(ms), clone(vs)
    grams = cpu_fused.pass1(ps, gs, ms, vs, None, bc, hp)
    d = reference_moments(gs, rms, rvs, None, bc1, bc2, hp, work)

    for a, b in zip(ms + vs, rms + rvs):  # moments: bit for bit
        assert torch.equal(a, b)
    rows = is_row_orthonormal(shape)
    r = min(shape[-2:])
    assert grams.shape == (count, *shape[:-2], 3, r, r) and grams.dtype == work
    x = column(torch.stack(ps).to(F64), rows)
    dd = column(d.to(F64), rows)
    k, g, h = grams.unbind(-3)
    for got, want in ((k, x.mT @ x), (g, x.mT @ dd), (h, dd.mT @ dd)):
        assert rel(got, want) < RTOL[work]
    assert torch.equal(k, k.mT) and torch.equal(h, h.mT)  # symmetric by construction


@pytest.mark.parametrize("amsgrad,maximize", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
def test_pass1_amsgrad_and_maximize(gen, amsgrad, maximize, dtype):
    work = working(dtype)
    hp = hyper(amsgrad=amsgrad, maximize=maximize)
    shape, count = (6, 4101), 2
    ps, gs, ms, vs, maxs = make_bucket(gen, shape, count, dtype, amsgrad=amsgrad)
    bc1, bc2, bc = bias(count, gen)
    rms, rvs, rmax = clone(ms), clone(vs), clone(maxs)
    grams = cpu_fused.pass1(ps, gs, ms, vs, maxs, bc, hp)
    d = reference_moments(gs, rms, rvs, rmax, bc1, bc2, hp, work)
    for a, b in zip(ms + vs + (maxs or []), rms + rvs + (rmax or [])):
        assert torch.equal(a, b)
    x = torch.stack(ps).to(F64).mT
    assert rel(grams[:, 1], x.mT @ d.to(F64).mT) < RTOL[work]


@pytest.mark.parametrize("beta1", [0.3, 0.0, 0.95])
def test_pass1_lerp_weight_branches(gen, beta1):
    """torch's lerp switches formula at weight 0.5 (1 - beta1 >= 0.5 for beta1 <= 0.5)."""
    hp = hyper(beta1=beta1, beta2=0.5)
    ps, gs, ms, vs, _ = make_bucket(gen, (9, 130), 2, F32)
    bc1, bc2, bc = bias(2, gen)
    rms, rvs = clone(ms), clone(vs)
    cpu_fused.pass1(ps, gs, ms, vs, None, bc, hp)
    reference_moments(gs, rms, rvs, None, bc1, bc2, hp, F32)
    for a, b in zip(ms + vs, rms + rvs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("tall", [True, False], ids=["tall", "wide"])
def test_direction_bits_in_both_passes(gen, dtype, tall):
    """``D`` bit for bit: with ``X = [I; 0]`` pass 1's ``G = X^T D`` is the top ``r x r`` block of
    ``D`` exactly; with ``C = I, E = I`` pass 2 writes ``X + D`` (one rounding)."""
    work = working(dtype)
    hp = hyper()
    n, r = 4099, 5
    shape = (n, r) if tall else (r, n)
    ps, gs, ms, vs, _ = make_bucket(gen, shape, 2, dtype)
    eye = torch.zeros(n, r, dtype=dtype)
    eye[:r] = torch.eye(r, dtype=dtype)
    ps = [(eye if tall else eye.mT).contiguous() for _ in ps]
    bc1, bc2, bc = bias(2, gen)
    rms, rvs = clone(ms), clone(vs)
    grams = cpu_fused.pass1(ps, gs, ms, vs, None, bc, hp)
    d = column(reference_moments(gs, rms, rvs, None, bc1, bc2, hp, work), not tall)
    assert torch.equal(grams[:, 1], d[:, :r, :])

    xs = [torch.randn(shape, generator=gen, dtype=F64).to(dtype) for _ in ps]
    want = [(x.to(work) + column(dd, not tall)).to(dtype) for x, dd in zip(xs, d)]
    c = torch.eye(r, dtype=work).expand(2, r, r)
    cpu_fused.pass2(xs, ms, vs, bc, c, c, hp)
    for got, w in zip(xs, want):
        assert torch.equal(got, w)


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("shape,count", SHAPES, ids=[f"{s}x{c}" for s, c in SHAPES])
def test_pass2_matches_float64(gen, shape, count, dtype):
    work = working(dtype)
    hp = hyper()
    ps, gs, ms, vs, _ = make_bucket(gen, shape, count, dtype)
    bc1, bc2, bc = bias(count, gen)
    # pass 2 reads the moments as given: D in the torch backend's expression
    d = (torch.stack(ms) / torch.tensor(bc1, dtype=work).view(-1, *([1] * len(shape)))) / (
        sqrt_rn(torch.stack(vs)) / torch.tensor(bc2, dtype=work).view(-1, *([1] * len(shape))) + hp.eps)
    rows = is_row_orthonormal(shape)
    r = min(shape[-2:])
    batch = (count, *shape[:-2])
    c = torch.eye(r, dtype=work) + 0.05 * torch.randn(*batch, r, r, generator=gen, dtype=F64).to(work)
    e = 0.01 * torch.randn(*batch, r, r, generator=gen, dtype=F64).to(work)
    x = column(torch.stack(ps).to(F64), rows)
    want = column(x @ c.double() + column(d.double(), rows) @ e.double(), rows)
    cpu_fused.pass2(ps, ms, vs, bc, c, e, hp)
    got = torch.stack(ps)
    if dtype == BF16:
        assert rel(got, want) < RTOL_BF16_PARAM
        # rounded once from float32: within one bfloat16 rounding of the float64 result, plus the
        # float32 sums' error (2r + 1 roundings of terms up to |x| |c| + |d| |e|), which matters
        # where the sum cancels
        size = column(x.abs() @ c.double().abs() + column(d.double().abs(), rows) @ e.double().abs(), rows)
        assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + (2 * r + 1) * 2 ** -24 * size).all()
    else:
        assert rel(got, want) < RTOL[work]



@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_pass2_reads_float32_and_float64_coefficients_alike(gen, dtype):
    """C and E are read in the dtype they come in (float32 / float64: no converted copies per
    step), any other dtype through float64: the same values give the same bits either way."""
    shape, count = (48, 16), 2
    ps, gs, ms, vs, _ = make_bucket(gen, shape, count, dtype)
    _, _, bc = bias(count, gen)
    c = (torch.eye(16, dtype=F64) + 0.05 * torch.randn(count, 16, 16, generator=gen, dtype=F64)).to(torch.bfloat16)
    e = (0.01 * torch.randn(count, 16, 16, generator=gen, dtype=F64)).to(torch.bfloat16)
    outs = []
    for cd, ed in [(F32, F32), (F64, F64), (torch.bfloat16, torch.bfloat16), (F32, F64)]:
        xs = [p.clone() for p in ps]
        cpu_fused.pass2(xs, ms, vs, bc, c.to(cd), e.to(ed), hyper())
        outs.append(torch.stack(xs))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("n", [1030, 200])
def test_pass2_in_place_writes_only_its_rows(gen, n):
    """Tall float32 factors with r = 16 are written in place by pass 2 (whole groups of 4 rows;
    a 6-row tail goes through scratch): nothing past a factor's last row changes."""
    r = 16
    bufs = [torch.full((n + 4, r), float("nan")) for _ in range(2)]
    ps = [b[:n] for b in bufs]
    for p in ps:
        p.copy_(torch.linalg.qr(torch.randn(n, r, generator=gen))[0])
    ms = [0.1 * torch.randn(n, r, generator=gen) for _ in ps]
    vs = [0.01 * torch.rand(n, r, generator=gen) + 1e-6 for _ in ps]
    bc1, bc2, bc = bias(2, gen)
    c = torch.eye(r) + 0.05 * torch.randn(2, r, r, generator=gen)
    e = 0.01 * torch.randn(2, r, r, generator=gen)
    d = (torch.stack(ms) / torch.tensor(bc1).view(-1, 1, 1)) / (
        sqrt_rn(torch.stack(vs)) / torch.tensor(bc2).view(-1, 1, 1) + hyper().eps)
    want = torch.stack([p.double() for p in ps]) @ c.double() + d.double() @ e.double()
    cpu_fused.pass2(ps, ms, vs, bc, c, e, hyper())
    for b in bufs:
        assert torch.isnan(b[n:]).all()
    assert rel(torch.stack(ps), want) < RTOL[F32]

# Shapes for the sub-block pipeline of the kernels (csrc/fused_step_cpu.cpp: the elementwise
# work of the next sub-block done between the register tiles of the current one, float32
# parameters read in place when laid out as the micro-kernels need them, else converted into
# scratch): many sub-blocks per 4096-row chunk and several chunks, in-place x (r a multiple of 4,
# whole vectors) and the scratch fallback (ragged tails, r not a multiple of 4) in one bucket.
PIPELINE_SHAPES = [((16, 4608), 2), ((16, 4100), 2), ((12, 1040), 3), ((768, 64), 2),
                   ((4100, 16), 1), ((4097, 16), 1), ((600, 20), 2), ((24, 640), 2)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("shape,count", PIPELINE_SHAPES, ids=[f"{s}x{c}" for s, c in PIPELINE_SHAPES])
def test_sub_block_pipeline_shapes(gen, shape, count, dtype):
    test_pass1_matches_torch_formulation_and_float64(gen, shape, count, dtype)
    test_pass2_matches_float64(gen, shape, count, dtype)


@pytest.mark.parametrize("tall", [True, False], ids=["tall", "wide"])
def test_strided_views(gen, tall):
    """Parameters and states that are views with a leading dimension larger than the matrix
    (rows of a wider buffer): the kernels address them through their strides."""
    hp = hyper(amsgrad=True)
    n, r, pad = 300, 6, 5
    shape = (n, r) if tall else (r, n)
    big = (n, r + pad) if tall else (r, n + pad)

    def view(t):
        buf = torch.randn(big, generator=gen, dtype=F64).to(t.dtype)
        v = buf[:, :r] if tall else buf[:, :n]
        v.copy_(t)
        return v

    ps, gs, ms, vs, maxs = make_bucket(gen, shape, 2, F32, amsgrad=True)
    views = [[view(t) for t in lst] for lst in (ps, gs, ms, vs, maxs)]
    bc1, bc2, bc = bias(2, gen)
    grams = cpu_fused.pass1(ps, gs, ms, vs, maxs, bc, hp)
    grams_v = cpu_fused.pass1(*views, bc, hp)
    assert torch.equal(grams, grams_v)
    for a, b in zip(ms + vs + maxs, views[2] + views[3] + views[4]):
        assert torch.equal(a, b)
    c = torch.eye(r) + 0.1 * torch.randn(2, r, r, generator=gen)
    e = 0.1 * torch.randn(2, r, r, generator=gen)
    cpu_fused.pass2(ps, ms, maxs, bc, c, e, hp)
    cpu_fused.pass2(views[0], views[2], views[4], bc, c, e, hp)
    for a, b in zip(ps, views[0]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
def test_same_bits_at_one_and_two_threads(gen, dtype):
    hp = hyper(amsgrad=True)
    cases = [((16, 9000), 5), ((2, 4100, 7), 3), ((768, 64), 3)]
    before = torch.get_num_threads()
    try:
        for shape, count in cases:
            ps, gs, ms, vs, maxs = make_bucket(gen, shape, count, dtype, amsgrad=True)
            _, _, bc = bias(count, gen)
            results = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                p2, m2, v2, x2 = clone(ps), clone(ms), clone(vs), clone(maxs)
                grams = cpu_fused.pass1(p2, gs, m2, v2, x2, bc, hp)
                k, g, h = grams.unbind(-3)
                c, e, _ = gram.step_coefficients(k.double(), g.double(), h.double(), hp.lr,
                                                 hp.retraction, tol=1e-10)
                cpu_fused.pass2(p2, m2, x2, bc, c, e, hp)
                results.append((grams, p2, m2, v2, x2))
            for a, b in zip(*results):
                if isinstance(a, list):
                    assert all(torch.equal(s, t) for s, t in zip(a, b))
                else:
                    assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(16, 300), (40, 9), (2, 5, 70)], ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_whole_step_matches_torch_backend(gen, shape, dtype, amsgrad):
    """pass 1 -> gram.step_coefficients -> pass 2 against ``backends.torch_backend.step``."""
    work = working(dtype)
    hp = hyper(amsgrad=amsgrad, drift_tol=1e-10 if dtype == F64 else 1e-6)
    count = 3
    ps, gs, ms, vs, maxs = make_bucket(gen, shape, count, dtype, amsgrad=amsgrad)
    steps = [torch.tensor(float(t)) for t in (0, 3, 10)]
    ref = (clone(ps), clone(ms), clone(vs), clone(maxs), [s.clone() for s in steps])
    torch_backend.step(ref[0], gs, ref[1], ref[2], ref[3], ref[4], hp, native_passes=False)

    torch._foreach_add_(steps, 1)
    bc1, bc2 = bias_corrections(steps, hp.beta1, hp.beta2)
    bc = cpu_fused.bias_correction_tensor(bc1, bc2)
    grams = cpu_fused.pass1(ps, gs, ms, vs, maxs, bc, hp)
    k, g, h = grams.unbind(-3)
    c, e, info = gram.step_coefficients(k, g, h, hp.lr, hp.retraction, tol=hp.drift_tol,
                                        cayley_iters=hp.cayley_iters, ns_steps=hp.ns_steps)
    cpu_fused.pass2(ps, ms, maxs if amsgrad else vs, bc, c, e, hp)
    assert not info.any()
    for a, b in zip(ms + vs + (maxs or []), ref[1] + ref[2] + (ref[3] or [])):
        assert torch.equal(a, b)
    bound = RTOL_BF16_PARAM if dtype == BF16 else RTOL[work]
    for a, b in zip(ps, ref[0]):
        assert rel(a, b) < bound


@pytest.mark.parametrize("retraction", ["cayley_fp", "polar"])
def test_torch_backend_takes_the_native_passes_on_cpu(gen, monkeypatch, retraction):
    """The torch backend's default step on CPU tensors goes through the native passes (one
    pass-1 call per bucket) and equals its pure-torch formulation (``native_passes=False``)
    over several steps; a gradient of another dtype than its parameter takes the fallback."""
    calls = []
    real = cpu_fused.pass1
    monkeypatch.setattr(cpu_fused, "pass1", lambda *a, **k: calls.append(1) or real(*a, **k))
    hp = hyper(retraction=retraction)
    shapes = [(16, 300), (16, 300), (40, 9), (2, 5, 70)]
    ps = [p for s in shapes for p in make_bucket(gen, s, 1, F32)[0]]
    qs = clone(ps)
    st_n = ([torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps], None,
            [torch.tensor(0.0) for _ in ps])
    st_t = tuple(None if x is None else clone(x) for x in st_n)
    for _ in range(4):
        gs = [torch.randn(p.shape, generator=gen) for p in ps]
        torch_backend.step(ps, gs, *st_n, hp)
        torch_backend.step(qs, gs, *st_t, hp, native_passes=False)
    assert len(calls) == 4 * 3  # three buckets
    for a, b in zip(ps, qs):
        assert rel(a, b) < RTOL[F32]
    calls.clear()
    torch_backend.step(ps, [g.double() for g in gs], *st_n, hp)  # float64 grads: fallback
    assert calls == []


def test_empty_lists():
    hp = hyper()
    bc = torch.empty(2, 0, dtype=F64)
    out = cpu_fused.pass1([], [], [], [], None, bc, hp)
    assert out.shape == (0, 3, 0, 0)
    cpu_fused.pass2([], [], [], bc, torch.empty(0, 1, 1), torch.empty(0, 1, 1), hp)
    assert cpu_fused.unsupported_reason([]) is None


def test_zero_sized_rows(gen):
    """A factor with no rows (an empty shard): zero Gram matrices, nothing written."""
    hp = hyper()
    ps = [torch.empty(3, 0, 4)]
    out = cpu_fused.pass1(ps, [torch.empty(3, 0, 4)], [torch.empty(3, 0, 4)],
                          [torch.empty(3, 0, 4)], None, torch.ones(2, 1, dtype=F64), hp,
                          row_orthonormal=False)
    assert torch.equal(out, torch.zeros(1, 3, 3, 4, 4))
    cpu_fused.pass2(ps, ps, ps, torch.ones(2, 1, dtype=F64), torch.eye(4).expand(1, 3, 4, 4),
                    torch.eye(4).expand(1, 3, 4, 4), hp, row_orthonormal=False)


def test_rejects_bad_arguments(gen):
    hp = hyper()
    ps, gs, ms, vs, _ = make_bucket(gen, (4, 50), 2, F32)
    _, _, bc = bias(2, gen)
    with pytest.raises(RuntimeError, match="exp_avgs must be Float|must be Float"):
        cpu_fused.pass1(ps, gs, [m.double() for m in ms], vs, None, bc, hp)
    with pytest.raises(RuntimeError, match="bc must have shape"):
        cpu_fused.pass1(ps, gs, ms, vs, None, bc[:, :1], hp)
    with pytest.raises(RuntimeError, match="same length"):
        cpu_fused.pass1(ps, gs[:1], ms, vs, None, bc, hp)
    with pytest.raises(RuntimeError, match="shape"):
        cpu_fused.pass1(ps, [gs[0], gs[1][:, :49]], ms, vs, None, bc, hp)
    with pytest.raises(RuntimeError, match="amsgrad"):
        cpu_fused.pass1(ps, gs, ms, vs, None, bc, hyper(amsgrad=True))
    odd = [torch.randn(50, 4).mT for _ in gs]  # unit stride along r, the others along n
    assert cpu_fused.unsupported_reason(ps, odd, ms, vs) is not None
    with pytest.raises(RuntimeError, match="unit stride"):
        cpu_fused.pass1(ps, odd, ms, vs, None, bc, hp)
    with pytest.raises(RuntimeError, match="c and e"):
        cpu_fused.pass2(ps, ms, vs, bc, torch.eye(4).expand(3, 4, 4), torch.zeros(2, 4, 4), hp)
    assert cpu_fused.unsupported_reason(ps, gs, ms, vs) is None
    assert cpu_fused.unsupported_reason([p.to(torch.int32) for p in ps]) is not None


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ps = [torch.empty(2, 8, 100) for _ in range(3)]
        states = [torch.empty(2, 8, 100) for _ in range(3)]
        out = torch.ops.stiefel_kernels.stiefel_adamw_pass1(
            ps, ps, states, states, [], torch.empty(2, 3, dtype=F64), 0.9, 0.999, 1e-8, False,
            False, True)
        assert out.shape == (3, 2, 3, 8, 8) and out.dtype == F32
        out = torch.ops.stiefel_kernels.stiefel_adamw_pass1(
            [p.to(F64) for p in ps], ps, states, states, [], torch.empty(2, 3), 0.9, 0.999, 1e-8,
            False, False, True)
        assert out.dtype == F64


def test_default_kernel_matches_native(gen):
    """The ops' pure-torch default kernel (other devices) agrees with the CPU kernel."""
    from stiefel_kernels import ops

    hp = hyper(amsgrad=True)
    ps, gs, ms, vs, maxs = make_bucket(gen, (6, 5000), 2, F32, amsgrad=True)
    _, _, bc = bias(2, gen)
    rms, rvs, rmax = clone(ms), clone(vs), clone(maxs)
    got = cpu_fused.pass1(ps, gs, ms, vs, maxs, bc, hp)
    want = ops._stiefel_adamw_pass1_default(ps, gs, rms, rvs, rmax, bc, hp.beta1, hp.beta2,
                                            hp.eps, True, False, True)
    assert rel(got, want) < RTOL[F32]
    for a, b in zip(ms + vs + maxs, rms + rvs + rmax):
        assert torch.equal(a, b)
    c, e, _ = gram.step_coefficients(*got.unbind(-3), hp.lr, hp.retraction, tol=1e-6)
    rps = clone(ps)
    cpu_fused.pass2(ps, ms, maxs, bc, c, e, hp)
    ops._stiefel_adamw_pass2_default(rps, rms, rmax, bc, c, e, hp.eps, True)
    assert rel(torch.stack(ps), torch.stack(rps)) < RTOL[F32]


# ------------------------------------------------------------------ stiefel_adamw_pass1_into
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("shape,count", [((16, 300), 3), ((768, 64), 2), ((3, 6, 20), 2), ((5, 4100), 2)],
                         ids=["wide", "tall", "stack", "two-chunks"])
def test_pass1_into_writes_the_same_bits(gen, shape, count, dtype):
    """Pass 1 into a caller's buffer (first filled with NaN: every element must be written) gives
    the allocating op's grams and moments bit for bit, and returns the buffer."""
    hp = hyper(amsgrad=True)
    ps, gs, ms, vs, maxs = make_bucket(gen, shape, count, dtype, amsgrad=True)
    _, _, bc = bias(count, gen)
    rms, rvs, rmax = clone(ms), clone(vs), clone(maxs)
    want = cpu_fused.pass1(ps, gs, rms, rvs, rmax, bc, hp)
    out = torch.full_like(want, float("nan"))
    got = cpu_fused.pass1(ps, gs, ms, vs, maxs, bc, hp, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, want)
    for a, b in zip(ms + vs + maxs, rms + rvs + rmax):
        assert torch.equal(a, b)


def test_pass1_into_rejects_bad_buffers(gen):
    """Every refusal comes before any moment is written."""
    hp = hyper()
    ps, gs, ms, vs, _ = make_bucket(gen, (40, 8), 2, F32)
    _, _, bc = bias(2, gen)
    before = clone(ms + vs)
    for out, match in ((torch.empty(2, 3, 8, 7), "must be a contiguous CPU tensor of shape"),
                       (torch.empty(2, 3, 8, 8, dtype=F64), "in the working dtype"),
                       (torch.empty(2, 3, 8, 8).transpose(-1, -2), "not contiguous")):
        with pytest.raises(RuntimeError, match=match):
            cpu_fused.pass1(ps, gs, ms, vs, None, bc, hp, out=out)
    # a buffer over a moment would be written while the moment is read; the default kernel
    # (other devices) refuses it too
    from stiefel_kernels import ops

    store = torch.zeros(2 * 3 * 8 * 8 + 40 * 8)
    out = store[:2 * 3 * 8 * 8].view(2, 3, 8, 8)
    ms_over = [ms[0], store[2 * 3 * 8 * 8 - 1:2 * 3 * 8 * 8 - 1 + 40 * 8].view(40, 8)]
    ms_over[1].copy_(ms[1])
    with pytest.raises(RuntimeError, match="must not share memory"):
        cpu_fused.pass1(ps, gs, ms_over, vs, None, bc, hp, out=out)
    with pytest.raises(RuntimeError, match="must not share memory"):
        ops._stiefel_adamw_pass1_into_default(ps, gs, ms_over, vs, [], bc, 0.9, 0.999, 1e-8, False,
                                              False, False, out)
    # ... and so is one over bc (read by every thread while others write grams)
    raw = torch.zeros(16 * 2 + 4 * 2 * 3 * 8 * 8, dtype=torch.uint8)
    bc_over = raw[:32].view(F64).view(2, 2)
    bc_over.copy_(bc)
    out = raw[8:8 + 4 * 2 * 3 * 8 * 8].view(F32).view(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="must not share memory"):
        cpu_fused.pass1(ps, gs, ms, vs, None, bc_over, hp, out=out)
    for a, b in zip(ms + vs + ms_over[1:], before + before[1:2]):
        assert torch.equal(a, b)


def test_pass1_into_opcheck_and_default_kernel(gen):
    from stiefel_kernels import ops

    hp = hyper()
    ps, gs, ms, vs, _ = make_bucket(gen, (6, 40), 2, F32)
    _, _, bc = bias(2, gen)
    out = torch.empty(2, 3, 6, 6)
    torch.library.opcheck(torch.ops.stiefel_kernels.stiefel_adamw_pass1_into.default,
                          (ps, gs, clone(ms), clone(vs), [], bc, 0.9, 0.999, 1e-8, False, False, True, out))
    want = cpu_fused.pass1(ps, gs, clone(ms), clone(vs), None, bc, hp)
    got = torch.empty_like(want)
    ops._stiefel_adamw_pass1_into_default(ps, gs, clone(ms), clone(vs), [], bc, hp.beta1, hp.beta2,
                                          hp.eps, False, False, True, got)
    assert rel(got, want) < RTOL[F32]


def test_optimizer_keeps_its_buckets_buffers_and_steps_the_same(gen, monkeypatch):
    """StiefelAdamW's workspace: the native path writes each bucket's grams, C, E and telemetry
    scratch into buffers kept from step to step (the same storage at every step), and steps
    bit for bit as without them (a workspace of None: every step allocates)."""
    from stiefel_kernels import StiefelAdamW

    def make():
        g = torch.Generator().manual_seed(7)
        a = [torch.nn.Parameter(torch.linalg.qr(torch.randn(300, 16, generator=g, dtype=F64))[0].mT
                                .contiguous().float()) for _ in range(3)]
        b = [torch.nn.Parameter(torch.linalg.qr(torch.randn(90, 8, generator=g, dtype=F64))[0].contiguous().float())
             for _ in range(2)]
        grads = [torch.randn(p.shape, generator=g) for p in a + b]
        return a + b, grads

    runs = []
    for keep in (True, False, "extension without the _into ops"):
        params, grads = make()
        opt = StiefelAdamW(params, lr=1e-2, stiefel=True, backend="torch")
        if not keep:
            opt._workspace = None
        if isinstance(keep, str):  # an extension built before them: nothing kept, same steps
            monkeypatch.setattr(torch_backend, "_NATIVE_INTO", False)
            keep = False
        ptrs = []
        for _ in range(3):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
            if keep:
                ptrs.append(sorted(t.data_ptr() for buf in opt._workspace.values() for t in buf.tensors()))
        if keep:  # per bucket: grams, C, E, K - I
            assert len(opt._workspace) == 2 and len(ptrs[0]) == 8 and ptrs[0] == ptrs[1] == ptrs[2]
        if opt._workspace is not None and not torch_backend._NATIVE_INTO:
            assert opt._workspace == {}
        runs.append(([p.detach().clone() for p in params], opt.orthogonality_error()))
    for other in runs[1:]:
        for a, b in zip(runs[0][0], other[0]):
            assert torch.equal(a, b)
        assert torch.equal(runs[0][1], other[1])
