"""StiefelAdamW: Euclidean groups vs torch.optim.AdamW, backends vs the reference, drift,
state_dict resume, torch.optim API, and every documented error."""
import copy
import io
import sys
import warnings

import pytest
import torch

import stiefel_kernels as sk
from stiefel_kernels import StiefelAdamW, backends

RETRACTIONS = ["cayley_fp", "cayley", "qr", "polar", "newton_schulz"]
FAST_BACKENDS = ["torch"]


def lowrank_problem(gen, shapes, dtype=torch.float64):
    """Stiefel factors of the given stored shapes, and a loss with fresh random data."""
    factors = [sk.random_stiefel(*s, dtype=dtype, generator=gen).requires_grad_() for s in shapes]
    targets = [torch.randn(*s, dtype=dtype, generator=gen) for s in shapes]
    weights = [torch.rand(*s, dtype=dtype, generator=gen) + 0.5 for s in shapes]

    def loss_fn(params=factors):
        return sum(((w * (f - t)) ** 2).sum() + (f ** 3).sum() for f, t, w in zip(params, targets, weights))

    return factors, loss_fn


def step_both(opts, param_lists, loss_fn):
    """One step of each optimizer, each on the gradient of the loss at its own parameters."""
    for opt, params in zip(opts, param_lists):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()


