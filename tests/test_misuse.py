"""Misuse of StiefelAdamW (issue 10, parts 3 and 4): every check runs before any state changes.

Each test does one misuse, asserts a clear error (naming the parameter or group where there is
one), and asserts that nothing changed: parameters, gradients and optimizer state (step
counters included) of every group, and the groups' hyper-parameters, compared with
``torch.equal`` against copies taken just before the failing call."""
import copy

import pytest
import torch
from torch import Tensor

import stiefel_kernels as sk
from stiefel_kernels import StiefelAdamW


# ---------------------------------------------------------------- helpers
def set_grads(opt, gen):
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen).to(p.dtype)


def make_opt(gen, **kw):
    """Group 0 Euclidean (it steps first), group 1 Stiefel (a wide matrix and a stack of tall
    ones); named parameters; one step taken, fresh gradients set for the next."""
    b = torch.randn(8, 3, generator=gen).requires_grad_()
    bias = torch.randn(8, generator=gen).requires_grad_()
    a = sk.random_stiefel(3, 12, generator=gen).requires_grad_()
    stack = sk.random_stiefel(2, 5, 4, generator=gen).requires_grad_()
    opt = StiefelAdamW([{"params": [("lora_B", b), ("bias", bias)]},
                        {"params": [("lora_A", a), ("stack", stack)], "stiefel": True}],
                       lr=1e-2, **kw)
    set_grads(opt, gen)
    opt.step()
    set_grads(opt, gen)
    return opt


def _clone(v):
    return v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)


def snapshot(opt):
    groups = opt.param_groups
    return dict(
        params=[[p.detach().clone() for p in g["params"]] for g in groups],
        grads=[[None if p.grad is None else p.grad.detach().clone() for p in g["params"]] for g in groups],
        state=[[{k: _clone(v) for k, v in opt.state.get(p, {}).items()} for p in g["params"]] for g in groups],
        options=[{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in groups],
    )


def _same(x, y):
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        return (isinstance(x, Tensor) and isinstance(y, Tensor) and x.dtype == y.dtype
                and x.device == y.device and torch.equal(x, y))
    return x == y


def assert_unchanged(opt, before):
    after = snapshot(opt)
    for kind in ("params", "grads"):
        for gi, (xs, ys) in enumerate(zip(before[kind], after[kind])):
            assert len(xs) == len(ys)
            for j, (x, y) in enumerate(zip(xs, ys)):
                assert (x is None and y is None) or _same(x, y), (kind, gi, j)
    for gi, (xs, ys) in enumerate(zip(before["state"], after["state"])):
        for j, (x, y) in enumerate(zip(xs, ys)):
            assert x.keys() == y.keys(), ("state keys", gi, j)
            for k in x:
                assert _same(x[k], y[k]), ("state", gi, j, k)
    assert before["options"] == after["options"]


# ---------------------------------------------------------------- hyper-parameters changed mid-run
@pytest.mark.parametrize("gi", [0, 1])
@pytest.mark.parametrize("key,value,msg", [
    ("lr", -1.0, "lr"),
    ("lr", float("nan"), "lr"),
    ("retraction", "bogus", "unknown retraction"),
    ("betas", (0.9, 1.0), "beta"),
    ("eps", -1e-8, "eps"),
    ("weight_decay", -0.1, "weight_decay"),
    ("backend", "nope", "unknown backend"),
    ("cayley_iters", 0, "cayley_iters"),
])
def test_bad_hyperparameter_set_mid_run_raises_before_any_change(gen, gi, key, value, msg):
    opt = make_opt(gen)
    opt.param_groups[gi][key] = value
    before = snapshot(opt)
    with pytest.raises(ValueError, match=rf"param group {gi}: .*{msg}"):
        opt.step()
    assert_unchanged(opt, before)


def test_negative_lr_from_a_scheduler_raises_before_any_change(gen):
    opt = make_opt(gen)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else -1.0)
    sched.step()
    assert opt.param_groups[1]["lr"] < 0
    before = snapshot(opt)
    with pytest.raises(ValueError, match="param group 0: lr"):
        opt.step()
    assert_unchanged(opt, before)


# ---------------------------------------------------------------- parameters changed after their first step
@pytest.mark.parametrize("gi,j,name", [(1, 0, "lora_A"), (1, 1, "stack"), (0, 0, "lora_B")])
def test_parameter_converted_to_float64_after_first_step(gen, gi, j, name):
    opt = make_opt(gen)
    p = opt.param_groups[gi]["params"][j]
    p.data = p.data.double()  # what model.double() does
    p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=rf"param group {gi}, param {j} '{name}'.*float64.*"
                                         r"'exp_avg' is torch.float32.*load_state_dict"):
        opt.step()
    assert_unchanged(opt, before)
    # the remedy the message gives works: the state is cast to the parameter's dtype
    opt.load_state_dict(opt.state_dict())
    assert opt.state[p]["exp_avg"].dtype == torch.float64
    opt.step()
    assert all(float(s["step"]) == 2.0 for s in opt.state.values())
    for q in opt.param_groups[1]["params"]:
        assert float(sk.orthogonality_error(q).max()) < 1e-5


