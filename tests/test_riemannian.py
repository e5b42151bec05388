"""Any-optimizer Riemannian hooks (StelLA's update rule) against a literal transcription of the
official StelLA code (``StellaModel.pre_optimizer_step`` / ``post_optimizer_step``), float64."""
import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stiefel_kernels import orthogonality_error, random_stiefel, retract_polar
from _recipes import GPT, GPTConfig  # the recipe model python/_gpt.py
from stiefel_kernels.nn import StelLALinear, inject_stella, make_stella_optimizer
from stiefel_kernels.riemannian import make_riemannian, project_and_retract_


# --- the official step, transcribed (stella/tuner/model.py and stella/tuner/stiefel.py) ----------
# Factors are handed over as column-form views ``(x, g)`` (``m x r``, ``m >= r``) of the
# parameter and its gradient; the official code groups them by shape and stacks each group.

@torch.no_grad()
def _official_pre(views):
    """pre_optimizer_step: ``g <- g - x (g^T x)`` per shape group; caches the stacked ``x``."""
    groups = defaultdict(list)
    for x, g in views:
        groups[tuple(x.shape)].append((x, g))
    cache = {}
    for k, items in groups.items():
        x = torch.stack([xv for xv, _ in items], dim=0)
        cache[k] = x.detach()
        g = torch.stack([gv for _, gv in items], dim=0)
        g_riemannian = g - x @ (g.mT @ x)                     # euclidean2riemannian
        for (_, gv), g_r in zip(items, g_riemannian):
            gv.copy_(g_r)
    return groups, cache


@torch.no_grad()
def _official_post(groups, cache, c):
    """post_optimizer_step with the polar retraction; ``c`` = None when grad scaling is off."""
    for k, pre_ps in cache.items():
        items = groups[k]
        grad = torch.stack([xv for xv, _ in items], dim=0) - pre_ps
        m = grad.size(1)
        if c is not None and m != c:
            grad.div_(math.sqrt(m / c))                          # gradient scaling
        a = pre_ps.mT @ grad
        grad = grad - pre_ps @ (0.5 * (a + a.mT))                # tangent_project
        u, _, vt = torch.linalg.svd(pre_ps + grad, full_matrices=False)
        for (xv, _), xo in zip(items, u @ vt):                   # polar_retraction: uf(X + grad)
            xv.copy_(xo)


def _hook_official(opt, views, c):
    """Register the transcribed step on ``opt`` as StellaTrainer does (pre/post step hooks)."""
    state = {}
    opt.register_step_pre_hook(lambda o, a, k: state.update(pc=_official_pre(views())))
    opt.register_step_post_hook(lambda o, a, k: _official_post(*state.pop("pc"), c))


def _rel(got, want):
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


class _Adapted(nn.Module):
    """One StelLA layer ``9 -> 6`` (``U`` 6 x 3, ``V`` 9 x 3), optionally with an HF-like config."""

    def __init__(self, gen, hidden_size=None):
        super().__init__()
        lin = nn.Linear(9, 6, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(6, 9, generator=gen, dtype=torch.float64))
            lin.bias.copy_(torch.randn(6, generator=gen, dtype=torch.float64))
        self.layer = StelLALinear(lin, 3, alpha=6.0, generator=gen)
        if hidden_size is not None:
            self.config = SimpleNamespace(hidden_size=hidden_size)

    def forward(self, x):
        return torch.tanh(self.layer(x))


