"""The Triton backend against float64 torch math (pass 1, pass 2) and the reference backend (steps).

Without CUDA the kernels run under the Triton interpreter on CPU tensors; sizes stay small
because the interpreter is slow. Tolerances follow tests/README.md (by dtype).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from stiefel_kernels.backends import StiefelHyperparams, get_backend, state_dtype  # noqa: E402
from stiefel_kernels.backends import triton_backend as tb  # noqa: E402
from stiefel_kernels.geometry import as_column_form, orthogonality_error, random_stiefel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RETRACTIONS = ["cayley_fp", "cayley", "qr", "polar", "newton_schulz"]
REF = get_backend("reference")
TRITON = get_backend("triton")


def _hp(retraction="cayley_fp", amsgrad=False, maximize=False, lr=1e-2, eps=1e-8):
    return StiefelHyperparams(lr=lr, beta1=0.9, beta2=0.999, eps=eps, amsgrad=amsgrad,
                              maximize=maximize, retraction=retraction, cayley_iters=2, ns_steps=6,
                              drift_tol=1e-6)


def _states(params, amsgrad):
    def z():
        return [torch.zeros(p.shape, dtype=state_dtype(p), device=p.device) for p in params]
    return z(), z(), (z() if amsgrad else None), [torch.tensor(0.0) for _ in params]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _compare_with_reference(gen, shapes, hp, *, dtype=torch.float32, grad_dtype=None, steps=5,
                            tol=1e-5):
    """Run ``steps`` steps of both backends from identical copies; check params and moments."""
    grad_dtype = grad_dtype or dtype
    ps = [random_stiefel(*s, generator=gen).to(dtype=dtype, device=DEVICE) for s in shapes]
    qs = [p.clone() for p in ps]
    st_t, st_r = _states(ps, hp.amsgrad), _states(qs, hp.amsgrad)
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen).to(dtype=grad_dtype, device=DEVICE) for s in shapes]
        fails = TRITON.step(ps, gs, *st_t, hp)
        REF.step(qs, gs, *st_r, hp)
        assert fails is not None and fails.dtype == torch.int32 and int(fails) == 0
    for p, q in zip(ps, qs):
        assert p.dtype == dtype and p.shape == q.shape
        assert _rel(p, q) < tol, (p.shape, _rel(p, q))
        assert float(orthogonality_error(p).max()) < (1e-5 if dtype == torch.float32 else 5e-2)
    for kind in (0, 1) + ((2,) if hp.amsgrad else ()):
        for a, b in zip(st_t[kind], st_r[kind]):
            assert _rel(a, b) < 1e-6
    assert all(float(a) == float(b) == steps for a, b in zip(st_t[3], st_r[3]))


# ----------------------------------------------------------------------------- pass 1 / pass 2
def _random_moments(gen, shape, amsgrad):
    m = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.1
    v = torch.rand(shape, generator=gen, dtype=torch.float32) * 0.01 + 1e-4
    vmax = v + torch.rand(shape, generator=gen, dtype=torch.float32) * 0.01 if amsgrad else None
    return m, v, vmax


@pytest.mark.parametrize("shape,num_chunks,block_n", [
    ((3, 37), 1, None),         # wide (LoRA A), odd n, r = 3
    ((130, 12), 3, 32),         # tall, several chunks, ragged last block
    ((2, 1, 64), 2, 32),        # stack of r = 1 rows
    ((48, 70), 2, 32),          # r = 48 -> R_PAD = 64
    ((64, 131), 1, None),       # r = 64, the largest supported (MAX_RANK)
])
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)])
def test_pass1_moments_and_grams_match_float64(gen, shape, num_chunks, block_n, amsgrad, maximize):
    nf = 2
    ps = [random_stiefel(*shape, generator=gen) for _ in range(nf)]
    gs = [torch.randn(shape, generator=gen) for _ in range(nf)]
    moments = [_random_moments(gen, shape, amsgrad) for _ in range(nf)]
    ms0 = [mm[0].clone() for mm in moments]
    vs0 = [mm[1].clone() for mm in moments]
    vmax0 = [mm[2].clone() for mm in moments] if amsgrad else None
    ms, vs = [mm[0].to(DEVICE) for mm in moments], [mm[1].to(DEVICE) for mm in moments]
    vmaxs = [mm[2].to(DEVICE) for mm in moments] if amsgrad else None
    ps_d = [p.to(DEVICE) for p in ps]
    gs_d = [g.to(DEVICE) for g in gs]
    hp = _hp(amsgrad=amsgrad, maximize=maximize)
    t = [3.0, 7.0]
    per = ps[0].numel() // (shape[-2] * shape[-1])
    bc1 = [1 - hp.beta1 ** s for s in t for _ in range(per)]
    bc2 = [(1 - hp.beta2 ** s) ** 0.5 for s in t for _ in range(per)]
    bc = torch.tensor([bc1, bc2], dtype=torch.float32, device=DEVICE)

    n, r, _, _ = tb._orientation(shape)
    num = nf * per
    cfg = tb.launch_config(n, r, num, torch.device(DEVICE), num_chunks=num_chunks, block_n=block_n)
    assert cfg["num_chunks"] == num_chunks
    ptrs = tb.pointer_array([ps_d, gs_d, ms, vs, vmaxs], torch.device(DEVICE))
    partials = torch.full((num, cfg["num_chunks"], 3, cfg["R_PAD"], cfg["R_PAD"]), float("nan"),
                          device=DEVICE)
    grams = tb.pass1(ptrs, shape, torch.float32, torch.float32, bc, hp, cfg, num, partials=partials)
    assert grams.shape == (num, 3, r, r)
    assert torch.isfinite(partials).all()

    for i in range(nf):
        g = gs[i].double() * (-1 if maximize else 1)
        m = ms0[i].double() + 0.1 * (g - ms0[i].double())
        v = 0.999 * vs0[i].double() + 0.001 * g * g
        assert _rel(ms[i].cpu(), m) < 1e-6 and _rel(vs[i].cpu(), v) < 1e-6
        if amsgrad:
            v = torch.maximum(vmax0[i].double(), v)
            assert _rel(vmaxs[i].cpu(), v) < 1e-6
        bcs1 = torch.tensor(bc1[i * per:(i + 1) * per], dtype=torch.float64).view(-1, 1, 1)
        bcs2 = torch.tensor(bc2[i * per:(i + 1) * per], dtype=torch.float64).view(-1, 1, 1)
        d = (m.reshape(-1, *shape[-2:]) / bcs1) / (v.reshape(-1, *shape[-2:]).sqrt() / bcs2 + hp.eps)
        x = as_column_form(ps[i].double().reshape(-1, *shape[-2:]))
        d = as_column_form(d)
        want = torch.stack([x.mT @ x, x.mT @ d, d.mT @ d], dim=1)
        got = grams[i * per:(i + 1) * per].cpu()
        for j in range(3):
            assert _rel(got[:, j], want[:, j]) < 1e-5, (j, _rel(got[:, j], want[:, j]))


@pytest.mark.parametrize("shape", [(3, 37), (64, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pass2_matches_float64(gen, shape, dtype):
    nf = 2
    ps = [random_stiefel(*shape, generator=gen).to(dtype) for _ in range(nf)]
    moments = [_random_moments(gen, shape, False) for _ in range(nf)]
    ms, vs = [mm[0] for mm in moments], [mm[1] for mm in moments]
    n, r, _, _ = tb._orientation(shape)
    hp = _hp()
    bc = torch.tensor([[0.271, 0.5], [0.0547, 0.1]], dtype=torch.float32)
    cfg = tb.launch_config(n, r, nf, torch.device(DEVICE), num_chunks=2, block_n=32)
    c = torch.eye(r) + 0.01 * torch.randn(nf, r, r, generator=gen)
    e = 0.01 * torch.randn(nf, r, r, generator=gen)
    coef = torch.full((nf, 2, cfg["R_PAD"], cfg["R_PAD"]), 0.0)
    coef[:, 0, :r, :r] = c - torch.eye(r)
    coef[:, 1, :r, :r] = e
    want = []
    for i in range(nf):
        d = (ms[i].double() / float(bc[0, i])) / (vs[i].double().sqrt() / float(bc[1, i]) + hp.eps)
        y = as_column_form(ps[i].double()) @ c[i].double() + as_column_form(d) @ e[i].double()
        want.append(y.mT if shape[0] < shape[1] else y)
    dev = [[t.to(DEVICE) for t in ts] for ts in (ps, ms, vs)]
    ptrs = tb.pointer_array([dev[0], dev[0], dev[1], dev[2], None], torch.device(DEVICE))
    tb.pass2(ptrs, shape, dtype, bc.to(DEVICE), coef.to(DEVICE), hp, cfg, nf)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    for p, w in zip(dev[0], want):
        assert p.dtype == dtype
        assert _rel(p.cpu(), w) < tol
        if dtype == torch.bfloat16:  # round to nearest even, as a CUDA cast does
            assert torch.equal(p.cpu(), w.float().to(torch.bfloat16))


# ----------------------------------------------------------------------------- full steps
@pytest.mark.parametrize("retraction", RETRACTIONS)
@pytest.mark.parametrize("shape", [(3, 37), (37, 3)], ids=["wide", "tall"])
def test_step_matches_reference(gen, retraction, shape):
    _compare_with_reference(gen, [shape, shape], _hp(retraction))


@pytest.mark.parametrize("retraction", ["cayley_fp", "polar"])
def test_stack_and_mixed_buckets(gen, retraction):
    # a 3-D parameter (stack of 2 factors), r = 12 / r = 1, and several buckets in one call
    _compare_with_reference(gen, [(2, 12, 64), (130, 12), (1, 64), (2, 12, 64)], _hp(retraction))


@pytest.mark.parametrize("amsgrad,maximize", [(True, False), (False, True), (True, True)])
def test_amsgrad_maximize(gen, amsgrad, maximize):
    _compare_with_reference(gen, [(12, 64), (64, 12)], _hp("qr", amsgrad=amsgrad, maximize=maximize))


@pytest.mark.parametrize("retraction,grad_dtype", [("cayley_fp", torch.bfloat16),
                                                   ("polar", torch.float32)])
def test_bf16_params_fp32_states(gen, retraction, grad_dtype):
    _compare_with_reference(gen, [(12, 64), (37, 3)], _hp(retraction), dtype=torch.bfloat16,
                            grad_dtype=grad_dtype, steps=3, tol=2e-2)


def test_bf16_grads_fp32_params(gen):
    # the reference reads the same bf16 gradients (cast to fp32), so fp32 accuracy applies
    _compare_with_reference(gen, [(12, 64)], _hp("cayley"), grad_dtype=torch.bfloat16)


def test_per_factor_step_counts(gen):
    """Factors of one bucket at different steps use their own bias corrections."""
    hp = _hp("cayley_fp")
    shape = (3, 37)
    ps = [random_stiefel(*shape, generator=gen).to(DEVICE) for _ in range(2)]
    qs = [p.clone() for p in ps]
    st_t, st_r = _states(ps, False), _states(qs, False)
    for st in (st_t, st_r):
        st[3][1] += 4
    for _ in range(2):
        gs = [torch.randn(shape, generator=gen).to(DEVICE) for _ in ps]
        TRITON.step(ps, gs, *st_t, hp)
        REF.step(qs, gs, *st_r, hp)
    assert [float(s) for s in st_t[3]] == [2.0, 6.0]
    for p, q in zip(ps, qs):
        assert _rel(p, q) < 1e-5


def test_non_contiguous_param(gen):
    hp = _hp("polar")
    base = random_stiefel(37, 3, generator=gen).to(DEVICE)
    p = base.clone().mT.contiguous().mT  # tall, column-major storage
    q = base.clone()
    assert not p.is_contiguous()
    st_t, st_r = _states([p], False), _states([q], False)
    g = torch.randn(37, 3, generator=gen).to(DEVICE)
    TRITON.step([p], [g], *st_t, hp)
    REF.step([q], [g], *st_r, hp)
    assert _rel(p, q) < 1e-5


@pytest.mark.parametrize("retraction", ["cayley_fp", "newton_schulz"])
def test_orthogonality_kept_over_many_steps(gen, retraction):
    # lr = 1e-2 with Adam-normalized directions is a large step (||lr D|| ~ 0.3); cayley_fp's
    # 2 iterations leave O(||W||^4) after a step, which the orthonormality correction removes
    hp = _hp(retraction, lr=1e-2)
    ps = [random_stiefel(12, 64, generator=gen).to(DEVICE)]
    st = _states(ps, False)
    for _ in range(20):
        TRITON.step(ps, [torch.randn(12, 64, generator=gen).to(DEVICE)], *st, hp)
        assert float(orthogonality_error(ps[0])) < 1e-5  # after every step


# ----------------------------------------------------------------------------- support / ops
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32])
def test_unsupported_dtypes_give_a_reason(dtype):
    p = torch.zeros(3, 8, dtype=dtype, device=DEVICE)
    reason = TRITON.unsupported_reason(p)
    assert reason is not None and str(dtype) in reason


def test_unsupported_shapes_and_devices(monkeypatch):
    assert TRITON.unsupported_reason(torch.empty(8, device=DEVICE)) is not None
    top = tb.MAX_RANK
    assert str(top) in TRITON.unsupported_reason(torch.empty(top + 1, 300, device=DEVICE))
    assert TRITON.unsupported_reason(torch.empty(top, 300, device=DEVICE)) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in TRITON.unsupported_reason(torch.empty(3, 8))
    with pytest.raises(ValueError, match="triton backend"):
        TRITON.step([torch.empty(3, 8)], [torch.empty(3, 8)], *_states([torch.empty(3, 8)], False),
                    _hp())


def test_registered_as_custom_op(gen):
    assert hasattr(torch.ops.stiefel_kernels, "triton_stiefel_step")
    # the fake kernel lets torch.compile trace the op without running it
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p = torch.empty(3, 37, device=DEVICE)
        out = torch.ops.stiefel_kernels.triton_stiefel_step(
            [p], [p], [p], [p], [], torch.empty(2, 1, device=DEVICE), 1e-3, 0.9, 0.999, 1e-8,
            False, "qr", 2, 6, 1e-6)
        assert out.shape == () and out.dtype == torch.int32


def test_optimizer_with_triton_backend(gen):
    """StiefelAdamW(backend="triton") gives the reference backend's parameters."""
    import stiefel_kernels

    def run(backend):
        g = torch.Generator().manual_seed(1)
        a = [torch.nn.Parameter(random_stiefel(4, 64, generator=g).to(DEVICE)) for _ in range(2)]
        b = [torch.nn.Parameter(torch.randn(32, 4, generator=g).to(DEVICE)) for _ in range(2)]
        opt = stiefel_kernels.StiefelAdamW([{"params": a, "stiefel": True}, {"params": b}],
                                           lr=1e-2, backend=backend)
        for _ in range(3):
            for p in a + b:
                p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
            opt.step()
        return a + b, opt

    got, opt = run("triton")
    want, _ = run("reference")
    assert opt.retraction_failures == 0
    for p, q in zip(got, want):
        assert _rel(p.detach(), q.detach()) < 1e-5