def run(opt, loss_fn, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- Euclidean groups = torch AdamW
@pytest.mark.parametrize("kw", [
    dict(),
    dict(amsgrad=True, weight_decay=0.1),
    dict(maximize=True, betas=(0.8, 0.99), eps=1e-6),
    dict(foreach=False),
    dict(foreach=True, amsgrad=True),
    dict(fused=True),
    dict(fused=False),
])
def test_euclidean_groups_match_torch_adamw_bitwise(gen, kw):
    """Bit for bit against torch's AdamW with the same options; by default (neither foreach nor
    fused given) a Euclidean group runs torch's fused AdamW where torch has it (here, the CPU)."""
    params = [torch.randn(7, 5, generator=gen), torch.randn(13, generator=gen), torch.randn(2, 3, 4, generator=gen)]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt_a = StiefelAdamW(ours, lr=3e-3, **kw)
    theirs_kw = kw if ("foreach" in kw or "fused" in kw) else {**kw, "fused": True}
    opt_b = torch.optim.AdamW(theirs, lr=3e-3, **theirs_kw)
    for step in range(25):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt_a.step()
        opt_b.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for a, b in zip(ours, theirs):
        for key in opt_b.state[b]:
            assert torch.equal(opt_a.state[a][key], opt_b.state[b][key]), key


@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_euclidean_counters_in_one_buffer_match_torch_adamw_bitwise(gen, amsgrad):
    """The CPU's fused Euclidean step advances counters that are elements of one buffer with
    one add (or an indexed add when some tensors sit a step out): still bit for bit torch's
    fused AdamW, with float32 and float64 tensors in one group (two dtype groups), a tensor
    without a gradient at some steps, a tensor learning rate, and across a checkpoint (after
    which the loaded counters are made the elements of one buffer again)."""
    params = [torch.randn(7, 5, generator=gen), torch.randn(13, generator=gen, dtype=torch.float64),
              torch.randn(2, 3, 4, generator=gen), torch.randn(6, generator=gen, dtype=torch.float64)]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt_a = StiefelAdamW(ours, lr=torch.tensor(3e-3), weight_decay=0.1, amsgrad=amsgrad)
    opt_b = torch.optim.AdamW(theirs, lr=torch.tensor(3e-3), weight_decay=0.1, fused=True, amsgrad=amsgrad)
    for step in range(12):
        if step == 6:  # through bytes, as a checkpoint is
            blob = io.BytesIO()
            torch.save(opt_a.state_dict(), blob)
            blob.seek(0)
            opt_a = StiefelAdamW(ours, lr=torch.tensor(3e-3), weight_decay=0.1, amsgrad=amsgrad)
            opt_a.load_state_dict(torch.load(blob))
            base = opt_a.state[ours[0]]["step"]._base
            assert base is not None and all(opt_a.state[p]["step"]._base is base for p in ours)
        skip = 2 if step % 3 == 1 else None
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        for i, (a, b, g) in enumerate(zip(ours, theirs, grads)):
            a.grad = None if i == skip else g.clone()
            b.grad = None if i == skip else g.clone()
        opt_a.step()
        opt_b.step()
        if step == 0:  # the counters are the elements of one buffer
            base = opt_a.state[ours[0]]["step"]._base
            assert base is not None and all(opt_a.state[p]["step"]._base is base for p in ours)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        for key in opt_b.state[b]:
            assert torch.equal(opt_a.state[a][key], opt_b.state[b][key]), key


# ---------------------------------------------------------------- backends vs reference
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("retraction", RETRACTIONS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_backend_matches_reference(gen, backend, retraction, dtype, tol):
    # both orientations, r = 1, n = r, a stack, two factors of one shape (a bucket)
    shapes = [(3, 17), (17, 3), (17, 3), (1, 9), (4, 4), (2, 5, 11)]
    factors, loss_fn = lowrank_problem(gen, shapes, dtype)
    twins = [f.detach().clone().requires_grad_() for f in factors]
    kw = dict(lr=2e-2, retraction=retraction, amsgrad=(retraction == "qr"))
    opt_ref = StiefelAdamW([{"params": factors, "stiefel": True}], backend="reference", **kw)
    opt_fast = StiefelAdamW([{"params": twins, "stiefel": True}], backend=backend, **kw)
    for _ in range(8):
        step_both((opt_ref, opt_fast), (factors, twins), loss_fn)
        for f, t in zip(factors, twins):
            assert rel(t.detach(), f.detach()) < tol
            # one-step error: carry the reference point over so errors do not compound
            with torch.no_grad():
                t.copy_(f)
    for f, t in zip(factors, twins):
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel(opt_fast.state[t][key], opt_ref.state[f][key]) < tol


@pytest.mark.parametrize("retraction", RETRACTIONS)
def test_backend_trajectory_close_over_many_steps(gen, retraction):
    factors, loss_fn = lowrank_problem(gen, [(4, 30), (30, 4), (2, 3, 8)])
    twins = [f.detach().clone().requires_grad_() for f in factors]
    opt_ref = StiefelAdamW([{"params": factors, "stiefel": True}], lr=1e-2, retraction=retraction, backend="reference")
    opt_fast = StiefelAdamW([{"params": twins, "stiefel": True}], lr=1e-2, retraction=retraction, backend="torch")
    for _ in range(100):  # independent trajectories, each on its own gradients
        step_both((opt_ref, opt_fast), (factors, twins), loss_fn)
    for f, t in zip(factors, twins):
        assert rel(t.detach(), f.detach()) < 1e-10  # float64 over 100 steps


def test_bf16_factor_keeps_float32_state(gen):
    a = sk.random_stiefel(4, 64, dtype=torch.bfloat16, generator=gen).requires_grad_()
    a32 = a.detach().float().requires_grad_()
    opt = StiefelAdamW([{"params": [a], "stiefel": True}], lr=1e-2, backend="torch")
    ref = StiefelAdamW([{"params": [a32], "stiefel": True}], lr=1e-2, backend="reference", ortho_tol=5e-2)
    for _ in range(5):
        g = torch.randn(4, 64, generator=gen)
        a.grad = g.bfloat16()
        a32.grad = g.bfloat16().float()
        opt.step()
        ref.step()
        with torch.no_grad():  # compare one step from a common point
            assert rel(a.detach().float(), a32.detach()) < 2e-2
            a32.copy_(a.float())
    assert opt.state[a]["exp_avg"].dtype == torch.float32
    assert sk.orthogonality_error(a).item() < 5e-2


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("retraction", ["cayley_fp", "cayley"])
def test_drift_tol_by_each_factors_own_dtype(gen, backend, retraction):
    """A float32 factor steps bit for bit the same alone as after a float64 factor in its group:
    the default drift_tol comes from each factor's own dtype, not from the group's first factor.
    Both a fresh float32 factor and a drifted one (error between the float32 drift_tol and its
    ortho_tol) are checked."""
    fresh = sk.random_stiefel(4, 40, generator=gen)
    drifted = fresh + 2e-6 * torch.randn(4, 40, generator=gen)
    assert 1e-6 < sk.orthogonality_error(drifted).item() < 1e-4
    grads = [torch.randn(4, 40, generator=gen) for _ in range(4)]
    for x0 in (fresh, drifted):
        alone, mixed = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        first = sk.random_stiefel(3, 10, dtype=torch.float64, generator=gen).requires_grad_()
        kw = dict(lr=1e-2, retraction=retraction, backend=backend)
        opt_alone = StiefelAdamW([{"params": [alone], "stiefel": True}], **kw)
        opt_mixed = StiefelAdamW([{"params": [first, mixed], "stiefel": True}], **kw)
        for g in grads:
            alone.grad, mixed.grad = g.clone(), g.clone()
            first.grad = torch.randn(3, 10, dtype=torch.float64, generator=gen)
            opt_alone.step()
            opt_mixed.step()
            assert torch.equal(alone, mixed)


# ---------------------------------------------------------------- drift over 2000 fp32 steps
@pytest.mark.parametrize("retraction", RETRACTIONS)
def test_orthogonality_after_2000_fp32_steps(gen, retraction):
    """Every step ends with the orthonormality correction (a polar correction folded into the
    coefficients where the new point's ||Y^T Y - I||_F > drift_tol), so nothing accumulates."""
    a = sk.random_stiefel(8, 200, generator=gen).requires_grad_()
    col = sk.random_stiefel(3, 60, 5, generator=gen).requires_grad_()
    target_a = torch.randn(8, 200, generator=gen)
    target_c = torch.randn(3, 60, 5, generator=gen)
    opt = StiefelAdamW([{"params": [a, col], "stiefel": True}], lr=5e-3, retraction=retraction, backend="torch")
    for _ in range(2000):
        opt.zero_grad()
        (((a - target_a) ** 2).sum() + ((col - target_c) ** 2).sum()).backward()
        opt.step()
    assert sk.orthogonality_error(a).max().item() < 1e-5
    assert sk.orthogonality_error(col).max().item() < 1e-5
    assert opt.retraction_failures == 0


def test_reference_orthogonality_after_many_fp32_steps(gen):
    a = sk.random_stiefel(5, 40, generator=gen).requires_grad_()
    target = torch.randn(5, 40, generator=gen)
    opt = StiefelAdamW([{"params": [a], "stiefel": True}], lr=5e-3, backend="reference")
    for _ in range(500):
        opt.zero_grad()
        ((a - target) ** 2).sum().backward()
        opt.step()
    assert sk.orthogonality_error(a).item() < 1e-5


# ---------------------------------------------------------------- it optimizes
def test_two_factor_recovery_converges(gen):
    m, n, r = 20, 30, 4
    target = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)
    a = sk.random_stiefel(r, n, generator=gen).requires_grad_()
    b = torch.zeros(m, r, requires_grad=True)
    opt = StiefelAdamW([{"params": [a], "stiefel": True}, {"params": [b]}], lr=3e-2, weight_decay=0.0)
    for _ in range(1200):
        opt.zero_grad()
        loss = 0.5 * ((b @ a - target) ** 2).sum()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * 0.5 * (target ** 2).sum().item()
    assert sk.orthogonality_error(a).item() < 1e-5


# ---------------------------------------------------------------- torch.optim API
def make_model(gen):
    a = sk.random_stiefel(3, 12, generator=gen).requires_grad_()
    b = torch.randn(8, 3, generator=gen).requires_grad_()
    bias = torch.randn(8, generator=gen).requires_grad_()
    data = torch.randn(16, 12, generator=gen)
    tgt = torch.randn(16, 8, generator=gen)

    def loss_fn(params=(a, b, bias)):  # at the model's own parameters, or at others
        pa, pb, pbias = params
        return ((data @ pa.T @ pb.T + pbias - tgt) ** 2).mean()

    return [a, b, bias], loss_fn


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_resume_gives_same_trajectory(gen, backend, amsgrad):
    def make_opt(ps):
        return StiefelAdamW([{"params": ps[:1], "stiefel": True}, {"params": ps[1:]}],
                            lr=1e-2, amsgrad=amsgrad, backend=backend)

    params, loss_fn = make_model(gen)
    init = [p.detach().clone() for p in params]
    opt = make_opt(params)
    run(opt, loss_fn, 5)
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    run(opt, loss_fn, 5)
    uninterrupted = [p.detach().clone() for p in params]

    with torch.no_grad():
        for p, s in zip(params, saved_params):
            p.copy_(s)
    fresh = make_opt(params)
    fresh.load_state_dict(saved)
    run(fresh, loss_fn, 5)
    for p, u, i in zip(params, uninterrupted, init):
        assert torch.equal(p.detach(), u)
        assert not torch.equal(u, i)


def test_state_dict_keeps_float32_moments_of_bf16_factor(gen):
    a = sk.random_stiefel(4, 32, dtype=torch.bfloat16, generator=gen).requires_grad_()
    opt = StiefelAdamW([{"params": [a], "stiefel": True}], lr=1e-2)
    a.grad = torch.randn(4, 32, generator=gen).bfloat16()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = StiefelAdamW([{"params": [a], "stiefel": True}], lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.state[a]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[a]["exp_avg"], opt.state[a]["exp_avg"])


def test_state_dict_from_other_shapes_is_rejected_and_changes_nothing(gen):
    params, loss_fn = make_model(gen)
    opt = StiefelAdamW([{"params": params[:1], "stiefel": True}, {"params": params[1:]}])
    run(opt, loss_fn, 1)
    other = [sk.random_stiefel(3, 13, generator=gen).requires_grad_(), torch.randn(8, 3, requires_grad=True),
             torch.randn(8, requires_grad=True)]
    opt_other = StiefelAdamW([{"params": other[:1], "stiefel": True}, {"params": other[1:]}])
    other[0].grad = torch.randn(3, 13, generator=gen)
    opt_other.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"shape \(3, 13\).*other shapes"):
        opt.load_state_dict(opt_other.state_dict())
    after = opt.state_dict()
    assert before["param_groups"] == after["param_groups"]
    assert torch.equal(before["state"][0]["exp_avg"], after["state"][0]["exp_avg"])
    # group structure mismatch
    with pytest.raises(ValueError, match="Stiefel"):
        swapped = StiefelAdamW([{"params": params[:1]}, {"params": params[1:], "stiefel": True}])
        swapped.load_state_dict(before)


