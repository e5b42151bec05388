"""StelLA modules: forward = dense W0 + (alpha/r) U S V^T, merge/unmerge, save/load, injection."""
import pytest
import torch
from torch import nn

from stiefel_kernels import orthogonality_error
from stiefel_kernels.nn import (
    StelLALinear,
    inject_stella,
    load_stella_adapters,
    merge_stella,
    save_stella_adapters,
    stella_hidden_size,
    stella_parameters,
    unmerge_stella,
)


def _lin(gen, n_in, n_out, bias=True, dtype=torch.float64):
    lin = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=dtype))
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=gen, dtype=dtype))
    return lin


def _perturb(mod, gen):
    with torch.no_grad():  # a generic S (not the identity) so the check is not trivial
        mod.S.add_(0.3 * torch.randn(mod.S.shape, generator=gen, dtype=mod.S.dtype))


@pytest.mark.parametrize("s_diagonal", [False, True])
@pytest.mark.parametrize("init", ["random", "svd_major", "svd_minor"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense(gen, s_diagonal, init, bias):
    n_in, n_out, r, alpha = 7, 5, 3, 6.0
    lin = _lin(gen, n_in, n_out, bias)
    w0 = lin.weight.detach().clone()
    mod = StelLALinear(lin, r, alpha, s_diagonal=s_diagonal, init=init, generator=gen)
    _perturb(mod, gen)
    assert mod.U.shape == (n_out, r) and mod.V.shape == (n_in, r)
    assert mod.S.shape == ((r,) if s_diagonal else (r, r))
    assert float(orthogonality_error(mod.U)) < 1e-12 and float(orthogonality_error(mod.V)) < 1e-12
    assert not lin.weight.requires_grad
    s = torch.diag(mod.S) if s_diagonal else mod.S
    w_eff = w0 + (alpha / r) * mod.U @ s @ mod.V.T
    x = torch.randn(4, 2, n_in, generator=gen, dtype=torch.float64)
    ref = x @ w_eff.T + (lin.bias if bias else 0)
    torch.testing.assert_close(mod(x), ref, rtol=1e-12, atol=1e-12)


def test_svd_inits_pick_singular_subspaces(gen):
    lin = _lin(gen, 9, 6)
    u, sv, vh = torch.linalg.svd(lin.weight.detach())
    major = StelLALinear(lin, 2, init="svd_major")
    minor = StelLALinear(_lin(gen, 9, 6), 2, init="svd_minor")
    # projector onto the subspace is basis independent
    torch.testing.assert_close(major.U @ major.U.T, u[:, :2] @ u[:, :2].T)
    torch.testing.assert_close(major.V @ major.V.T, vh[:2].T @ vh[:2])
    um, _, vhm = torch.linalg.svd(minor.base.weight.detach())
    torch.testing.assert_close(minor.V @ minor.V.T, vhm[4:6].T @ vhm[4:6])
    torch.testing.assert_close(major.S, torch.eye(2, dtype=torch.float64))


def test_merge_unmerge_roundtrip(gen):
    lin = _lin(gen, 8, 6)
    w0 = lin.weight.detach().clone()
    mod = StelLALinear(lin, 3, 1.5, generator=gen)
    _perturb(mod, gen)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    y = mod(x)
    mod.merge()
    assert mod.merged
    torch.testing.assert_close(mod(x), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.weight, w0 + mod.delta_weight())
    mod.merge()  # idempotent
    mod.unmerge()
    mod.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(mod(x), y, rtol=1e-12, atol=1e-12)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(8, 8), "up": nn.Linear(8, 16),
                                                   "down": nn.Linear(16, 8)}) for _ in range(2))
        self.head = nn.Linear(8, 11)

    def forward(self, idx):
        h = self.emb(idx)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](b["q_proj"](h))))
        return self.head(h)


def test_stella_hidden_size():
    from types import SimpleNamespace

    model = _Tiny()
    with pytest.raises(ValueError, match="pass c="):
        stella_hidden_size(model)  # no config
    model.config = SimpleNamespace(hidden_size=8, d_model=99)
    assert stella_hidden_size(model) == 8  # hidden_size first (Hugging Face, the official code)
    model.config = {"d_model": 12}
    assert stella_hidden_size(model) == 12
    for bad in (0, -8, 8.0, True, "8"):
        model.config = SimpleNamespace(hidden_size=bad)
        with pytest.raises(ValueError, match="not a positive int"):
            stella_hidden_size(model)


def test_inject_save_load_roundtrip(tmp_path, gen):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    model = _Tiny()
    mods = inject_stella(model, ["q_proj", "up", "blocks.1.down"], r=2, alpha=4.0, generator=gen)
    assert len(mods) == 5 and all(isinstance(m, StelLALinear) for m in mods)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("U", "V", "S") for n in trainable)
    ps = stella_parameters(model)
    assert len(ps["stiefel"]) == 10 and len(ps["euclidean"]) == 5
    assert all(not hasattr(p, "stella_d") for p in ps["stiefel"])  # no per-layer d any more
    with torch.no_grad():
        for m in mods:
            m.S.add_(0.1)
    idx = torch.randint(0, 11, (3, 4), generator=gen)
    y = model(idx)
    path = tmp_path / "adapters.safetensors"
    save_stella_adapters(model, str(path))

    torch.manual_seed(0)
    other = _Tiny()
    inject_stella(other, ["q_proj", "up", "blocks.1.down"], r=2, alpha=4.0)
    assert not torch.allclose(other(idx), y)
    merge_stella(other)  # loading into merged adapters re-merges with the loaded values
    load_stella_adapters(other, str(path))
    torch.testing.assert_close(other(idx), y, rtol=1e-6, atol=1e-6)
    unmerge_stella(other)
    torch.testing.assert_close(other(idx), y, rtol=1e-6, atol=1e-6)

    third = _Tiny()
    inject_stella(third, ["q_proj"], r=2, alpha=4.0)
    with pytest.raises(ValueError, match="missing keys|unexpected keys"):
        load_stella_adapters(third, str(path))
    fourth = _Tiny()
    inject_stella(fourth, ["q_proj", "up", "blocks.1.down"], r=2, alpha=2.0)
    with pytest.raises(ValueError, match="saved with"):
        load_stella_adapters(fourth, str(path))


def test_inject_errors_and_no_double_injection():
    model = _Tiny()
    with pytest.raises(ValueError, match="matches"):
        inject_stella(model, ["nope"], r=2)
    with pytest.raises(ValueError, match="not nn.Linear"):
        inject_stella(model, ["emb"], r=2)
    with pytest.raises(ValueError, match="r must be"):
        StelLALinear(nn.Linear(4, 3), 4)
    first = inject_stella(model, ["up"], r=2, freeze_others=False)
    assert model.head.weight.requires_grad
    assert len(first) == 2
    with pytest.raises(ValueError, match="matches"):  # adapted layers are not adapted twice
        inject_stella(model, lambda n: n.endswith("up") or n.endswith("up.base"), r=2)


def test_peft_factory_clear_import_error(monkeypatch):
    import sys

    from stiefel_kernels.integrations.peft import create_stiefel_adamw
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match=r"stiefel_kernels\[peft\]"):
        create_stiefel_adamw(nn.Linear(2, 2))
