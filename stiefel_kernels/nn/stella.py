"""StelLA adapters: ``W_eff = W0 + (alpha / r) U S V^T`` with ``U``, ``V`` on Stiefel manifolds.

(Li et al., NeurIPS 2025, "StelLA: Subspace Learning in Low-rank Adaptation using Stiefel
Manifold".) ``W0`` (``out x in``) is frozen; ``U`` (``out x r``) and ``V`` (``in x r``) have
orthonormal columns and are trained with a Riemannian optimizer (:func:`make_stella_optimizer`,
or :func:`stiefel_kernels.riemannian.make_riemannian` on any optimizer); ``S`` (``r x r``, or a
length-``r`` diagonal) is Euclidean. The optimizer's update of ``U`` (``V``) is scaled by
``1 / sqrt(out / c)`` (``1 / sqrt(in / c)``), ``c`` = the model's hidden size, as in the official
code (``docs/stella.md``).

Initialization (``init=``), ``S = I`` in every case, ``W0`` never modified:

* ``"random"`` (default, the paper's): Haar-random orthonormal ``U``, ``V``.
* ``"svd_major"``: ``U``, ``V`` = the top-``r`` left/right singular vectors of ``W0``.
* ``"svd_minor"``: the bottom-``r`` singular vectors.

This is a **non-zero** initialization, as in the paper: at step 0 the layer computes
``W0 + (alpha/r) U V^T``, not ``W0`` (the paper found zero init (``S = 0``) slower because small
``S`` makes the gradients of ``U``, ``V`` small, and "pseudo-zero" init (subtracting the initial
adapter from ``W0``) worst). Choose ``alpha`` with that in mind: the added matrix has all ``r``
singular values equal to ``alpha / r``.

Also handles Hugging Face's ``Conv1D`` (GPT-2; weight stored ``in x out``).
"""
from __future__ import annotations

import json
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..geometry import random_stiefel
from ..riemannian import RiemannianHooks, make_riemannian

__all__ = [
    "StelLALinear",
    "inject_stella",
    "stella_modules",
    "stella_parameters",
    "stella_hidden_size",
    "make_stella_optimizer",
    "merge_stella",
    "unmerge_stella",
    "stella_state_dict",
    "load_stella_state_dict",
    "save_stella_adapters",
    "load_stella_adapters",
]

INITS = ("random", "svd_major", "svd_minor")


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), Tensor)