def make_api_opt(params, **kw):
    """Stiefel group (the factor), Euclidean group (the other two)."""
    return StiefelAdamW([{"params": params[:1], "stiefel": True}, {"params": params[1:]}], **kw)


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def test_lr_scheduler_drives_every_groups_lr(gen):
    """StepLR halves both groups' lr every 2 steps, and the steps use it: a twin whose lr is set
    by hand follows bit for bit, one that keeps lr = 1e-2 does not."""
    params, loss_fn = make_model(gen)
    by_hand, constant = clone_params(params), clone_params(params)
    opt = make_api_opt(params, lr=1e-2)
    opt_hand, opt_const = make_api_opt(by_hand, lr=1e-2), make_api_opt(constant, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for k in range(4):
        for g in opt_hand.param_groups:
            g["lr"] = 1e-2 * 0.5 ** (k // 2)
        step_both((opt, opt_hand, opt_const), (params, by_hand, constant), loss_fn)
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [2.5e-3, 2.5e-3]
    for p, h, c in zip(params, by_hand, constant):
        assert torch.equal(p, h)
        assert not torch.equal(p, c)


def test_step_with_closure_returns_its_loss(gen):
    params, loss_fn = make_model(gen)
    opt = make_api_opt(params, lr=1e-2)
    calls = []

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        calls.append(loss.detach())
        return loss

    losses = [opt.step(closure) for _ in range(4)]
    assert len(calls) == 4  # the closure ran once per step, before the step
    assert all(torch.equal(loss.detach(), c) for loss, c in zip(losses, calls))
    assert losses[-1].item() < losses[0].item()
    assert sk.orthogonality_error(params[0]).item() < 1e-5


def test_zero_grad_of_both_group_kinds(gen):
    params, loss_fn = make_model(gen)
    opt = make_api_opt(params, lr=1e-2)
    run(opt, loss_fn, 1)
    loss_fn().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_add_param_group_euclidean(gen):
    """A group added later defaults to Euclidean, keeps its own lr and steps as torch's AdamW."""
    params, loss_fn = make_model(gen)
    twin = params[2].detach().clone().requires_grad_()
    opt = make_api_opt(params[:2], lr=1e-2)
    opt.add_param_group({"params": params[2:], "lr": 1e-3})
    ref = torch.optim.AdamW([twin], lr=1e-3, weight_decay=opt.defaults["weight_decay"])
    assert opt.param_groups[-1]["stiefel"] is False and opt.param_groups[-1]["lr"] == 1e-3
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        twin.grad = params[2].grad.clone()
        opt.step()
        ref.step()
    assert set(opt.state[params[2]]) == set(ref.state[twin])
    assert torch.equal(params[2], twin)


def test_add_param_group_stiefel(gen):
    """A Stiefel group added later is validated like one given at construction (a bad one adds
    nothing), keeps its options and steps with them: bit for bit like an optimizer built with
    retraction="qr", unlike one built with "polar"."""
    params, loss_fn = make_model(gen)
    opt = make_api_opt(params, lr=1e-2)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [sk.random_stiefel(2, 9, generator=gen).requires_grad_()],
                             "stiefel": True, "weight_decay": 0.1})
    extra = sk.random_stiefel(2, 9, generator=gen).requires_grad_()
    opt.add_param_group({"params": [extra], "stiefel": True, "retraction": "qr"})
    assert len(opt.param_groups) == 3 and opt.param_groups[-1]["retraction"] == "qr"
    twins = {name: extra.detach().clone().requires_grad_() for name in ("qr", "polar")}
    built = {name: StiefelAdamW([{"params": [t], "stiefel": True}], lr=1e-2, retraction=name)
             for name, t in twins.items()}
    for _ in range(3):
        g = torch.randn(2, 9, generator=gen)
        for t in [extra, *twins.values()]:
            t.grad = g.clone()
        for o in [opt, *built.values()]:
            o.step()
    assert torch.equal(extra, twins["qr"])
    assert not torch.equal(extra, twins["polar"])
    assert sk.orthogonality_error(extra).item() < 1e-5