def test_step_under_torch_compile(gen):
    """The group step is an opaque custom op: torch.compile traces around it (fake kernel)."""
    hp = _hp("qr")
    ps = [random_stiefel(3, 37, generator=gen).to(DEVICE)]
    qs = [p.clone() for p in ps]
    st_t, st_r = _states(ps, False), _states(qs, False)
    g = [torch.randn(3, 37, generator=gen).to(DEVICE)]

    @torch.compile(backend="aot_eager")
    def compiled_step():
        TRITON.step(ps, g, *st_t, hp)

    compiled_step()
    REF.step(qs, g, *st_r, hp)
    assert _rel(ps[0], qs[0]) < 1e-5


# ----------------------------------------------------------------------------- local shards
def test_launch_config_of_an_empty_shard_launches_nothing():
    """A rank whose shard of the long side is empty (FSDP2) gets no program, zero Gram sums."""
    from stiefel_kernels.kernels import launch

    cfg = launch.launch_config(0, 4, 3, torch.device("cpu"))
    assert cfg["num_chunks"] == 0 and cfg["rows_per_chunk"] > 0
    assert launch.orientation((2, 2), row_orthonormal=True) == (2, 2, 1, 2)
    assert launch.orientation((1, 3), row_orthonormal=False) == (1, 3, 3, 1)
    assert launch.orientation((1, 3)) == (3, 1, 1, 3)