class StelLALinear(nn.Module):
    """A linear layer with a StelLA adapter: ``y = W0 x + b + (alpha/r) U S V^T x``.

    Args:
        base: the layer to adapt: ``nn.Linear`` (or Hugging Face ``Conv1D``); its parameters are
            frozen (``requires_grad = False``) and kept as ``self.base``.
        r: rank, ``1 <= r <= min(in_features, out_features)``.
        alpha: scale numerator (default ``r``, i.e. scale 1).
        s_diagonal: ``S`` is a length-``r`` vector (a diagonal matrix) instead of ``r x r``.
        init: ``"random"`` | ``"svd_major"`` | ``"svd_minor"`` (module docstring).
        generator: optional ``torch.Generator`` for ``"random"``.

    Parameters: ``U`` (``out x r``), ``V`` (``in x r``), ``S`` (``r x r``, or ``(r,)`` if
    ``s_diagonal``).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float | None = None, s_diagonal: bool = False,
                 init: str = "random", generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
            raise TypeError(f"StelLALinear adapts nn.Linear (or transformers Conv1D), got {type(base).__name__}")
        if init not in INITS:
            raise ValueError(f"StelLALinear: unknown init {init!r}; choose one of {INITS}")
        self.fan_in_fan_out = _is_conv1d(base)
        w = base.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else (w.shape[0], w.shape[1])
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= min(in_f, out_f):
            raise ValueError(f"StelLALinear: r must be an int in [1, min(in, out) = {min(in_f, out_f)}], got {r!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features, self.r = in_f, out_f, r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = self.alpha / r
        self.s_diagonal = bool(s_diagonal)
        self.init = init
        self.merged = False
        kw = dict(dtype=w.dtype, device=w.device)
        if init == "random":
            u = random_stiefel(out_f, r, generator=generator, **kw)
            v = random_stiefel(in_f, r, generator=generator, **kw)
        else:
            u_all, _, vh_all = torch.linalg.svd(self.base_weight().detach().to(torch.float64), full_matrices=False)
            sl = slice(0, r) if init == "svd_major" else slice(u_all.shape[1] - r, u_all.shape[1])
            u, v = u_all[:, sl].to(**kw).contiguous(), vh_all[sl, :].mT.to(**kw).contiguous()
        s = torch.ones(r, **kw) if self.s_diagonal else torch.eye(r, **kw)
        self.U = nn.Parameter(u)
        self.V = nn.Parameter(v)
        self.S = nn.Parameter(s)

    def base_weight(self) -> Tensor:
        """``W0`` as ``out x in`` (a view)."""
        return self.base.weight.mT if self.fan_in_fan_out else self.base.weight

    def delta_weight(self) -> Tensor:
        """``(alpha/r) U S V^T`` (``out x in``)."""
        s = torch.diag(self.S) if self.s_diagonal else self.S
        return self.scaling * (self.U @ s @ self.V.mT)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = x.to(self.V.dtype) @ self.V
        h = h * self.S if self.s_diagonal else h @ self.S.mT
        return y + (self.scaling * (h @ self.U.mT)).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into ``W0`` (forward then uses ``W0`` only). No-op if merged."""
        if not self.merged:
            self.base_weight().add_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from ``W0`` again (exact up to rounding). No-op if not merged."""
        if self.merged:
            self.base_weight().sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, s_diagonal={self.s_diagonal}, init={self.init!r}, merged={self.merged}")


def _matches(name: str, targets) -> bool:
    if callable(targets):
        return bool(targets(name))
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_stella(model: nn.Module, target_modules: Iterable[str] | Callable[[str], bool], r: int = 8,
                  alpha: float | None = None, *, s_diagonal: bool = False, init: str = "random",
                  freeze_others: bool = True, generator: torch.Generator | None = None) -> list[StelLALinear]:
    """Replace the matching linear layers of ``model`` (any ``nn.Module`` tree, Hugging Face
    models included) by :class:`StelLALinear` wrappers, in place.

    Args:
        target_modules: module names or name suffixes (``"q_proj"`` matches ``"...attn.q_proj"``,
            a full dotted name matches exactly), or a predicate on the module name. Matching
            modules must be ``nn.Linear`` / ``Conv1D``.
        r, alpha, s_diagonal, init, generator: passed to :class:`StelLALinear`.
        freeze_others: set ``requires_grad = False`` on every parameter that is not ``U``/``V``/``S``.
    Returns:
        the new :class:`StelLALinear` modules, in ``named_modules`` order.
    Raises:
        ValueError: if nothing matches or a match is not a linear layer.
    """
    if not callable(target_modules):
        target_modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    adapted = tuple(n + "." for n, _ in stella_modules(model))  # skip what is already adapted
    found = [(n, m) for n, m in model.named_modules()
             if n and _matches(n, target_modules) and not isinstance(m, StelLALinear)
             and not n.startswith(adapted)]
    if not found:
        raise ValueError(f"inject_stella: no module of {type(model).__name__} matches {target_modules!r}")
    for n, m in found:
        if not (isinstance(m, nn.Linear) or _is_conv1d(m)):
            raise ValueError(f"inject_stella: module {n!r} is a {type(m).__name__}, not nn.Linear/Conv1D")
    if freeze_others:
        for p in model.parameters():
            p.requires_grad_(False)
    out = []
    for n, m in found:
        parent_name, _, attr = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = StelLALinear(m, r, alpha, s_diagonal=s_diagonal, init=init, generator=generator)
        setattr(parent, attr, new)
        out.append(new)
    return out


def stella_modules(model: nn.Module) -> list[tuple[str, StelLALinear]]:
    """``(name, module)`` of every :class:`StelLALinear` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, StelLALinear)]


def stella_parameters(model: nn.Module) -> dict[str, list[Tensor]]:
    """``{"stiefel": [U, V, ...], "euclidean": [S, ...]}`` of all StelLA adapters of ``model``."""
    mods = [m for _, m in stella_modules(model)]
    return {"stiefel": [p for m in mods for p in (m.U, m.V)], "euclidean": [m.S for m in mods]}


def stella_hidden_size(model: nn.Module) -> int:
    """StelLA's gradient-scaling constant ``c`` of ``model``: its hidden size, read from
    ``model.config.hidden_size`` (Hugging Face configs; the official StelLA code reads
    ``config.hidden_size``) or else ``model.config.d_model`` (the recipe GPT's ``GPTConfig``,
    ``python/_gpt.py``).

    Raises:
        ValueError: if ``model`` has no such config entry (a positive int); pass ``c=`` to
            :func:`make_stella_optimizer` / :func:`~stiefel_kernels.riemannian.make_riemannian`
            then, or ``grad_scaling=False``.
    """
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model"):
        value = getattr(config, key, None) if config is not None else None
        if value is None and isinstance(config, dict):
            value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"stella_hidden_size: {type(model).__name__}.config.{key} = {value!r} is not a "
                                 "positive int; pass c= explicitly")
            return value
    raise ValueError(
        f"stella_hidden_size: cannot find the hidden size of {type(model).__name__} (no config.hidden_size "
        "or config.d_model); StelLA's gradient scaling needs it: pass c=<hidden size> (or grad_scaling=False)")