def assert_same_optimizer(a, b):
    """``b`` is an exact copy of ``a``: defaults, param_groups (hyper-parameters and parameter
    values) and every state entry (tensors with ``torch.equal`` and the same dtype)."""
    # torch.optim.Optimizer.__setstate__ adds defaults["differentiable"] = False, which
    # StiefelAdamW's defaults do not have (no group reads it)
    def strip(d):
        return {k: v for k, v in d.items() if (k, v) != ("differentiable", False)}

    assert strip(a.defaults) == strip(b.defaults)
    assert len(a.param_groups) == len(b.param_groups)
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}
        assert len(ga["params"]) == len(gb["params"])
        for pa, pb in zip(ga["params"], gb["params"]):
            assert pb is not pa
            assert pa.dtype == pb.dtype and pa.requires_grad == pb.requires_grad
            assert torch.equal(pa, pb)
            sa, sb = a.state[pa], b.state[pb]
            assert set(sa) == set(sb) and sa, (set(sa), set(sb))
            for key in sa:
                assert isinstance(sb[key], type(sa[key])), key
                if isinstance(sa[key], torch.Tensor):
                    assert sa[key].dtype == sb[key].dtype, key
                    assert torch.equal(sa[key], sb[key]), key
                else:
                    assert sa[key] == sb[key], key
    assert len(a.state) == len(b.state)
    assert a.retraction_failures == b.retraction_failures