# c = 7 from the config: U (m = 6) and V (m = 9) both scaled; c = 9: V has m == c (skipped);
# c = 7.5 given explicitly (a float, as the official config allows); None: grad_scaling=False.
@pytest.mark.parametrize("c,how", [(7, "config"), (9, "config"), (7.5, "explicit"), (None, "off")])
def test_hooks_match_official_stella_step(gen, c, how):
    model = _Adapted(gen, hidden_size=c if how == "config" else None)
    ref = copy.deepcopy(model)
    x = torch.randn(16, 9, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    lr, betas, eps, wd, steps = 0.05, (0.9, 0.99), 1e-8, 0.1, 20
    kw = {"c": c} if how == "explicit" else {"grad_scaling": False} if how == "off" else {}
    opt, hooks = make_stella_optimizer(model, torch.optim.AdamW, lr=lr, betas=betas, eps=eps,
                                       weight_decay=wd, **kw)
    m_u, m_v = 6, 9
    assert hooks.scales == [1 / math.sqrt(m / c) if (c is not None and m != c) else 1.0 for m in (m_u, m_v)]
    ref_opt = torch.optim.AdamW([{"params": [ref.layer.U, ref.layer.V], "weight_decay": 0.0},
                                 {"params": [ref.layer.S], "weight_decay": wd}], lr=lr, betas=betas, eps=eps)
    _hook_official(ref_opt, lambda: [(p, p.grad) for p in (ref.layer.U, ref.layer.V)], c)
    for mdl, o in ((model, opt), (ref, ref_opt)):
        for _ in range(steps):
            o.zero_grad()
            (mdl(x) - y).pow(2).mean().backward()
            o.step()
    for name in ("U", "V", "S"):
        got, want = getattr(model.layer, name).detach(), getattr(ref.layer, name).detach()
        assert _rel(got, want) < 1e-8, name
    assert float(orthogonality_error(model.layer.U)) < 1e-10 and float(orthogonality_error(model.layer.V)) < 1e-10
    assert hooks.retraction_failures == 0


def test_scaling_acts_on_the_update_not_the_gradient(gen):
    # Adam's first step is -lr * g / (|g| + eps): a constant scale of g would (almost) cancel.
    # The official scaling divides the update by sqrt(m / c): with m = 12, c = 3 the tangent step
    # is halved (s = 1 / sqrt(4)); with c = m it is unchanged.
    u0 = random_stiefel(12, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    lr, eps = 1e-3, 1e-8
    rg = g - u0 @ g.T @ u0                            # the pre-hook's gradient: unscaled
    delta = -lr * rg / (rg.abs() + eps)               # Adam's first update (bias-corrected)
    xi = delta - u0 @ (0.5 * (u0.T @ delta + delta.T @ u0))
    for c, s in ((12, 1.0), (3, 0.5)):
        u = nn.Parameter(u0.clone())
        opt = torch.optim.Adam([u], lr=lr, eps=eps)
        make_riemannian(opt, [u], c=c)
        u.grad = g.clone()
        opt.step()
        want = retract_polar(u0, s * xi)
        assert _rel(u.detach() - u0, want - u0) < 1e-8, c


def test_batched_retraction_equals_per_factor_polar(gen):
    xs = random_stiefel(4, 2, 11, 3, dtype=torch.float64, generator=gen)  # 4 factors, each a stack of 2
    ys = xs + 0.1 * torch.randn(xs.shape, generator=gen, dtype=torch.float64)
    scales = [0.5, 1.0, 1.7, 0.3]
    for s_arg, s_list in ((1.0, [1.0] * 4), (0.6, [0.6] * 4), (scales, scales)):
        want = []
        for x, y, s in zip(xs, ys, s_list):
            dlt = s * (y - x)
            want.append(retract_polar(x, dlt - x @ (0.5 * (x.mT @ dlt + dlt.mT @ x))))
        targets = [y.clone() for y in ys]
        info = project_and_retract_(targets, xs.clone(), s_arg)
        assert int(info.ne(0).sum()) == 0
        assert _rel(torch.stack(targets), torch.stack(want)) < 1e-10


def test_wide_and_stacked_factors_sgd_match_official(gen):
    a = nn.Parameter(random_stiefel(3, 10, generator=gen, dtype=torch.float64))     # wide: orthonormal rows
    q = nn.Parameter(random_stiefel(2, 12, 4, generator=gen, dtype=torch.float64))  # a stack of 2 tall factors
    w = torch.randn(10, generator=gen, dtype=torch.float64)
    ra, rq = nn.Parameter(a.detach().clone()), nn.Parameter(q.detach().clone())
    opt = torch.optim.SGD([a, q], lr=0.1, momentum=0.9)
    hooks = make_riemannian(opt, [a, q], c=6)
    assert hooks.scales == [1 / math.sqrt(10 / 6), 1 / math.sqrt(12 / 6)] and hooks.c == 6
    ref_opt = torch.optim.SGD([ra, rq], lr=0.1, momentum=0.9)
    _hook_official(ref_opt, lambda: [(ra.mT, ra.grad.mT), (rq[0], rq.grad[0]), (rq[1], rq.grad[1])], 6)
    for (pa, pq), o in (((a, q), opt), ((ra, rq), ref_opt)):
        for _ in range(5):
            o.zero_grad()
            (torch.tanh(pa.sum(0) @ w) + pq.pow(3).sum()).backward()
            o.step()
    assert _rel(a.detach(), ra.detach()) < 1e-10 and _rel(q.detach(), rq.detach()) < 1e-10
    assert float(orthogonality_error(a)) < 1e-12 and float(orthogonality_error(q).max()) < 1e-12


def test_many_layers_float32_orthonormal_scheduler_state_dict(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 40))
    mods = inject_stella(model, ["0", "2", "4"], r=4, alpha=8.0)
    with pytest.raises(ValueError, match="hidden size"):  # nn.Sequential has no config
        make_stella_optimizer(model, torch.optim.Adam, lr=1e-2)
    opt, hooks = make_stella_optimizer(model, torch.optim.Adam, lr=1e-2, c=24)
    assert isinstance(opt, torch.optim.Adam)
    assert hooks.scales == [1 / math.sqrt(40 / 24), 1.0, 1.0, 1 / math.sqrt(40 / 24), 1 / math.sqrt(40 / 24), 1.0]
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


def test_make_stella_optimizer_reads_hidden_size_of_recipe_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16))
    inject_stella(model, ["fc", "proj"], r=2)
    _, hooks = make_stella_optimizer(model)
    assert hooks.c == 16  # config.d_model
    # fc: U 64 x 2 scaled, V 16 x 2 not; proj: U 16 x 2 not, V 64 x 2 scaled
    assert hooks.scales == [0.5, 1.0, 1.0, 0.5]
    with pytest.raises(TypeError, match="d= was removed"):
        make_stella_optimizer(model, d=16)
    with pytest.raises(ValueError, match="grad_scaling=False"):
        make_stella_optimizer(model, grad_scaling=False, c=16)