def make_stella_optimizer(model: nn.Module, optimizer_cls=torch.optim.AdamW, *, lr: float = 1e-3,
                          weight_decay: float = 0.0, grad_scaling: bool = True, c: float | None = None,
                          extra_params: Iterable[Tensor] = (), **kwargs) -> tuple[torch.optim.Optimizer, RiemannianHooks]:
    """An ``optimizer_cls`` over the StelLA parameters of ``model`` (plus ``extra_params``), made
    Riemannian on ``U``, ``V`` with :func:`~stiefel_kernels.riemannian.make_riemannian`.

    Groups: ``U``/``V`` without weight decay (the projection would remove it anyway), ``S`` and
    ``extra_params`` with ``weight_decay``. Returns ``(optimizer, hooks)``.

    Args:
        grad_scaling: StelLA's gradient scaling: the optimizer's update of a factor with long side
            ``m`` (``out_features`` for ``U``, ``in_features`` for ``V``) is divided by
            ``sqrt(m / c)`` (nothing where ``m == c``).
        c: the constant; default: the model's hidden size (:func:`stella_hidden_size`, an error
            if the model has no config giving it). Not allowed with ``grad_scaling=False``.
        lr, weight_decay, **kwargs: passed to ``optimizer_cls``.
    Raises:
        ValueError: no StelLA adapters; no hidden size found and no ``c``; a bad ``c``.
        TypeError: ``d=`` (removed: the official code's constant is the model's hidden size ``c``,
            not each layer's input dimension).
    """
    if "d" in kwargs:
        raise TypeError("make_stella_optimizer: d= was removed; StelLA's gradient scaling uses one constant c "
                        "(the model's hidden size, found from model.config by default): pass c=")
    ps = stella_parameters(model)
    if not ps["stiefel"]:
        raise ValueError("make_stella_optimizer: the model has no StelLA adapters (call inject_stella first)")
    if grad_scaling is True and c is None:
        c = stella_hidden_size(model)
    groups = [{"params": ps["stiefel"], "weight_decay": 0.0},
              {"params": ps["euclidean"] + list(extra_params), "weight_decay": weight_decay}]
    opt = optimizer_cls(groups, lr=lr, **kwargs)
    hooks = make_riemannian(opt, ps["stiefel"], grad_scaling=grad_scaling, c=c)
    return opt, hooks


def merge_stella(model: nn.Module) -> None:
    """:meth:`StelLALinear.merge` on every adapter."""
    for _, m in stella_modules(model):
        m.merge()


def unmerge_stella(model: nn.Module) -> None:
    """:meth:`StelLALinear.unmerge` on every adapter."""
    for _, m in stella_modules(model):
        m.unmerge()


def stella_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors only: ``{"<module>.U": ..., "<module>.V": ..., "<module>.S": ...}`` (detached clones)."""
    return {f"{n}.{k}": getattr(m, k).detach().clone().contiguous()
            for n, m in stella_modules(model) for k in ("U", "V", "S")}


def _config(model: nn.Module) -> dict[str, dict]:
    return {n: {"r": m.r, "alpha": m.alpha, "s_diagonal": m.s_diagonal,
                "in_features": m.in_features, "out_features": m.out_features} for n, m in stella_modules(model)}


@torch.no_grad()
def load_stella_state_dict(model: nn.Module, tensors: dict[str, Tensor], config: dict | None = None) -> None:
    """Copy adapter tensors into the :class:`StelLALinear` modules of ``model`` (already injected
    with the same layout). Merged adapters are unmerged, loaded and merged again.

    Raises:
        ValueError: on missing/unexpected keys, shape mismatches or a different ``r``/``alpha``
            in ``config``; nothing is changed then.
    """
    mods = dict(stella_modules(model))
    expected = {f"{n}.{k}" for n in mods for k in ("U", "V", "S")}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"load_stella_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, t in tensors.items():
        n, _, k = key.rpartition(".")
        if tuple(getattr(mods[n], k).shape) != tuple(t.shape):
            raise ValueError(f"load_stella_state_dict: {key} has shape {tuple(t.shape)}, the model "
                             f"{tuple(getattr(mods[n], k).shape)}")
    if config is not None:
        mine = _config(model)
        for n, c in config.items():
            if n in mine and (c["r"], float(c["alpha"]), bool(c["s_diagonal"])) != (
                    mine[n]["r"], mine[n]["alpha"], mine[n]["s_diagonal"]):
                raise ValueError(f"load_stella_state_dict: adapter {n!r} was saved with {c}, the model has {mine[n]}")
    for n, m in mods.items():
        was = m.merged
        m.unmerge()
        for k in ("U", "V", "S"):
            getattr(m, k).copy_(tensors[f"{n}.{k}"])
        if was:
            m.merge()


def save_stella_adapters(model: nn.Module, path: str) -> None:
    """Save the adapters (``U``, ``V``, ``S`` of every :class:`StelLALinear`) to a safetensors
    file; the per-adapter ``r``/``alpha``/``s_diagonal`` go into its metadata."""
    try:
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover
        raise ImportError("save_stella_adapters needs safetensors: pip install safetensors") from e
    save_file(stella_state_dict(model), path, metadata={"stella_config": json.dumps(_config(model))})


def load_stella_adapters(model: nn.Module, path: str) -> None:
    """Load adapters saved by :func:`save_stella_adapters` into ``model`` (inject the same
    adapters first: same target modules, ``r``, ``alpha``, ``s_diagonal``)."""
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover
        raise ImportError("load_stella_adapters needs safetensors: pip install safetensors") from e
    tensors = {}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    config = json.loads(meta["stella_config"]) if "stella_config" in meta else None
    load_stella_state_dict(model, tensors, config)
