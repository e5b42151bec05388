"""A step without host work that depends on the factors: cached launch plans that are reused
only for the very same memory, step counters and bias corrections on the factors' device, the
torch backend's step under ``torch.compile(fullgraph=True)``, and (on a GPU) the whole step
captured in a CUDA graph and replayed against eager steps. Tolerances: tests/README.md."""
import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import stiefel_kernels  # noqa: E402
from stiefel_kernels import StiefelAdamW  # noqa: E402
from stiefel_kernels.backends import (StiefelHyperparams, bias_correction_tensor,  # noqa: E402
                                      bias_corrections, get_backend, state_dtype)
from stiefel_kernels.geometry import orthogonality_error, random_stiefel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _hp(retraction="cayley_fp", lr=1e-2):
    return StiefelHyperparams(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False,
                              maximize=False, retraction=retraction, cayley_iters=2, ns_steps=6,
                              drift_tol=1e-6)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _state(ps):
    return ([torch.zeros(p.shape, dtype=state_dtype(p), device=p.device) for p in ps],
            [torch.zeros(p.shape, dtype=state_dtype(p), device=p.device) for p in ps], None,
            [torch.zeros((), device=p.device) for p in ps])


def test_bias_correction_tensor_matches_the_float64_formula(gen):
    steps = [torch.tensor(float(t)) for t in torch.randint(1, 10**6, (7,), generator=gen)]
    steps[0] = torch.tensor(1.0)
    bc1, bc2 = bias_corrections(steps, 0.9, 0.999)
    got = bias_correction_tensor(steps, 0.9, 0.999, torch.device("cpu"), dtype=torch.float64)
    assert torch.equal(got, torch.tensor([bc1, bc2], dtype=torch.float64))
    rep = bias_correction_tensor(steps[:3], 0.9, 0.999, torch.device("cpu"), repeats=(2, 1, 3))
    assert torch.equal(rep, torch.tensor([bc1[:3], bc2[:3]]).float()[:, [0, 0, 1, 2, 2, 2]])


def test_stiefel_step_counters_follow_the_factor_and_survive_load_state_dict(gen):
    a = torch.nn.Parameter(random_stiefel(4, 24, generator=gen).to(DEVICE))
    b = torch.nn.Parameter(torch.randn(24, 4, generator=gen).to(DEVICE))
    opt = StiefelAdamW([{"params": [a], "stiefel": True}, {"params": [b]}], lr=1e-2, backend="torch")
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert opt.state[a]["step"].device == a.device and float(opt.state[a]["step"]) == 1.0
    saved = opt.state_dict()
    saved["state"][0]["step"] = saved["state"][0]["step"].cpu()  # a checkpoint from anywhere
    twin = StiefelAdamW([{"params": [a], "stiefel": True}, {"params": [b]}], lr=1e-2, backend="torch")
    twin.load_state_dict(saved)
    assert twin.state[a]["step"].device == a.device and float(twin.state[a]["step"]) == 1.0


def test_counters_of_factors_that_start_together_share_one_buffer(gen, monkeypatch):
    """A Stiefel group's first step makes its counters the elements of one buffer, which the
    backend advances with one add (no foreach, no stack); a state_dict round trip packs the
    loaded counters into one buffer again; counters that are separate tensors (here made so by
    hand) take the foreach fallback. All three step the same."""
    ps = [torch.nn.Parameter(random_stiefel(3, 20, generator=gen)) for _ in range(4)]
    opt = StiefelAdamW([{"params": ps, "stiefel": True}], lr=1e-2, backend="torch")
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    steps = [opt.state[p]["step"] for p in ps]
    base = steps[0]._base
    assert base is not None and all(s._base is base for s in steps) and base.shape == (4,)
    twins = []
    for separate in (False, True):
        twin_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        twin = StiefelAdamW([{"params": twin_ps, "stiefel": True}], lr=1e-2, backend="torch")
        saved = copy.deepcopy(opt.state_dict())  # load_state_dict shares the tensors it is given
        saved["state"] = {k: {**v, "step": v["step"].clone()} for k, v in saved["state"].items()}
        twin.load_state_dict(saved)
        twin_base = twin.state[twin_ps[0]]["step"]._base
        assert twin_base is not None and twin_base is not base
        assert all(twin.state[q]["step"]._base is twin_base for q in twin_ps)  # one buffer again
        if separate:
            for q in twin_ps:
                twin.state[q]["step"] = twin.state[q]["step"].clone()
        twins.append((twin, twin_ps, separate))
    foreach_calls = []
    real = torch._foreach_add_
    monkeypatch.setattr(torch, "_foreach_add_", lambda *a, **k: foreach_calls.append(1) or real(*a, **k))
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        assert len(foreach_calls) == 0
        for twin, twin_ps, separate in twins:
            for q, g in zip(twin_ps, grads):
                q.grad = g.clone()
            twin.step()
            assert (len(foreach_calls) > 0) == separate
            foreach_calls.clear()
    for twin, twin_ps, _ in twins:
        for p, q in zip(ps, twin_ps):
            assert torch.equal(p, q)
        assert [float(twin.state[q]["step"]) for q in twin_ps] == [3.0] * 4
    assert [float(s) for s in steps] == [3.0] * 4 and float(base.sum()) == 12.0


pytest.importorskip("triton")
from stiefel_kernels.backends import triton_backend as tb  # noqa: E402

TRITON = get_backend("triton")
REF = get_backend("reference")