def test_parameter_of_other_shape_after_first_step(gen):
    opt = make_opt(gen)
    a = opt.param_groups[1]["params"][0]
    a.data = sk.random_stiefel(12, 3, generator=gen)  # transposed
    a.grad = torch.randn(12, 3, generator=gen)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 1, param 0 'lora_A'.*'exp_avg'.*shape \(3, 12\)"):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("gi", [0, 1])
def test_gradient_of_other_shape_at_a_later_step(gen, gi):
    opt = make_opt(gen)
    p = opt.param_groups[gi]["params"][0]
    p.grad.data = torch.randn(p.shape[::-1], generator=gen)  # bypasses autograd's own check
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=rf"gradient of shape .* param group {gi}, param 0"):
        opt.step()
    assert_unchanged(opt, before)


def test_state_entry_edited_to_other_dtype(gen):
    opt = make_opt(gen, amsgrad=True)
    a = opt.param_groups[1]["params"][0]
    opt.state[a]["max_exp_avg_sq"] = opt.state[a]["max_exp_avg_sq"].double()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"'lora_A'.*'max_exp_avg_sq' is torch.float64"):
        opt.step()
    assert_unchanged(opt, before)


def test_state_entry_missing_at_step(gen):
    opt = make_opt(gen)
    a = opt.param_groups[1]["params"][0]
    del opt.state[a]["exp_avg_sq"]
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"'lora_A'.*lacks \['exp_avg_sq'\]"):
        opt.step()
    assert_unchanged(opt, before)


# ---------------------------------------------------------------- zero-size factors
@pytest.mark.parametrize("shape", [(0, 32), (4, 0), (0, 4, 32), (2, 0, 3)])
def test_zero_size_factor_rejected_at_construction_and_add_param_group(gen, shape):
    empty = torch.zeros(shape, requires_grad=True)
    ok = sk.random_stiefel(3, 12, generator=gen).requires_grad_()
    with pytest.raises(ValueError, match=r"param 1 \('empty'\).*every dim >= 1"):
        StiefelAdamW([{"params": [("ok", ok), ("empty", empty)], "stiefel": True}])
    bias = torch.randn(5, generator=gen).requires_grad_()
    opt = StiefelAdamW([bias])
    with pytest.raises(ValueError, match=r"param group 1, param 0.*every dim >= 1"):
        opt.add_param_group({"params": [empty], "stiefel": True})
    assert len(opt.param_groups) == 1
    StiefelAdamW([{"params": [empty]}])  # a Euclidean group takes it, as torch.optim.AdamW does


def test_factor_emptied_before_its_first_step(gen):
    bias = torch.randn(5, generator=gen).requires_grad_()
    a = sk.random_stiefel(3, 12, generator=gen).requires_grad_()
    opt = StiefelAdamW([{"params": [bias]}, {"params": [a], "stiefel": True}])
    a.data = torch.zeros(0, 12)
    a.grad = torch.zeros(0, 12)
    bias.grad = torch.randn(5, generator=gen)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 1, param 0.*every dim >= 1"):
        opt.step()
    assert_unchanged(opt, before)


# ---------------------------------------------------------------- load_state_dict
def _drop(key, pid):
    return lambda sd: sd["state"][pid].pop(key)


def _set_group(gi, **kw):
    return lambda sd: sd["param_groups"][gi].update(kw)


def _set_state(pid, **kw):
    return lambda sd: sd["state"][pid].update(kw)


@pytest.mark.parametrize("corrupt,msg", [
    (_set_group(1, retraction="bogus"), r"param group 1: unknown retraction 'bogus'"),
    (_set_group(0, lr=-1.0), r"param group 0: lr"),
    (_set_group(1, lr=-1.0), r"param group 1: lr"),
    (_set_group(1, betas=(0.9,)), r"param group 1: betas"),
    (_set_group(1, fused=True), r"param group 1: fused=True"),
    (_drop("exp_avg_sq", 2), r"'lora_A'.*lacks \['exp_avg_sq'\]"),
    (_drop("exp_avg_sq", 0), r"'lora_B'.*lacks \['exp_avg_sq'\]"),
    (_drop("step", 3), r"'stack'.*lacks \['step'\]"),
    (_drop("exp_avg", 2), r"'lora_A'.*lacks \['exp_avg'\]"),
    (_set_state(2, step=torch.tensor(-1.0)), r"step counter of .*'lora_A'.*>= 0"),
    (_set_state(2, step=torch.ones(2)), r"step counter of .*'lora_A'.*one-element"),
    (_set_state(2, exp_avg_sq=[0.0]), r"'exp_avg_sq' of .*'lora_A'.* must be a floating-point tensor"),
    (_set_state(3, exp_avg=torch.zeros(3)), r"'stack'.*shape \(3,\).*other shapes"),
])
def test_invalid_state_dict_rejected_at_load_and_changes_nothing(gen, corrupt, msg):
    opt = make_opt(gen)
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=rf"load_state_dict.*{msg}"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)