def check_exact_copy(opt, clone, gen):
    """``clone`` equals ``opt`` entirely, and a step of each on the same gradients keeps them equal
    bit for bit (parameters and state)."""
    assert_same_optimizer(opt, clone)
    originals = [p for g in opt.param_groups for p in g["params"]]
    copies = [p for g in clone.param_groups for p in g["params"]]
    for _ in range(2):
        for p, q in zip(originals, copies):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        clone.step()
        assert_same_optimizer(opt, clone)


def _trained_opt(gen, backend, amsgrad):
    params, loss_fn = make_model(gen)
    stack = sk.random_stiefel(2, 5, 11, dtype=torch.float64, generator=gen).requires_grad_()
    opt = StiefelAdamW([{"params": [params[0], stack], "stiefel": True, "retraction": "polar"},
                        {"params": params[1:], "lr": 3e-3}],
                       lr=1e-2, amsgrad=amsgrad, backend=backend)
    for _ in range(3):
        opt.zero_grad()
        (loss_fn() + (stack ** 3).sum()).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("backend,amsgrad", [("torch", False), ("torch", True), ("reference", True)])
def test_pickled_optimizer_is_an_exact_copy(gen, backend, amsgrad):
    import pickle

    opt = _trained_opt(gen, backend, amsgrad)
    check_exact_copy(opt, pickle.loads(pickle.dumps(opt)), gen)


