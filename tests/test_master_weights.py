"""``master_weights=True``: a half-precision Stiefel factor keeps a float32 copy in its state,
the step retracts the copy (orthonormal to float32 accuracy) and writes its rounding to the
factor. Tolerances: tests/README.md."""
import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from stiefel_kernels import StiefelAdamW  # noqa: E402
from stiefel_kernels.geometry import orthogonality_error, random_stiefel  # noqa: E402

TOL = 1e-5  # float32 orthonormality (README's guarantee)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _factors(gen, shapes, dtype):
    return [torch.nn.Parameter(random_stiefel(*s, generator=gen).to(dtype)) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_stays_orthonormal_and_the_factor_is_its_rounding(gen, dtype):
    shapes = [(8, 96), (8, 96), (40, 6)]
    ps = _factors(gen, shapes, dtype)
    opt = StiefelAdamW([{"params": ps, "stiefel": True}], lr=3e-2, backend="torch",
                       master_weights=True)
    worst_master = worst_plain = 0.0
    plain = _factors(gen, shapes, dtype)  # the same steps without master weights
    ref = StiefelAdamW([{"params": plain, "stiefel": True}], lr=3e-2, backend="torch")
    for _ in range(200):
        for p, q in zip(ps, plain):
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for p in ps:
            master = opt.state[p]["master"]
            assert master.dtype == torch.float32
            assert torch.equal(p.detach(), master.to(dtype))
            worst_master = max(worst_master, float(orthogonality_error(master)))
        worst_plain = max(worst_plain, max(float(orthogonality_error(q.float())) for q in plain))
    assert worst_master < TOL
    assert worst_plain > 10 * TOL  # without the copy: only the half-precision rounding


def test_master_run_equals_a_float32_run_on_the_same_gradients(gen):
    """The master copy is stepped exactly as a float32 factor would be (same backend, same
    float32 gradients): the half-precision factor only carries its rounding."""
    shapes = [(4, 50), (4, 50)]
    ps = _factors(gen, shapes, torch.bfloat16)
    fs = [torch.nn.Parameter(p.detach().float()) for p in ps]
    opt = StiefelAdamW([{"params": ps, "stiefel": True}], lr=1e-2, backend="torch",
                       master_weights=True, ortho_tol=5e-2)
    twin = StiefelAdamW([{"params": fs, "stiefel": True}], lr=1e-2, backend="torch", ortho_tol=5e-2)
    for _ in range(5):
        for p, f in zip(ps, fs):
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            f.grad = p.grad.float()
        opt.step()
        twin.step()
    for p, f in zip(ps, fs):
        assert _rel(opt.state[p]["master"], f) < 1e-6


def test_master_survives_state_dict_and_resume_is_exact(gen):
    shapes = [(6, 40), (6, 40)]
    ps = _factors(gen, shapes, torch.bfloat16)
    opt = StiefelAdamW([{"params": ps, "stiefel": True}], lr=1e-2, backend="torch",
                       master_weights=True)
    grads = [[torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes] for _ in range(6)]

    def run(o, params, gs):
        for step in gs:
            for p, g in zip(params, step):
                p.grad = g.clone()
            o.step()

    run(opt, ps, grads[:3])
    saved = copy.deepcopy(opt.state_dict())
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    twin = StiefelAdamW([{"params": qs, "stiefel": True}], lr=1e-2, backend="torch",
                        master_weights=True)
    twin.load_state_dict(saved)
    assert twin.state[qs[0]]["master"].dtype == torch.float32  # not cast to the factor's dtype
    run(opt, ps, grads[3:])
    run(twin, qs, grads[3:])
    for p, q in zip(ps, qs):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["master"], twin.state[q]["master"])


def test_master_weights_is_refused_on_a_euclidean_group(gen):
    b = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    with pytest.raises(ValueError, match="master_weights=True applies to Stiefel groups only"):
        StiefelAdamW([{"params": [b], "master_weights": True}])
    with pytest.raises(ValueError, match="master_weights must be True or False"):
        StiefelAdamW([b], master_weights=1)
    StiefelAdamW([b], master_weights=True)  # the constructor's default: ignored by Euclidean groups


@pytest.mark.parametrize("fused", [None, False])
def test_default_master_weights_leaves_half_euclidean_params_alone(gen, fused):
    """The constructor's default reaches a Euclidean group of bf16 parameters: no master copy
    there (it used to be created and then refused as state of the wrong dtype), and the group
    steps exactly as torch's AdamW."""
    a = _factors(gen, [(4, 24)], torch.bfloat16)
    b = torch.nn.Parameter(torch.randn(24, 4, generator=gen).to(torch.bfloat16))
    b_ref = torch.nn.Parameter(b.detach().clone())
    opt = StiefelAdamW([{"params": a, "stiefel": True}, {"params": [b], "fused": fused}],
                       lr=1e-2, master_weights=True)
    # fused=None: a Euclidean group defaults to torch's fused AdamW where it exists (optim.py)
    ref = torch.optim.AdamW([b_ref], lr=1e-2, fused=True if fused is None else fused)
    for _ in range(3):
        a[0].grad = torch.randn(a[0].shape, generator=gen).to(torch.bfloat16)
        b.grad = torch.randn(b.shape, generator=gen).to(torch.bfloat16)
        b_ref.grad = b.grad.clone()
        opt.step()
        ref.step()
    assert "master" in opt.state[a[0]] and "master" not in opt.state[b]
    assert torch.equal(b, b_ref)


def test_master_weights_with_the_triton_backend(gen):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(4, 48), (4, 48)]
    ps = [torch.nn.Parameter(p.detach().to(device)) for p in _factors(gen, shapes, torch.bfloat16)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = StiefelAdamW([{"params": ps, "stiefel": True}], lr=1e-2, backend="triton", master_weights=True)
    b = StiefelAdamW([{"params": qs, "stiefel": True}], lr=1e-2, backend="torch", master_weights=True)
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen).to(device, torch.bfloat16)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert _rel(a.state[p]["master"], b.state[q]["master"]) < TOL
        assert float(orthogonality_error(a.state[p]["master"])) < TOL