def test_load_state_dict_fills_missing_options_and_number_steps(gen):
    """An older state dict: a group without the newer options, step counters as numbers."""
    opt = make_opt(gen)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        del g["ns_steps"], g["backend"]
    for st in sd["state"].values():
        st["step"] = int(st["step"])
    twin = make_opt(gen)
    twin.load_state_dict(sd)
    assert all(g["ns_steps"] == 6 and g["backend"] == "auto" for g in twin.param_groups)
    for st in twin.state.values():
        assert isinstance(st["step"], Tensor) and st["step"].dtype == torch.float32
    set_grads(twin, gen)
    twin.step()
    assert all(float(st["step"]) == 2.0 for st in twin.state.values())


def test_amsgrad_turned_on_by_a_loaded_group_creates_max_exp_avg_sq(gen):
    opt = make_opt(gen)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        g["amsgrad"] = True
    opt.load_state_dict(sd)
    opt.step()
    for st in opt.state.values():
        assert torch.equal(st["max_exp_avg_sq"], st["exp_avg_sq"])


# ---------------------------------------------------------------- backend checks name the parameter
def test_triton_backend_dtype_error_names_the_parameter(gen):
    pytest.importorskip("triton")
    a = sk.random_stiefel(3, 12, generator=gen).half().requires_grad_()
    opt = StiefelAdamW([{"params": [("attn.lora_A", a)], "stiefel": True}], backend="triton")
    a.grad = torch.randn(3, 12, generator=gen).half()
    with pytest.raises(ValueError, match=r"param group 0, param 0 'attn.lora_A'.*triton.*float16"):
        opt.step()
    assert len(opt.state) == 0


def test_triton_factor_converted_to_float16_after_first_step(gen):
    pytest.importorskip("triton")
    opt = make_opt(gen, backend="triton")
    a = opt.param_groups[1]["params"][0]
    a.data = a.data.half()  # float32 moments still fit; the backend does not
    a.grad = torch.randn(3, 12, generator=gen).half()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 1, param 0 'lora_A'.*triton.*float16"):
        opt.step()
    assert_unchanged(opt, before)


# ---------------------------------------------------------------- PEFT factory
def _peft_model(n_layer=1):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                           fan_in_fan_out=True, init_lora_weights=False)
    return peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), lcfg)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(retraction="bogus"), ValueError, "unknown retraction"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(betas=(0.9, 1.5)), ValueError, "beta"),
    (dict(fused=True), ValueError, "fused"),
    (dict(backend="nope"), ValueError, "unknown backend"),
    (dict(no_such_option=1), TypeError, "no_such_option"),
])
def test_create_stiefel_adamw_validates_before_touching_the_model(kw, exc, msg):
    from stiefel_kernels.integrations.peft import create_stiefel_adamw

    model = _peft_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(exc, match=msg):
        create_stiefel_adamw(model, **kw)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_create_stiefel_adamw_rank_deficient_a_leaves_every_layer_unchanged():
    """The factorizations come before any write: a rank-deficient lora_A in the second layer
    must not leave the first layer's pair rewritten."""
    from stiefel_kernels.integrations.peft import create_stiefel_adamw, lora_pairs

    model = _peft_model(n_layer=2)
    pairs = lora_pairs(model)
    assert len(pairs) == 2
    with torch.no_grad():
        pairs[1][1].zero_()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="rank deficient"):
        create_stiefel_adamw(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# ---------------------------------------------------------------- tensor lr / betas and foreach
def test_tensor_lr_with_foreach_in_a_later_euclidean_group(gen):
    """torch's foreach AdamW (capturable=False) rejects a tensor lr; the Stiefel group before it
    must not have stepped when that error comes."""
    a = sk.random_stiefel(3, 12, generator=gen).requires_grad_()
    b = torch.randn(8, 3, generator=gen).requires_grad_()
    opt = StiefelAdamW([{"params": [a], "stiefel": True}, {"params": [b], "foreach": True}], lr=1e-2)
    set_grads(opt, gen)
    opt.step()
    set_grads(opt, gen)
    for key, value in (("lr", torch.tensor(1e-2)), ("betas", (torch.tensor(0.9), torch.tensor(0.999)))):
        old = opt.param_groups[1][key]
        opt.param_groups[1][key] = value
        before = snapshot(opt)
        with pytest.raises(ValueError, match="param group 1: a tensor lr or betas needs fused=True or foreach=False"):
            opt.step()
        assert_unchanged(opt, before)
        opt.param_groups[1][key] = old
    with pytest.raises(ValueError, match="a tensor lr or betas"):
        StiefelAdamW([{"params": [b], "foreach": True}], lr=torch.tensor(1e-2))
    # where torch takes them (foreach=False), they are accepted
    opt.param_groups[1]["foreach"] = False
    opt.param_groups[1]["lr"] = torch.tensor(1e-2)
    opt.step()