@pytest.mark.parametrize("backend,amsgrad", [("torch", False), ("torch", True), ("reference", True)])
def test_deepcopied_optimizer_is_an_exact_copy(gen, backend, amsgrad):
    opt = _trained_opt(gen, backend, amsgrad)
    check_exact_copy(opt, copy.deepcopy(opt), gen)


def test_lr_zero_keeps_factor(gen):
    a = sk.random_stiefel(3, 10, dtype=torch.float64, generator=gen).requires_grad_()
    a0 = a.detach().clone()
    opt = StiefelAdamW([{"params": [a], "stiefel": True}], lr=0.0, retraction="polar")
    a.grad = torch.randn(3, 10, dtype=torch.float64, generator=gen)
    opt.step()
    assert rel(a.detach(), a0) < 1e-14


def test_backend_env_var(gen, monkeypatch):
    a = sk.random_stiefel(3, 10, generator=gen).requires_grad_()
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve_backend("auto", a).name == "reference"
    assert backends.resolve_backend("torch", a).name == "torch"  # explicit wins
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.resolve_backend("auto", a)
    monkeypatch.delenv(backends.ENV_VAR)
    assert backends.resolve_backend("auto", a).name == "torch"  # CPU default


# ---------------------------------------------------------------- loading the triton backend
def fake_cuda_factor():
    """A float32 4 x 32 factor on a (fake) CUDA device: auto_backend's choice without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(4, 32, device="cuda")


@pytest.fixture
def fresh_triton_load(monkeypatch):
    """The next load of the triton backend imports triton_backend afresh (the registry, the
    module cache and the package attribute are restored afterwards)."""
    monkeypatch.delitem(backends._REGISTRY, "triton", raising=False)
    for mod in [m for m in sys.modules if m.startswith(("stiefel_kernels.backends.triton_backend",
                                                         "stiefel_kernels.kernels"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.delattr(backends, "triton_backend", raising=False)
    monkeypatch.setattr(backends, "_TRITON_LOAD_WARNED", set())
    return monkeypatch


def test_auto_backend_picks_triton_on_cuda():
    pytest.importorskip("triton")
    assert backends.auto_backend(fake_cuda_factor()).name == "triton"


def test_auto_backend_without_triton_falls_back_silently(fresh_triton_load):
    fresh_triton_load.setitem(sys.modules, "triton", None)  # as if triton were not installed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.auto_backend(fake_cuda_factor()).name == "torch"
    with pytest.raises(ValueError, match="not usable here: .*triton"):
        backends.get_backend("triton")  # asked for by name, its absence is an error


@pytest.mark.parametrize("value", ["tf32", "IEEE", ""])
def test_auto_backend_bad_triton_dot_env_var_raises(fresh_triton_load, value):
    pytest.importorskip("triton")
    fresh_triton_load.setenv("STIEFEL_KERNELS_TRITON_DOT", value)
    for resolve in (backends.auto_backend, lambda p: backends.resolve_backend("auto", p)):
        with pytest.raises(ValueError, match=f"STIEFEL_KERNELS_TRITON_DOT.*got {value!r}"):
            resolve(fake_cuda_factor())
    assert backends.auto_backend(torch.empty(4, 32)).name == "torch"  # CPU never loads triton


def test_auto_backend_broken_triton_warns_once_and_falls_back(fresh_triton_load):
    pytest.importorskip("triton")
    fresh_triton_load.setitem(sys.modules, "triton.language", None)  # triton there, but broken
    with pytest.warns(RuntimeWarning, match="triton.language.*fall back to the torch backend"):
        assert backends.auto_backend(fake_cuda_factor()).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.auto_backend(fake_cuda_factor()).name == "torch"  # warned once


def _triton_step_is_orthonormal(gen):
    a = sk.random_stiefel(3, 40, generator=gen).requires_grad_()
    opt = StiefelAdamW([{"params": [a], "stiefel": True}], lr=1e-2, backend="triton")
    a.grad = torch.randn(3, 40, generator=gen)
    opt.step()
    return sk.orthogonality_error(a).item() < 1e-5


def test_triton_module_reload_reregisters_the_op_silently(gen):
    """Re-registering the custom op (importlib.reload of the module) raises nothing and warns
    nothing: custom_op replaces its own earlier definition."""
    pytest.importorskip("triton")
    import importlib

    from stiefel_kernels.backends import triton_backend as tb

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(tb)
    assert tb._group_step is not tb._group_step_impl
    assert hasattr(torch.ops.stiefel_kernels, "triton_stiefel_step")
    assert _triton_step_is_orthonormal(gen)


def test_triton_op_registration_failure_warns_and_steps_eagerly(gen, monkeypatch):
    pytest.importorskip("triton")
    import importlib

    from stiefel_kernels.backends import triton_backend as tb

    def refuse(*args, **kwargs):
        raise RuntimeError("stiefel_kernels::triton_stiefel_step defined elsewhere")

    try:
        with monkeypatch.context() as m:
            m.setattr(torch.library, "custom_op", refuse)
            with pytest.warns(RuntimeWarning, match="could not register .*RuntimeError: .*defined elsewhere"):
                importlib.reload(tb)
        assert tb._group_step is tb._group_step_impl
        assert _triton_step_is_orthonormal(gen)
    finally:
        importlib.reload(tb)  # registered again for the tests that follow
    assert tb._group_step is not tb._group_step_impl


# ---------------------------------------------------------------- bad input: clear error, nothing changed
def test_bad_hyperparameters():
    p = [torch.randn(3, 4, requires_grad=True)]
    for kw, msg in [(dict(lr=-1.0), "lr"), (dict(eps=-1e-8), "eps"), (dict(betas=(1.0, 0.9)), "beta"),
                    (dict(betas=(0.9, -0.1)), "beta"), (dict(weight_decay=-0.1), "weight_decay"),
                    (dict(retraction="exp"), "unknown retraction"), (dict(backend="cuda"), "unknown backend"),
                    (dict(cayley_iters=0), "cayley_iters"), (dict(ns_steps=1.5), "ns_steps"),
                    (dict(lr=float("nan")), "lr")]:
        with pytest.raises(ValueError, match=msg):
            StiefelAdamW(p, **kw)


@pytest.mark.parametrize("param,msg", [
    (torch.randn(5), "matrix or a stack"),
    (torch.randn(3, 5, dtype=torch.complex64), "real floating"),
    (torch.ones(3, 5, dtype=torch.int64), "real floating"),
])
def test_bad_stiefel_parameters_rejected(param, msg):
    with pytest.raises(ValueError, match=msg):
        StiefelAdamW([{"params": [param], "stiefel": True}])


def test_weight_decay_on_stiefel_group_rejected():
    a = sk.random_stiefel(3, 5).requires_grad_()
    with pytest.raises(ValueError, match="weight_decay"):
        StiefelAdamW([{"params": [a], "stiefel": True, "weight_decay": 0.1}])
    opt = StiefelAdamW([{"params": [a], "stiefel": True}], weight_decay=0.1)  # inherited: ignored
    a.grad = torch.randn(3, 5)
    opt.step()
    assert sk.orthogonality_error(a).item() < 1e-5


def test_bad_add_param_group_adds_nothing(gen):
    params, _ = make_model(gen)
    opt = StiefelAdamW([{"params": params[:1], "stiefel": True}])
    with pytest.raises(ValueError, match="matrix or a stack"):
        opt.add_param_group({"params": [params[2]], "stiefel": True})
    with pytest.raises(ValueError, match="unknown retraction"):
        opt.add_param_group({"params": [params[1]], "retraction": "bogus"})
    assert len(opt.param_groups) == 1


def test_not_orthonormal_at_first_step_raises_and_changes_nothing(gen):
    a = torch.randn(3, 12, generator=gen).requires_grad_()
    b = torch.randn(8, 3, generator=gen).requires_grad_()
    opt = StiefelAdamW([{"params": [b]}, {"params": [a], "stiefel": True}], lr=1e-2)
    a.grad = torch.randn(3, 12, generator=gen)
    b.grad = torch.randn(8, 3, generator=gen)
    a0, b0 = a.detach().clone(), b.detach().clone()
    with pytest.raises(ValueError, match=r"param group 1, param 0 .*not orthonormal.*orthonormalize_"):
        opt.step()
    assert torch.equal(a, a0) and torch.equal(b, b0)  # the Euclidean group did not step either
    assert len(opt.state) == 0
    sk.orthonormalize_(a)
    opt.step()
    assert sk.orthogonality_error(a).item() < 1e-5


def test_sparse_gradient_rejected(gen):
    a = sk.random_stiefel(3, 12, generator=gen).requires_grad_()
    opt = StiefelAdamW([{"params": [a], "stiefel": True}])
    a.grad = torch.randn(3, 12, generator=gen).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0


def test_param_names_in_errors(gen):
    a = torch.randn(3, 12, generator=gen).requires_grad_()
    opt = StiefelAdamW([{"params": [("layer.lora_A", a)], "stiefel": True}])
    a.grad = torch.randn(3, 12, generator=gen)
    with pytest.raises(ValueError, match="layer.lora_A"):
        opt.step()


def test_nonfinite_gradient_propagates_like_torch_adamw(gen):
    """Documented: no check, like torch.optim.AdamW; NaN reaches the factor (and only it)."""
    a = sk.random_stiefel(3, 12, generator=gen).requires_grad_()
    c = sk.random_stiefel(3, 12, generator=gen).requires_grad_()
    opt = StiefelAdamW([{"params": [a, c], "stiefel": True}], backend="torch")
    a.grad = torch.full((3, 12), float("nan"))
    c.grad = torch.randn(3, 12, generator=gen)
    opt.step()
    assert torch.isnan(a).all()
    assert torch.isfinite(c).all()  # a bucket-mate is not contaminated


def test_copies_keep_the_retraction_failure_count(gen):
    """``retraction_failures`` is optimizer state too: pickle and deepcopy keep it."""
    import copy
    import pickle

    opt = _trained_opt(gen, "torch", False)
    opt._retraction_failures = torch.tensor(3, dtype=torch.int32)  # as a failed step leaves it
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert clone.retraction_failures == 3
        assert_same_optimizer(opt, clone)