class _OneRank:
    """A ShardGroup of one rank (nothing to sum): the local-shard path on a whole factor."""

    def __init__(self, row_orthonormal):
        self.row_orthonormal = row_orthonormal
        self.calls = []

    def reduce(self, t):
        self.calls.append(tuple(t.shape))
        return t

    def reduce_grams(self, k, g, h):
        return k, g, h


@pytest.mark.parametrize("shape, rows", [((3, 3), True), ((3, 3), False), ((0, 4), False),
                                         ((4, 0), True)])
def test_local_shard_orientation_and_empty_shards_match_torch(shape, rows):
    """A shard that looks square or the other way round is stepped in its global orientation,
    an empty shard joins the reduction and is left empty; the same as the torch backend given
    the same shard."""
    from stiefel_kernels.backends import get_backend

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=gen)
    if x.numel():
        q = torch.linalg.qr(x.mT if rows else x)[0]
        x = q.mT.contiguous() if rows else q.contiguous()
    results = {}
    x = x.to(DEVICE)  # the triton backend takes CUDA tensors, or CPU ones under the interpreter
    for name in ("triton", "torch"):
        p = x.clone()
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
        m, v, st = torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), dtype=torch.float32)
        group = _OneRank(rows)
        get_backend(name).step([p], [g], [m], [v], None, [st], _hp(), sharding=group)
        r = shape[0] if rows else shape[1]
        results[name] = (p, m, v, group)
    p_t, m_t, v_t, grp = results["triton"]
    p_r, m_r, v_r, _ = results["torch"]
    assert grp.calls == [(1, 3, r, r)]  # one reduction of the stacked (K, G, H)
    assert p_t.shape == tuple(shape)
    if p_t.numel():  # fp32 policy, as _compare_with_reference
        assert _rel(m_t, m_r) < 1e-6 and _rel(v_t, v_r) < 1e-6
        assert _rel(p_t, p_r) < 1e-5
        assert orthogonality_error(as_column_form(p_t.mT if rows else p_t)) < 1e-5
