"""``StiefelAdamW``: AdamW whose Stiefel factors stay orthonormal (a ``torch.optim.Optimizer``).

Parameter groups with ``"stiefel": True`` hold factors kept orthonormal on their shorter side
(rows of a wide matrix such as LoRA's ``A``, columns of a tall one; a square one is orthogonal;
a tensor with more than two dims is a stack of such matrices over its last two dims). They
take Algorithm 1 of the Stiefel-AdamW talk with AdamW's moment semantics: ambient moments of
the Euclidean gradient, ``D = m_hat / (sqrt(v_hat) + eps)``, tangent projection, retraction.
No weight decay is applied to them (their norm is fixed).

All other groups are plain ``torch.optim.AdamW``: the step calls torch's own functional AdamW
(foreach or fused as torch picks or as asked), so they match it bit for bit.

Non-finite gradients behave as in ``torch.optim.AdamW``: nothing checks them; a NaN/Inf reaches
the moments and the parameter (for a Stiefel factor, the whole factor). Use
``torch.nn.utils.clip_grad_norm_`` / ``torch.amp.GradScaler`` to skip such steps.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam

from . import backends
from .distributed import orthogonality_error  # plain tensors and DTensors
from .gram import canonical_retraction

__all__ = ["StiefelAdamW", "default_ortho_tol", "default_drift_tol"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def default_ortho_tol(dtype: torch.dtype) -> float:
    """Largest ``||X^T X - I||_F`` accepted at a factor's first step, by dtype."""
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 5e-2)


def default_drift_tol(dtype: torch.dtype) -> float:
    """``||X^T X - I||_F`` above which Cayley steps fold in a polar correction, by dtype."""
    return {torch.float64: 1e-10, torch.float32: 1e-6}.get(dtype, 1e-3)