def test_triton_plan_is_built_once_and_only_reused_for_the_same_memory(gen, monkeypatch):
    """Steady-state steps reuse one plan; new gradient tensors (new addresses), a moment
    replaced by a tensor of another shape, or a parameter moved to new memory get a fresh plan
    or a clear error, and the steps stay equal to the reference backend's."""
    built = []
    real = tb._Plan.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(tb._Plan, "__init__", counting)
    monkeypatch.setattr(tb, "_PLANS", type(tb._PLANS)())
    shapes = [(3, 40), (3, 40), (50, 5)]
    ps = [random_stiefel(*s, generator=gen).to(DEVICE) for s in shapes]
    qs = [p.clone() for p in ps]
    st_t, st_r = _state(ps), _state(qs)
    hp = _hp()
    gs = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    for _ in range(3):  # the same gradient tensors, refilled: one plan
        for g in gs:
            g.copy_(torch.randn(g.shape, generator=gen))
        TRITON.step(ps, gs, *st_t, hp)
        REF.step(qs, gs, *st_r, hp)
    assert len(built) == 1
    fresh = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]  # new addresses
    TRITON.step(ps, fresh, *st_t, hp)
    REF.step(qs, fresh, *st_r, hp)
    assert len(built) == 2
    for p, q in zip(ps, qs):
        assert _rel(p, q) < 1e-5
    ps[0].data = ps[0].data.clone()  # the parameter's memory moves: a new plan, same result
    TRITON.step(ps, gs, *st_t, hp)
    REF.step(qs, gs, *st_r, hp)
    assert len(built) == 3
    for p, q in zip(ps, qs):
        assert _rel(p, q) < 1e-5
    before = [p.clone() for p in ps]
    st_t[0][1] = torch.zeros(3, 41, device=DEVICE)  # a moment that no longer fits
    with pytest.raises(ValueError, match="factor 1: optimizer state"):
        TRITON.step(ps, gs, *st_t, hp)
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_triton_steady_state_step_does_no_per_factor_work(gen, monkeypatch):
    """After the first step, neither the per-factor support check nor the pointer arrays run."""
    shapes = [(2, 24)] * 6
    ps = [torch.nn.Parameter(random_stiefel(*s, generator=gen).to(DEVICE)) for s in shapes]
    opt = StiefelAdamW([{"params": ps, "stiefel": True}], lr=1e-2, backend="triton")
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
    opt.step()
    calls = []
    monkeypatch.setattr(tb, "unsupported_reason", lambda p: calls.append("check"))
    monkeypatch.setattr(tb, "pointer_array", lambda *a: calls.append("ptrs"))
    monkeypatch.setattr(StiefelAdamW, "_init_state", lambda *a: calls.append("init"))
    for _ in range(2):
        opt.step()
    assert calls == []
    assert float(orthogonality_error(torch.stack([p.detach() for p in ps])).max()) < 1e-5


@pytest.mark.slow
def test_torch_backend_step_compiles_with_fullgraph(gen):
    """No graph break in the torch backend's step (bias corrections from device counters, no
    float(step)), also with a workspace (the per-bucket buffers StiefelAdamW keeps); the compiled
    step equals the eager one (no workspace: every step allocates) within float32 rounding."""
    torch._dynamo.reset()
    shapes = [(4, 32), (4, 32), (40, 5)]
    ps = [random_stiefel(*s, generator=gen) for s in shapes]
    qs = [p.clone() for p in ps]
    st_c, st_e = _state(ps), _state(qs)
    step = get_backend("torch").step
    compiled = torch.compile(step, fullgraph=True)
    hp = _hp()
    workspace = {}
    for _ in range(2):
        gs = [torch.randn(s, generator=gen) for s in shapes]
        compiled(ps, gs, *st_c, hp, workspace=workspace)
        step(qs, gs, *st_e, hp)
    for p, q in zip(ps, qs):
        assert _rel(p, q) < 1e-5
    assert [float(s) for s in st_c[3]] == [2.0] * 3


def _cuda_graph_replay_equals_eager_steps(gen):
    """The whole StiefelAdamW step (triton Stiefel group, fused Euclidean group) captured once
    and replayed equals eager steps on a twin: nothing in the step reads the host or copies
    host memory (capture would fail), and replays see the advancing step counters."""
    def build():
        g = torch.Generator().manual_seed(0)
        a = [torch.nn.Parameter(random_stiefel(16, 512, generator=g).cuda()) for _ in range(4)]
        b = [torch.nn.Parameter(torch.randn(512, 16, generator=g).cuda()) for _ in range(4)]
        opt = StiefelAdamW([{"params": a, "stiefel": True}, {"params": b, "fused": True}],
                           lr=1e-2, backend="triton")
        return a + b, opt
    ps, opt = build()
    qs, twin = build()
    grads = [torch.randn(p.shape, generator=gen).cuda() for p in ps]
    for p, q, g in zip(ps, qs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: state, plans and compiled kernels exist before capture
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        twin.step()
    for _ in range(4):
        graph.replay()
        twin.step()
    torch.cuda.synchronize()
    for p, q in zip(ps, qs):
        assert _rel(p, q) < 1e-5
    assert float(opt.state[ps[0]]["step"]) == float(twin.state[qs[0]]["step"])


if torch.cuda.is_available():  # collected only where it can run (tests/README.md, marker gpu)
    test_cuda_graph_replay_equals_eager_steps = pytest.mark.gpu(_cuda_graph_replay_equals_eager_steps)