def _no_hooks(opt):
    return not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


BAD_C = [0, -4, 0.0, -2.5, float("nan"), float("inf"), -float("inf"), True, False, "8", None, torch.tensor(8.0)]


@pytest.mark.parametrize("bad", [b for b in BAD_C if b is not None], ids=repr)
def test_bad_c_is_rejected_before_any_hook(gen, bad):
    u = nn.Parameter(random_stiefel(8, 3, generator=gen))
    v = nn.Parameter(random_stiefel(5, 3, generator=gen))
    opt = torch.optim.Adam([u, v])
    with pytest.raises(ValueError, match="c must be a positive finite number"):
        make_riemannian(opt, [u, v], c=bad)
    assert _no_hooks(opt)


def test_inconsistent_scaling_arguments_are_rejected(gen):
    u = nn.Parameter(random_stiefel(8, 3, generator=gen))
    opt = torch.optim.Adam([u])
    cases = [
        (([u],), {}, "needs c"),
        (([u],), {"grad_scaling": False, "c": 8}, "grad_scaling=False"),
        (([u],), {"grad_scaling": 4096.0}, "grad_scaling must be True or False"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            make_riemannian(opt, *args, **kw)
        assert _no_hooks(opt)
    # the old API's (factor, d) pairs and d= (d = the layer's in_features) are refused, not
    # silently read with a new meaning
    for bad in ([(u, 8)], [(u, 0)], [(u, 8, 1)]):
        with pytest.raises(TypeError, match="pairs are gone"):
            make_riemannian(opt, bad, c=8)
        assert _no_hooks(opt)
    with pytest.raises(TypeError):
        make_riemannian(opt, [u], d=8)
    assert _no_hooks(opt)
    hooks = make_riemannian(opt, [u], c=2.5)  # a float c is valid (the official config takes one)
    assert hooks.c == 2.5 and hooks.scales == [1 / math.sqrt(8 / 2.5)]


def test_errors(gen):
    p = nn.Parameter(torch.randn(8, 3, generator=gen))
    opt = torch.optim.Adam([p])
    with pytest.raises(ValueError, match="not orthonormal"):
        make_riemannian(opt, [p], grad_scaling=False)
    with pytest.raises(ValueError, match="not in the optimizer"):
        make_riemannian(opt, [nn.Parameter(random_stiefel(8, 3))], grad_scaling=False)
    assert _no_hooks(opt)
    with torch.no_grad():
        p.copy_(random_stiefel(8, 3, generator=gen))
    make_riemannian(opt, [p], grad_scaling=False)
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: 0.0)


def test_bfloat16_factors(gen):
    u = nn.Parameter(random_stiefel(16, 3, generator=gen).to(torch.bfloat16))
    opt = torch.optim.Adam([u], lr=1e-2)
    make_riemannian(opt, [u], c=8)
    for _ in range(3):
        opt.zero_grad()
        (u.float() @ torch.ones(3)).pow(2).sum().backward()
        opt.step()
    assert u.dtype == torch.bfloat16 and float(orthogonality_error(u)) < 5e-2
