"""Any-optimizer Riemannian hooks (StelLA's update rule) against a literal float64 reference."""
import math

import pytest
import torch
from torch import nn

from stiefel_kernels import orthogonality_error, random_stiefel, retract_polar
from stiefel_kernels.geometry import as_column_form
from stiefel_kernels.nn import StelLALinear, inject_stella, make_stella_optimizer, stella_riemannian_params
from stiefel_kernels.riemannian import make_riemannian, project_and_retract_


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(gen, n_in=9, n_out=6, r=3, batch=16):
    lin = nn.Linear(n_in, n_out, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=torch.float64))
        lin.bias.copy_(torch.randn(n_out, generator=gen, dtype=torch.float64))
    mod = StelLALinear(lin, r, alpha=2.0 * r, generator=gen)
    x = torch.randn(batch, n_in, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, n_out, generator=gen, dtype=torch.float64)
    return mod, x, y


def _loss(w0, b, u, s, v, scaling, x, y):
    out = x @ w0.T + b + scaling * (x @ v) @ s.T @ u.T
    return (torch.tanh(out) - y).pow(2).mean()


def test_hooks_match_literal_stella_reference(gen):
    mod, x, y = _problem(gen)
    lr, betas, eps, wd, steps = 0.05, (0.9, 0.99), 1e-8, 0.1, 6
    w0, b = mod.base.weight.detach(), mod.base.bias.detach()
    d = mod.in_features
    # --- reference, written out: Riemannian grad with scaling -> Adam step -> project Delta -> polar
    u, s, v = (t.detach().clone() for t in (mod.U, mod.S, mod.V))
    st = {k: [torch.zeros_like(t), torch.zeros_like(t)] for k, t in (("u", u), ("v", v), ("s", s))}
    for t in range(1, steps + 1):
        u_, s_, v_ = (z.clone().requires_grad_() for z in (u, s, v))
        gu, gs, gv = torch.autograd.grad(_loss(w0, b, u_, s_, v_, mod.scaling, x, y), (u_, s_, v_))
        new = {}
        for key, yk, g in (("u", u, gu), ("v", v, gv)):
            scale = math.sqrt(d / yk.shape[0])
            rg = scale * (g - yk @ g.T @ yk)
            m, vv = st[key]
            m.mul_(betas[0]).add_((1 - betas[0]) * rg)
            vv.mul_(betas[1]).add_((1 - betas[1]) * rg * rg)
            mhat, vhat = m / (1 - betas[0] ** t), vv / (1 - betas[1] ** t)
            y_tmp = yk - lr * mhat / (vhat.sqrt() + eps)          # Adam (no decay on U, V)
            delta = y_tmp - yk
            xi = delta - yk @ (0.5 * (yk.T @ delta + delta.T @ yk))  # project onto T_Y
            pu, _, pvh = torch.linalg.svd(yk + xi, full_matrices=False)
            new[key] = pu @ pvh                                     # polar retraction
        m, vv = st["s"]                                             # S: plain AdamW
        m.mul_(betas[0]).add_((1 - betas[0]) * gs)
        vv.mul_(betas[1]).add_((1 - betas[1]) * gs * gs)
        s = s * (1 - lr * wd) - lr * (m / (1 - betas[0] ** t)) / ((vv / (1 - betas[1] ** t)).sqrt() + eps)
        u, v = new["u"], new["v"]
    # --- the hooks on torch.optim.AdamW
    opt = torch.optim.AdamW([{"params": [mod.U, mod.V], "weight_decay": 0.0},
                             {"params": [mod.S], "weight_decay": wd}], lr=lr, betas=betas, eps=eps)
    hooks = make_riemannian(opt, stella_riemannian_params(mod))
    assert hooks.scales == [math.sqrt(9 / 6), 1.0]
    for _ in range(steps):
        opt.zero_grad()
        (torch.tanh(mod(x)) - y).pow(2).mean().backward()
        opt.step()
    for got, want in ((mod.U, u), (mod.V, v), (mod.S, s)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    assert float(orthogonality_error(mod.U)) < 1e-12 and float(orthogonality_error(mod.V)) < 1e-12
    assert hooks.retraction_failures == 0


def test_batched_retraction_equals_per_factor_polar(gen):
    xs = random_stiefel(4, 2, 11, 3, dtype=torch.float64, generator=gen)  # 4 factors, each a stack of 2
    ys = xs + 0.1 * torch.randn(xs.shape, generator=gen, dtype=torch.float64)
    want = []
    for x, y in zip(xs, ys):
        dlt = y - x
        want.append(retract_polar(x, dlt - x @ (0.5 * (x.mT @ dlt + dlt.mT @ x))))
    targets = [y.clone() for y in ys]
    info = project_and_retract_(targets, xs.clone())
    assert int(info.ne(0).sum()) == 0
    torch.testing.assert_close(torch.stack(targets), torch.stack(want), rtol=1e-10, atol=1e-12)


def test_many_layers_float32_orthonormal_scheduler_state_dict(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 40))
    mods = inject_stella(model, ["0", "2", "4"], r=4, alpha=8.0)
    opt, hooks = make_stella_optimizer(model, torch.optim.Adam, lr=1e-2)
    assert isinstance(opt, torch.optim.Adam)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    x = torch.randn(32, 24, generator=gen)
    target = torch.randn(32, 40, generator=gen)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        sched.step()
    assert losses[-1] < 0.8 * losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.125)
    for m in mods:
        assert float(orthogonality_error(m.U)) < 1e-5 and float(orthogonality_error(m.V)) < 1e-5
    sd = opt.state_dict()
    opt2 = torch.optim.Adam([{"params": list(g["params"])} for g in opt.param_groups], lr=1.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    hooks.remove()  # Euclidean again: a step now leaves the orthonormal manifold
    opt.zero_grad()
    (model(x) - target).pow(2).mean().backward()
    opt.step()
    assert float(orthogonality_error(mods[0].U)) > 1e-4


def test_wide_and_stacked_factors_sgd(gen):
    a = nn.Parameter(random_stiefel(3, 10, generator=gen))         # wide: orthonormal rows
    q = nn.Parameter(random_stiefel(2, 12, 4, generator=gen))      # a stack of 2 tall factors
    opt = torch.optim.SGD([a, q], lr=0.1, momentum=0.9)
    hooks = make_riemannian(opt, [a, q], d=6)
    assert hooks.scales == [math.sqrt(6 / 10), math.sqrt(6 / 12)]
    for _ in range(5):
        opt.zero_grad()
        (a.sum(0) @ torch.linspace(-1, 1, 10) + q.pow(3).sum()).backward()
        opt.step()
    assert float(orthogonality_error(a)) < 1e-5
    assert float(orthogonality_error(q).max()) < 1e-5
    assert float((as_column_form(a.detach()) - as_column_form(a.detach())).abs().max()) == 0.0


def test_errors(gen):
    p = nn.Parameter(torch.randn(8, 3, generator=gen))
    opt = torch.optim.Adam([p])
    with pytest.raises(ValueError, match="not orthonormal"):
        make_riemannian(opt, [p])
    with pytest.raises(ValueError, match="not in the optimizer"):
        make_riemannian(opt, [nn.Parameter(random_stiefel(8, 3))])
    with torch.no_grad():
        p.copy_(random_stiefel(8, 3, generator=gen))
    make_riemannian(opt, [p])
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: 0.0)


def test_bfloat16_factors(gen):
    u = nn.Parameter(random_stiefel(16, 3, generator=gen).to(torch.bfloat16))
    opt = torch.optim.Adam([u], lr=1e-2)
    make_riemannian(opt, [u], d=8)
    for _ in range(3):
        opt.zero_grad()
        (u.float() @ torch.ones(3)).pow(2).sum().backward()
        opt.step()
    assert u.dtype == torch.bfloat16 and float(orthogonality_error(u)) < 5e-2