def _check_nonneg_float(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid {name}: {value!r} (expected a finite float >= 0)")


class StiefelAdamW(Optimizer):
    r"""AdamW with Stiefel-manifold factors (Stiefel-AdamW).

    Args:
        params: iterable of parameters, or of dicts defining parameter groups. A group with
            ``"stiefel": True`` holds Stiefel factors (each ``(..., a, b)`` with ``a, b >= 1``).
        lr: learning rate (float >= 0). Default 1e-3.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``. Default (0.9, 0.999).
        eps: term added after the square root, >= 0. Default 1e-8.
        weight_decay: decoupled weight decay of Euclidean groups (AdamW). Stiefel groups apply
            none; passing a nonzero ``weight_decay`` in a Stiefel group's own dict is an error.
        amsgrad: keep the running maximum of the second moment (the regret theorem assumes it).
        maximize: maximize the objective.
        stiefel: default of the per-group ``"stiefel"`` flag (False).
        retraction: ``"cayley_fp"`` (default), ``"cayley"`` (exact; ``"cayley_smw"`` and
            ``"cayley_direct"`` accepted), ``"qr"``, ``"polar"``, ``"newton_schulz"``.
        cayley_iters: fixed-point iterations of ``cayley_fp`` (default 2).
        ns_steps: Newton–Schulz iterations of ``newton_schulz`` (default 6).
        drift_tol: Cayley retractions preserve ``X^T X``; when ``||X^T X - I||_F`` exceeds this,
            the step folds in a polar correction. ``None``: by dtype (:func:`default_drift_tol`).
        ortho_tol: largest orthogonality error accepted at a factor's first step (``None``: by
            dtype, :func:`default_ortho_tol`). A factor above it raises; call
            :func:`stiefel_kernels.orthonormalize_` first. Nothing re-orthonormalizes silently.
        backend: ``"auto"`` (``$STIEFEL_KERNELS_BACKEND`` if set, else triton on CUDA, torch
            otherwise), ``"reference"``, ``"torch"`` or ``"triton"``; per group.
        foreach, fused: passed to torch's AdamW for Euclidean groups.

    State per parameter (both kinds): ``step`` (CPU float32 scalar tensor, as torch), ``exp_avg``,
    ``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq``. For a bfloat16/float16 Stiefel factor
    the moments are float32.

    Example::

        opt = StiefelAdamW([
            {"params": [lora_A], "stiefel": True},   # r x n, orthonormal rows
            {"params": [lora_B]},                    # plain AdamW
        ], lr=1e-3, weight_decay=0.01, retraction="cayley_fp")
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        stiefel: bool = False,
        retraction: str = "cayley_fp",
        cayley_iters: int = 2,
        ns_steps: int = 6,
        drift_tol: float | None = None,
        ortho_tol: float | None = None,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, stiefel=stiefel, retraction=retraction, cayley_iters=cayley_iters,
            ns_steps=ns_steps, drift_tol=drift_tol, ortho_tol=ortho_tol, backend=backend,
            foreach=foreach, fused=fused,
        )
        self._validate_options(defaults, where="StiefelAdamW")
        self._retraction_failures: Tensor | None = None
        self._resolved_backends: dict[tuple, str] = {}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch.optim pickles only defaults/state/param_groups: restore the caches
        self.__dict__.setdefault("_resolved_backends", {})
        self.__dict__.setdefault("_retraction_failures", None)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate_options(group: dict[str, Any], where: str) -> None:
        _check_nonneg_float(f"{where}: lr", group["lr"])
        _check_nonneg_float(f"{where}: eps", group["eps"])
        _check_nonneg_float(f"{where}: weight_decay", group["weight_decay"])
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            b = float(b) if isinstance(b, Tensor) else b
            if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
                raise ValueError(f"{where}: invalid beta parameter at index {i}: {b!r} (expected 0 <= beta < 1)")
        for key in ("cayley_iters", "ns_steps"):
            v = group[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {key} must be an int >= 1, got {v!r}")
        for key in ("drift_tol", "ortho_tol"):
            if group[key] is not None:
                _check_nonneg_float(f"{where}: {key}", group[key])
        canonical_retraction(group["retraction"])
        name = group["backend"]
        if name != "auto":
            backends.get_backend(name)
        if group["fused"] and group["stiefel"]:
            raise ValueError(f"{where}: fused=True applies to Euclidean groups only; a Stiefel group "
                             "uses its own backend (leave fused unset there)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating it first; on error nothing is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        merged = {**self.defaults, **param_group}
        gi = len(self.param_groups)
        where = f"StiefelAdamW param group {gi}"
        self._validate_options(merged, where)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if merged["stiefel"]:
            wd = param_group.get("weight_decay", 0.0)
            if wd:
                raise ValueError(
                    f"{where}: weight_decay={wd} is not allowed on a Stiefel group (a factor on the "
                    "Stiefel manifold has fixed norm); remove it from this group's dict")
            for j, p in enumerate(params):
                item = p[1] if isinstance(p, tuple) else p
                label = f"{where}, param {j}" + (f" ({p[0]!r})" if isinstance(p, tuple) else "")
                if not isinstance(item, Tensor):
                    raise TypeError(f"{label}: expected a tensor, got {type(item).__name__}")
                if item.dim() < 2:
                    raise ValueError(f"{label}: a Stiefel factor must be a matrix or a stack of "
                                     f"matrices, got shape {tuple(item.shape)}; put 1-D parameters in "
                                     "a Euclidean group")
                if item.is_complex() or not item.is_floating_point():
                    raise ValueError(f"{label}: Stiefel factors must be real floating point, got {item.dtype}")
                if item.is_sparse:
                    raise ValueError(f"{label}: sparse Stiefel factors are not supported")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ state
    def _label(self, gi: int, j: int, p: Tensor) -> str:
        names = self.param_groups[gi].get("param_names")
        name = f" {names[j]!r}" if names else ""
        return f"param group {gi}, param {j}{name} (shape {tuple(p.shape)})"

    @staticmethod
    def _state_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
        return backends.state_dtype(p) if group["stiefel"] else p.dtype

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            on_device = group["fused"] and not group["stiefel"]
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                             else torch.tensor(0.0, dtype=torch.float32))
            dtype = self._state_dtype(group, p)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        return state

    def _check_before_step(self) -> None:
        """Every check of a step, before any state changes, so an error leaves everything as it was."""
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"StiefelAdamW does not support sparse gradients ({self._label(gi, j, p)})")
                if not group["stiefel"] or self.state.get(p):
                    continue
                if p.grad.shape != p.shape:
                    raise RuntimeError(f"StiefelAdamW: gradient of shape {tuple(p.grad.shape)} for "
                                       f"{self._label(gi, j, p)}")
                backends.resolve_backend(group["backend"], p)
                tol = group["ortho_tol"] if group["ortho_tol"] is not None else default_ortho_tol(p.dtype)
                err = float(orthogonality_error(p).max())  # first step only: one host sync
                if not err <= tol:
                    raise ValueError(
                        f"StiefelAdamW: {self._label(gi, j, p)} is in a Stiefel group but is not "
                        f"orthonormal on its shorter side (||X^T X - I||_F = {err:.3e} > {tol:.1e}). "
                        "Call stiefel_kernels.orthonormalize_(p) before the first step (for W = B A "
                        "keep the product: R = orthonormalize_(A); B.data = B @ R.mT), or pass a "
                        "larger ortho_tol.")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_before_step()
        for group in self.param_groups:
            if group["stiefel"]:
                self._step_stiefel(group)
            else:
                self._step_euclidean(group)
        return loss

    def _step_euclidean(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            state = self._init_state(group, p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        _torch_adam(
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps,
            foreach=group["foreach"], fused=group["fused"], capturable=False, differentiable=False,
            grad_scale=None, found_inf=None, has_complex=has_complex, decoupled_weight_decay=True,
            amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        )

    def _backend_name(self, group: dict[str, Any], p: Tensor) -> str:
        """The backend stepping ``p``, memoized per (setting, environment, kind of tensor) so a
        step with hundreds of factors does not re-resolve each one."""
        key = (group["backend"], os.environ.get(backends.ENV_VAR), type(p), p.device, p.dtype, p.shape)
        name = self._resolved_backends.get(key)
        if name is None:
            name = self._resolved_backends[key] = backends.resolve_backend(group["backend"], p).name
        return name

    def _step_stiefel(self, group: dict[str, Any]) -> None:
        by_backend: dict[str, list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is not None:
                by_backend.setdefault(self._backend_name(group, p), []).append(p)
        beta1, beta2 = group["betas"]
        for name, params in by_backend.items():
            states = [self._init_state(group, p) for p in params]
            dtol = group["drift_tol"] if group["drift_tol"] is not None else default_drift_tol(
                backends.state_dtype(params[0]))
            hp = backends.StiefelHyperparams(
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
                retraction=canonical_retraction(group["retraction"]),
                cayley_iters=group["cayley_iters"], ns_steps=group["ns_steps"], drift_tol=float(dtol))
            failures = backends.get_backend(name).step(
                params, [p.grad for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None,
                [s["step"] for s in states], hp)
            if failures is not None:  # stays on the device: read only by retraction_failures
                self._retraction_failures = (failures if self._retraction_failures is None
                                             else self._retraction_failures + failures)

    @property
    def retraction_failures(self) -> int:
        """Number of ``r x r`` factorizations that failed in the retractions so far (reading it
        synchronizes with the device; the step itself never does)."""
        return 0 if self._retraction_failures is None else int(self._retraction_failures)

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, checking first that it fits these parameters (same group sizes,
        same Stiefel flags, state tensors of the parameters' shapes); on error nothing changes.

        Moments of half-precision Stiefel factors are kept in float32 (torch's loader would cast
        them to the parameter dtype)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"StiefelAdamW.load_state_dict: the state dict has {len(saved_groups)} "
                             f"param groups, this optimizer {len(self.param_groups)}")
        id_map: dict[Any, tuple[int, int, Tensor]] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"StiefelAdamW.load_state_dict: param group {gi} has "
                                 f"{len(saved['params'])} params in the state dict, {len(group['params'])} here")
            if bool(saved.get("stiefel", False)) != bool(group["stiefel"]):
                raise ValueError(f"StiefelAdamW.load_state_dict: param group {gi} is "
                                 f"{'Stiefel' if group['stiefel'] else 'Euclidean'} here but not in the state dict")
            for j, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                id_map[pid] = (gi, j, p)
        keep_fp32: list[tuple[Tensor, str, Tensor]] = []
        for pid, st in state_dict["state"].items():
            if pid not in id_map:
                continue
            gi, j, p = id_map[pid]
            for key in _STATE_KEYS:
                if key in st and tuple(st[key].shape) != tuple(p.shape):
                    raise ValueError(
                        f"StiefelAdamW.load_state_dict: state {key!r} of {self._label(gi, j, p)} has "
                        f"shape {tuple(st[key].shape)}; the state dict was saved for other shapes")
                if key in st and self.param_groups[gi]["stiefel"]:
                    dtype = backends.state_dtype(p)
                    if dtype != p.dtype:
                        keep_fp32.append((p, key, st[key]))
        super().load_state_dict(state_dict)
        for p, key, value in keep_fp32:
            self.state[p][key] = value.to(dtype=backends.state_dtype(p), device=p.device, copy=True)
