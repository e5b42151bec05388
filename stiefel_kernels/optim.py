"""``StiefelAdamW``: AdamW whose Stiefel factors stay orthonormal (a ``torch.optim.Optimizer``).

Parameter groups with ``"stiefel": True`` hold factors kept orthonormal on their shorter side
(rows of a wide matrix such as LoRA's ``A``, columns of a tall one; a square one is orthogonal;
a tensor with more than two dims is a stack of such matrices over its last two dims). They
take Algorithm 1 of the Stiefel-AdamW talk with AdamW's moment semantics: ambient moments of
the Euclidean gradient, ``D = m_hat / (sqrt(v_hat) + eps)``, tangent projection, retraction.
No weight decay is applied to them (their norm is fixed).

All other groups are plain ``torch.optim.AdamW``: the step calls torch's own functional AdamW,
fused by default where torch has a fused kernel for the group (:func:`euclidean_fused`), else
foreach or the for-loop as torch picks or as asked, so they match ``torch.optim.AdamW`` with the
same ``foreach``/``fused`` bit for bit.

Every check of a step (hyper-parameters of every group, each factor's shape and backend, state
tensors that still fit their parameters, gradient shapes, first-step orthonormality) runs before
any group steps: an error leaves parameters, gradients and state exactly as they were.
``load_state_dict`` likewise checks the whole state dict before loading any of it.

Non-finite gradients behave as in ``torch.optim.AdamW``: nothing checks them; a NaN/Inf reaches
the moments and the parameter (for a Stiefel factor, the whole factor). Use
``torch.nn.utils.clip_grad_norm_`` / ``torch.amp.GradScaler`` to skip such steps.
"""
from __future__ import annotations

import math
import operator
import os
from itertools import repeat
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam

from . import backends, distributed
from .distributed import orthogonality_error  # plain tensors and DTensors
from .gram import canonical_retraction

__all__ = ["StiefelAdamW", "default_ortho_tol", "default_drift_tol", "euclidean_fused"]

#: every option of a group (the constructor's keyword arguments)
_OPTION_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "stiefel", "retraction",
                "cayley_iters", "ns_steps", "drift_tol", "ortho_tol", "backend", "foreach", "fused",
                "master_weights")

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")
_HALF = (torch.bfloat16, torch.float16)
_REQUIRED_STATE = ("step", "exp_avg", "exp_avg_sq")  # max_exp_avg_sq is created when missing


_shape = operator.attrgetter("shape")
_grad = operator.attrgetter("grad")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_is_sparse = operator.attrgetter("is_sparse")


class _Prepared(NamedTuple):
    """A group's step, as :meth:`StiefelAdamW._check_before_step` found it: the parameters with
    a gradient, their gradients, their states (``None``: some are created at this step) and,
    for a Stiefel group, the backend calls ``(backend, state dtype, indices or None for all)``."""

    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Any]] | None
    calls: list[tuple[str, torch.dtype, list[int] | None]] | None


def _factor_problem_of(kind: type, dtype: torch.dtype, shape: torch.Size) -> str | None:
    """Metadata checks of a dense Stiefel factor (:meth:`StiefelAdamW._factor_problem`)."""
    if not issubclass(kind, Tensor) or len(shape) < 2 or 0 in shape:
        return "shape"
    if dtype.is_complex or not dtype.is_floating_point:
        return "dtype"
    return None


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fusable(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW takes every one of ``params``: plain (non-DTensor) floating
    tensors on a device with fused kernels."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(issubclass(kind, Tensor) and not _is_dtensor_type(kind) and dev.type in devices
               and dtype in _FUSED_DTYPES
               for kind, dev, dtype in set(zip(map(type, params), map(_device, params),
                                               map(_dtype, params))))


def _on_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu"


def _fused_adamw_cpu(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                     exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor],
                     *, amsgrad: bool, beta1: float | Tensor, beta2: float | Tensor, lr: float | Tensor,
                     weight_decay: float, eps: float, maximize: bool) -> None:
    """torch's fused AdamW on CPU tensors (``torch.optim.adam``'s ``_fused_adam`` with
    decoupled weight decay and no gradient scaler: the same kernel on the same counters, so
    the same bits), except that the step counters advance through
    :func:`backends.advance_steps`: one add when they are consecutive elements of one buffer,
    as ``StiefelAdamW`` makes them, where torch's ``_foreach_add_`` adds them one by one on the
    CPU (~0.25 ms per step at GPT-2 QK's 144 ``W_K`` blocks)."""
    if not params:
        return
    beta1 = beta1.item() if isinstance(beta1, Tensor) else beta1
    beta2 = beta2.item() if isinstance(beta2, Tensor) else beta2
    if isinstance(lr, Tensor) and lr.device.type != "cpu":  # as torch moves it to the params'
        lr = lr.to("cpu")
    if len(set(map(_dtype, params))) == 1:  # one (device, dtype) group: no regrouping
        groups = [(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)]
    else:
        grouped = Optimizer._group_tensors_by_device_and_dtype(
            [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps])
        groups = [lists for lists, _ in grouped.values()]
    for ps, gs, ms, vs, maxs, steps in groups:
        backends.advance_steps(steps, values=False)
        torch._fused_adamw_(ps, gs, ms, vs, maxs, steps, amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, maximize=maximize, grad_scale=None,
                            found_inf=None)


def _share_step_buffer(pairs: Iterable[tuple[Tensor, dict[str, Any]]]) -> None:
    """The step counters of these ``(parameter, state)`` pairs become, per device and in order,
    the elements of one buffer, their values kept (each still a 0-dim tensor of its own in the
    state: a view). Only plain float32 0-dim counters on their parameter's device, as
    ``StiefelAdamW._init_state`` makes them (not DTensors); others are left as they are."""
    by_device: dict[torch.device, list[dict[str, Any]]] = {}
    for p, st in pairs:
        step = st.get("step")
        if (type(step) is Tensor and step.dim() == 0 and step.dtype == torch.float32
                and step.device == p.device):
            by_device.setdefault(p.device, []).append(st)
    for sts in by_device.values():
        if len(sts) > 1:
            buf = torch.stack([st["step"] for st in sts])
            for k, st in enumerate(sts):
                st["step"] = buf[k]


def _is_dtensor_type(kind: type) -> bool:
    return kind.__name__ == "DTensor"


def euclidean_fused(group: dict[str, Any], params: list[Tensor]) -> bool:
    """Whether a Euclidean group steps with torch's fused AdamW: as asked (``fused=True/False``),
    not when ``foreach`` is set (``True``, or ``False`` for the for-loop), else (the default,
    ``None`` for both) wherever torch
    has a fused kernel for every parameter (CPU and CUDA, floating dtypes, not DTensors).
    Fused AdamW is 3-5x faster than foreach on the CPU and one launch on a GPU; it equals the
    foreach/for-loop AdamW within rounding, not bit for bit (pass ``foreach=True`` for that)."""
    if group["fused"] is not None:
        return bool(group["fused"])
    if group["foreach"] is not None:  # foreach=True, or foreach=False (the for-loop) asked for
        return False
    return bool(params) and _fusable(params)


def default_ortho_tol(dtype: torch.dtype) -> float:
    """Largest ``||X^T X - I||_F`` accepted at a factor's first step, by dtype."""
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 5e-2)


def default_drift_tol(dtype: torch.dtype) -> float:
    """``||Y^T Y - I||_F`` of a step's output above which the step folds in its orthonormality
    correction, by the dtype the step computes in: 1e-10 for float64, 1e-6 otherwise. A
    bfloat16/float16 factor is stepped in float32 (float32 moments and Gram matrices), so it gets
    float32's value: its stored rounding (~1e-2) is then the only error left, and the correction
    costs nothing extra (the ``r x r`` work runs either way; no host sync)."""
    return 1e-10 if dtype == torch.float64 else 1e-6


def _check_nonneg_float(name: str, value: Any, sync: bool = True) -> None:
    """``sync=False`` (the per-step check): a one-element tensor on an accelerator is not read
    (that would synchronize with the device); it was checked when it was set through the API."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not sync and value.device.type != "cpu":
            return
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid {name}: {value!r} (expected a finite float >= 0)")


class StiefelAdamW(Optimizer):
    r"""AdamW with Stiefel-manifold factors (Stiefel-AdamW).

    Args:
        params: iterable of parameters, or of dicts defining parameter groups. A group with
            ``"stiefel": True`` holds Stiefel factors: real floating-point tensors ``(..., a, b)``
            with every dim ``>= 1`` (a zero-size factor is rejected here and by
            :meth:`add_param_group`; leave it out or put it in a Euclidean group).
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
        drift_tol: every step ends with an orthonormality correction: where the new point's
            ``||Y^T Y - I||_F`` (known from the Gram matrices) exceeds this, ``Y`` is replaced by
            its polar factor (folded into the ``r x r`` coefficients, no extra pass). ``None``: by
            the factor's dtype (:func:`default_drift_tol`).
        ortho_tol: largest orthogonality error accepted at a factor's first step (``None``: by
            dtype, :func:`default_ortho_tol`). A factor above it raises; call
            :func:`stiefel_kernels.orthonormalize_` first. Nothing re-orthonormalizes silently.
        backend: ``"auto"`` (``$STIEFEL_KERNELS_BACKEND`` if set, else triton on CUDA, torch
            otherwise), ``"reference"``, ``"torch"`` or ``"triton"``; per group.
        foreach, fused: passed to torch's AdamW for Euclidean groups. Default (both ``None``):
            fused where torch has a fused kernel for every parameter of the group (CPU, CUDA;
            floating dtypes; not DTensors), else torch's own default. Fused AdamW equals the
            foreach/for-loop AdamW within rounding: pass ``foreach=True`` (or ``False``) for
            those bit for bit.
        master_weights: Stiefel groups (ignored by Euclidean groups as a default; set in a
            Euclidean group's dict it raises). Each bfloat16/float16 factor gets a float32 copy in
            its state (``"master"``, made from the factor at its first step, saved and loaded
            with ``state_dict``, a DTensor sharded like the factor): the step retracts the
            copy, which stays orthonormal to float32 accuracy (<= 1e-5), and writes its
            rounding to the factor. Costs 4 bytes per element. Without it a half-precision
            factor is orthonormal only to its own rounding (~1e-2). Other factors of the group
            are stepped as usual.

    State per parameter (both kinds): ``step`` (float32 scalar tensor: on the parameter's device
    for Stiefel factors and fused Euclidean groups, else on the CPU, as torch), ``exp_avg``,
    ``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq`` (created, as zeros, when amsgrad is turned
    on later). For a bfloat16/float16 Stiefel factor the moments are float32.

    Errors: every check of :meth:`step` runs before any group steps, so a failing step changes
    nothing (no parameter, gradient, moment or step counter of any group). Checked at each step:
    every group's hyper-parameters (a negative ``lr`` from a scheduler or a ``"retraction"``
    edited in ``param_groups`` raise ``ValueError``); sparse gradients and gradients of another
    shape or device (``RuntimeError``); state tensors that no longer fit their parameter (its
    dtype, shape or device changed after its first step, e.g. ``model.double()``: ``ValueError``
    saying how to recast the state); for Stiefel factors, the backend's support of the factor
    (e.g. a float16 factor with ``backend="triton"``) and orthonormality at the first step. The
    messages name the parameter (``param group i, param j 'name' (shape ...)``). Only scalars and
    metadata are read; the first-step orthonormality check is the only host synchronization.

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
        master_weights: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, stiefel=stiefel, retraction=retraction, cayley_iters=cayley_iters,
            ns_steps=ns_steps, drift_tol=drift_tol, ortho_tol=ortho_tol, backend=backend,
            foreach=foreach, fused=fused, master_weights=master_weights,
        )
        self._validate_options(defaults, where="StiefelAdamW")
        self._retraction_failures: Tensor | None = None
        self._resolved_backends: dict[tuple, str] = {}
        # per-bucket buffers of a backend's per-step intermediates (its keeps_workspace), kept
        # from step to step; scratch, not state: not in state_dict, not pickled
        self._workspace: dict = {}
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["retraction_failures"] = self._retraction_failures  # telemetry survives a copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        failures = state.pop("retraction_failures", None)
        super().__setstate__(state)
        # torch.optim pickles only defaults/state/param_groups: restore the caches
        self.__dict__.setdefault("_resolved_backends", {})
        self.__dict__["_workspace"] = {}
        for group in self.param_groups:  # pickled before the option existed
            group.setdefault("master_weights", False)
        self._retraction_failures = failures

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate_options(group: dict[str, Any], where: str, sync: bool = True) -> None:
        """Check a group's (or the defaults') hyper-parameters; ``ValueError`` prefixed by ``where``.

        Scalars only, cheap enough for every step (``sync=False`` there: a one-element tensor
        on an accelerator is not read)."""
        missing = [k for k in _OPTION_KEYS if k not in group]
        if missing:
            raise ValueError(f"{where}: missing option(s) {missing}")
        _check_nonneg_float(f"{where}: lr", group["lr"], sync)
        _check_nonneg_float(f"{where}: eps", group["eps"], sync)
        _check_nonneg_float(f"{where}: weight_decay", group["weight_decay"], sync)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            if isinstance(b, Tensor):
                if b.numel() != 1:
                    raise ValueError(f"{where}: beta at index {i} must be a scalar, got shape {tuple(b.shape)}")
                if not sync and b.device.type != "cpu":
                    continue
                b = float(b)
            if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0.0 <= b < 1.0:
                raise ValueError(f"{where}: invalid beta parameter at index {i}: {b!r} (expected 0 <= beta < 1)")
        for key in ("cayley_iters", "ns_steps"):
            v = group[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {key} must be an int >= 1, got {v!r}")
        for key in ("drift_tol", "ortho_tol"):
            if group[key] is not None:
                _check_nonneg_float(f"{where}: {key}", group[key], sync)
        try:
            canonical_retraction(group["retraction"])
            name = group["backend"]
            if name != "auto":
                backends.get_backend(name)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        mw = group["master_weights"]
        if not isinstance(mw, bool):
            raise ValueError(f"{where}: master_weights must be True or False, got {mw!r}")
        if group["fused"] and group["stiefel"]:
            raise ValueError(f"{where}: fused=True applies to Euclidean groups only; a Stiefel group "
                             "uses its own backend (leave fused unset there)")

    @staticmethod
    def _check_tensor_options(group: dict[str, Any], where: str) -> None:
        """A Euclidean group runs torch's functional AdamW with ``capturable=False``, whose foreach
        path rejects a tensor ``lr``/``betas`` (after other groups would have stepped): refuse
        them here, where torch would take that path (``foreach=True``; tensor betas also with the
        default ``foreach=None`` on CUDA, where torch defaults to foreach)."""
        beta_tensor = any(isinstance(b, Tensor) for b in group["betas"])
        if not (beta_tensor or isinstance(group["lr"], Tensor)):
            return  # the usual case: no per-parameter look below, on every step
        if euclidean_fused(group, [p for p in group["params"] if isinstance(p, Tensor)]):
            return
        if group["foreach"] or (group["foreach"] is None and beta_tensor
                                and any(p.device.type == "cuda" for p in group["params"])):
            raise ValueError(f"{where}: a tensor lr or betas needs fused=True or foreach=False in a "
                             "Euclidean group (torch's foreach AdamW takes them only when capturable)")

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
        if not merged["stiefel"]:
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            self._check_tensor_options({**merged, "params": [t for t in tensors if isinstance(t, Tensor)]},
                                       where)
        if not merged["stiefel"] and param_group.get("master_weights"):
            raise ValueError(f"{where}: master_weights=True applies to Stiefel groups only (a "
                             "Euclidean group is torch's AdamW, which keeps no master copy; the "
                             "constructor's default is ignored there)")
        if merged["stiefel"]:
            wd = param_group.get("weight_decay", 0.0)
            if wd:
                raise ValueError(
                    f"{where}: weight_decay={wd} is not allowed on a Stiefel group (a factor on the "
                    "Stiefel manifold has fixed norm); remove it from this group's dict")
            for j, p in enumerate(params):
                item = p[1] if isinstance(p, tuple) else p
                problem = self._factor_problem(item)
                if problem is not None:
                    label = f"{where}, param {j}" + (f" ({p[0]!r})" if isinstance(p, tuple) else "")
                    raise problem[0](f"{label}: {problem[1]}")
        super().add_param_group(param_group)

    @staticmethod
    def _factor_problem(p: Any) -> tuple[type[Exception], str] | None:
        """Why ``p`` cannot be a Stiefel factor (metadata only), or ``None``: it must be a real
        floating-point, dense tensor ``(..., a, b)`` with every dim ``>= 1``."""
        if not isinstance(p, Tensor):
            return TypeError, f"expected a tensor, got {type(p).__name__}"
        if p.dim() < 2:
            return ValueError, (f"a Stiefel factor must be a matrix or a stack of matrices, got "
                                f"shape {tuple(p.shape)}; put 1-D parameters in a Euclidean group")
        if p.is_complex() or not p.is_floating_point():
            return ValueError, f"Stiefel factors must be real floating point, got {p.dtype}"
        if p.is_sparse:
            return ValueError, "sparse Stiefel factors are not supported"
        if 0 in p.shape:
            return ValueError, (f"a Stiefel factor needs every dim >= 1 (at least one 1 x 1 matrix), "
                                f"got the empty shape {tuple(p.shape)}; leave it out of the Stiefel "
                                "group (a Euclidean group accepts it)")
        return None

    # ------------------------------------------------------------------ state
    def _label(self, gi: int, j: int, p: Tensor) -> str:
        names = self.param_groups[gi].get("param_names")
        name = f" {names[j]!r}" if names else ""
        return f"param group {gi}, param {j}{name} (shape {tuple(p.shape)})"

    @staticmethod
    def _state_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
        return backends.state_dtype(p) if group["stiefel"] else p.dtype

    def _init_state(self, group: dict[str, Any], p: Tensor, fused: bool = False) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            # Stiefel groups keep the counter on the factor's device (their backends compute the
            # bias corrections there: no host sync, no copy, a capturable step); Euclidean groups
            # where torch's functional AdamW wants it (on the device only when fused)
            on_device = group["stiefel"] or fused
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                             else torch.tensor(0.0, dtype=torch.float32))
            dtype = self._state_dtype(group, p)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        return state

    def _check_state(self, gi: int, j: int, p: Tensor, state: dict[str, Any], stiefel: bool) -> None:
        """The state of a parameter that has stepped still fits it (metadata only)."""
        if not ("step" in state and "exp_avg" in state and "exp_avg_sq" in state):
            missing = [k for k in _REQUIRED_STATE if k not in state]
            raise ValueError(f"StiefelAdamW: the optimizer state of {self._label(gi, j, p)} lacks "
                             f"{missing}; restore it, or restart this parameter's moments with "
                             "del opt.state[p]")
        step = state["step"]
        if not isinstance(step, Tensor) or step.numel() != 1:
            raise ValueError(f"StiefelAdamW: the step counter of {self._label(gi, j, p)} must be a "
                             f"one-element tensor, got {step!r}")
        dtype, shape, device = p.dtype, p.shape, p.device
        want = backends.state_dtype(p) if stiefel else dtype
        for key in _STATE_KEYS:
            t = state.get(key)
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.dtype != want or t.shape != shape or t.device != device:
                got = (f"{t.dtype} of shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor)
                       else f"a {type(t).__name__}")
                raise ValueError(
                    f"StiefelAdamW: {self._label(gi, j, p)} is {p.dtype} on {p.device} but its "
                    f"optimizer state {key!r} is {got} (expected {want} of shape {tuple(p.shape)} "
                    f"on {p.device}): the parameter changed after its first step (e.g. "
                    "model.double(), .to(), p.data = ...). Change it back, or, for a new dtype or "
                    "device, cast the state with opt.load_state_dict(opt.state_dict()); "
                    "del opt.state[p] restarts its moments.")

    def _check_before_step(self) -> list[_Prepared]:
        """Every check of a step, before any state changes, so an error leaves everything as it was.
        Returns, per group, the parameters that step with their gradients and states.

        Per step: scalars and metadata only (memoized backend resolution); the orthonormality
        check of a factor's first step is the one host synchronization. A group whose
        parameters all have state is checked by :meth:`_prepare_fast` (whole tuples of shapes,
        dtypes, devices compared at once); the loop below, which names the culprit, runs for a
        group that has a first step or where the fast check finds something off."""
        for gi, group in enumerate(self.param_groups):
            where = f"StiefelAdamW param group {gi}"
            # a Stiefel group's step reads its scalars as floats anyway, so read them here too
            self._validate_options(group, where, sync=bool(group["stiefel"]))
            if not group["stiefel"]:
                self._check_tensor_options(group, where)
        prepared = [self._prepare_fast(group) for group in self.param_groups]
        for gi, group in enumerate(self.param_groups):
            if prepared[gi] is not None:
                continue
            stiefel = group["stiefel"]
            for j, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"StiefelAdamW does not support sparse gradients ({self._label(gi, j, p)})")
                if grad.shape != p.shape or grad.device != p.device:
                    raise RuntimeError(f"StiefelAdamW: gradient of shape {tuple(grad.shape)} on {grad.device} "
                                       f"for {self._label(gi, j, p)} on {p.device}")
                if not stiefel and grad.dtype != p.dtype:
                    raise RuntimeError(f"StiefelAdamW: gradient of dtype {grad.dtype} for "
                                       f"{self._label(gi, j, p)} of dtype {p.dtype}")
                state = self.state.get(p)
                if state:
                    self._check_state(gi, j, p, state, stiefel)
                if not stiefel:
                    continue
                problem = self._factor_problem(p)
                if problem is not None:
                    raise problem[0](f"StiefelAdamW: {self._label(gi, j, p)}: {problem[1]}")
                try:  # every step: the dtype/device may have changed since the first one
                    self._backend_name(group, p)
                except ValueError as exc:
                    raise ValueError(f"StiefelAdamW: {self._label(gi, j, p)}: {exc}") from None
                if state:
                    continue
                tol = group["ortho_tol"] if group["ortho_tol"] is not None else default_ortho_tol(p.dtype)
                err = float(orthogonality_error(p).max())  # first step only: one host sync
                if not err <= tol:
                    raise ValueError(
                        f"StiefelAdamW: {self._label(gi, j, p)} is in a Stiefel group but is not "
                        f"orthonormal on its shorter side (||X^T X - I||_F = {err:.3e} > {tol:.1e}). "
                        "Call stiefel_kernels.orthonormalize_(p) before the first step (for W = B A "
                        "keep the product: R = orthonormalize_(A); B.data = B @ R.mT), or pass a "
                        "larger ortho_tol.")
            params = [p for p in group["params"] if p.grad is not None]
            prepared[gi] = _Prepared(params, [p.grad for p in params], None, self._calls(group, params))
        return prepared

    def _calls(self, group: dict[str, Any], params: list[Tensor]) -> list[tuple[str, torch.dtype, list[int]]] | None:
        """A Stiefel group's backend calls: ``(backend, state dtype, indices into params)``, one
        per (backend, state dtype) so each call has one default drift_tol (a float32 factor
        steps the same whatever else is in its group). ``None`` for a Euclidean group."""
        if not group["stiefel"]:
            return None
        by_call: dict[tuple[str, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            by_call.setdefault((self._backend_name(group, p), backends.state_dtype(p)), []).append(i)
        return [(name, dtype, idx) for (name, dtype), idx in by_call.items()]

    def _prepare_fast(self, group: dict[str, Any]) -> _Prepared | None:
        """The checks of :meth:`_check_before_step` for a group whose parameters all have state,
        on whole tuples; ``None`` sends the group to the per-parameter checks (a first step,
        or anything that does not fit: those checks then say what)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return _Prepared([], [], [], [] if group["stiefel"] else None)
        states = list(map(self.state.get, params))
        if not all(states):
            return None
        grads = list(map(_grad, params))
        # C-level maps over whole tuples (a Python loop per factor costs ~1 ms per step at a
        # few hundred factors); a state that is not a dict makes dict.get raise TypeError
        try:
            shapes = tuple(map(_shape, params))
            devices = tuple(map(_device, params))
            dtypes = tuple(map(_dtype, params))
            if (tuple(map(_shape, grads)) != shapes or tuple(map(_device, grads)) != devices
                    or any(map(_is_sparse, grads))):
                return None
            stiefel = group["stiefel"]
            if stiefel:
                work_of = {dt: backends.state_dtype(dt) for dt in set(dtypes)}
                works = tuple(map(work_of.__getitem__, dtypes))
            else:
                if tuple(map(_dtype, grads)) != dtypes:
                    return None
                works = dtypes
            keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
            if stiefel and group.get("master_weights", False):
                if not set(dtypes) <= set(_HALF):
                    return None  # a group mixing half and other factors: the per-parameter loop
                keys.append("master")
            for extra in ("max_exp_avg_sq", "master"):
                if extra not in keys and any(map(operator.contains, states, repeat(extra))):
                    return None  # checked (it must still fit) by the per-parameter loop
            for key in keys:
                ts = list(map(dict.get, states, repeat(key)))
                if (tuple(map(_shape, ts)) != shapes or tuple(map(_dtype, ts)) != works
                        or tuple(map(_device, ts)) != devices):
                    return None
            steps = list(map(dict.get, states, repeat("step")))
            if set(map(Tensor.numel, steps)) != {1}:
                return None
        except (TypeError, AttributeError):  # a state entry that is not a tensor (or missing)
            return None
        if not stiefel:
            return _Prepared(params, grads, states, None)
        if any(map(_is_sparse, params)):
            return None
        env = os.environ.get(backends.ENV_VAR)
        calls: dict[tuple[str, torch.dtype], list[int]] = {}
        kinds = set(zip(map(type, params), devices, dtypes, shapes))
        names = {}
        for kind in kinds:
            if _factor_problem_of(kind[0], kind[2], kind[3]) is not None:
                return None
            key = (group["backend"], env) + kind
            name = self._resolved_backends.get(key)
            if name is None:
                return None  # resolved (and memoized) by the per-parameter loop
            names[kind] = name
        if len(kinds) == 1:
            (kind,) = kinds
            call_list = [(names[kind], backends.state_dtype(kind[2]), None)]
        else:
            call_of = {kind: (names[kind], backends.state_dtype(kind[2])) for kind in kinds}
            for i, call in enumerate(map(call_of.__getitem__, zip(map(type, params), devices, dtypes, shapes))):
                calls.setdefault(call, []).append(i)
            call_list = [(name, dtype, idx) for (name, dtype), idx in calls.items()]
        return _Prepared(params, grads, states, call_list)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prepared = self._check_before_step()
        self._orthogonality = []
        for group, prep in zip(self.param_groups, prepared):
            if group["stiefel"]:
                self._step_stiefel(group, prep)
            else:
                self._step_euclidean(group, prep)
        return loss

    def _states(self, group: dict[str, Any], prep: _Prepared, fused: bool = False) -> list[dict[str, Any]]:
        if prep.states is not None:
            return prep.states
        new = [p for p in prep.params if not self.state.get(p)]
        states = [self._init_state(group, p, fused) for p in prep.params]
        # made from the factor at its first step with it (Stiefel groups only: the constructor's
        # default does not apply to Euclidean groups)
        if group["stiefel"] and group.get("master_weights", False):
            for p, st in zip(prep.params, states):
                if p.dtype in _HALF and "master" not in st:
                    st["master"] = p.detach().to(torch.float32, copy=True)
        if (group["stiefel"] or fused) and len(new) == len(prep.params) > 1:
            # Tensors that start together get their step counters as the elements of one
            # buffer per device (in order): a backend (or _fused_adamw_cpu) then advances them
            # with one add, and a backend reads them without a stack (backends.advance_steps).
            # Each counter is still a 0-dim tensor of its own in the state (a view), saved and
            # loaded as usual (and shared again after a load: _pack_step_counters).
            _share_step_buffer(zip(prep.params, states))
        return states

    def _step_euclidean(self, group: dict[str, Any], prep: _Prepared) -> None:
        params, grads = prep.params, prep.grads
        if not params:
            return
        fused = euclidean_fused(group, params)
        states = self._states(group, prep, fused)
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        max_sqs = [st["max_exp_avg_sq"] for st in states] if group["amsgrad"] else []
        steps = [st["step"] for st in states]
        has_complex = any(map(torch.is_complex, params))
        beta1, beta2 = group["betas"]
        if fused and not has_complex and all(map(_on_cpu, params)):
            _fused_adamw_cpu(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, amsgrad=group["amsgrad"],
                             beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                             eps=group["eps"], maximize=group["maximize"])
            return
        _torch_adam(
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps,
            foreach=None if fused else group["foreach"], fused=fused, capturable=False,
            differentiable=False,
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

    def _step_stiefel(self, group: dict[str, Any], prep: _Prepared) -> None:
        if not prep.params:
            return
        all_states = self._states(group, prep)
        beta1, beta2 = group["betas"]
        for name, dtype, idx in prep.calls:
            if idx is None:
                params, grads, states = prep.params, prep.grads, all_states
            else:
                params = [prep.params[i] for i in idx]
                grads = [prep.grads[i] for i in idx]
                states = [all_states[i] for i in idx]
            dtol = group["drift_tol"] if group["drift_tol"] is not None else default_drift_tol(dtype)
            hp = backends.StiefelHyperparams(
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
                retraction=canonical_retraction(group["retraction"]),
                cayley_iters=group["cayley_iters"], ns_steps=group["ns_steps"], drift_tol=float(dtol))
            halves = None
            if group.get("master_weights", False):
                halves = [(p, st["master"]) for p, st in zip(params, states) if p.dtype in _HALF]
                params = [st["master"] if p.dtype in _HALF else p for p, st in zip(params, states)]
            # sharding (DTensor factors) is handled there, once, for every backend
            failures = distributed.backend_step(
                backends.get_backend(name), params, grads, [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None,
                [s["step"] for s in states], hp, telemetry=self._orthogonality,
                workspace=self._workspace)
            if halves:  # the factors take their master copy's rounding (shard by shard: DTensors
                # have no _foreach_copy_, and a master is sharded like its factor)
                local = distributed.local_tensor
                torch._foreach_copy_([local(p) for p, _ in halves], [local(m) for _, m in halves])
            if failures is not None:  # stays on the device: read only by retraction_failures
                self._retraction_failures = (failures if self._retraction_failures is None
                                             else self._retraction_failures + failures)

    def orthogonality_error(self) -> Tensor | None:
        """Largest ``||X^T X - I||_F`` over the Stiefel factors that stepped at the last step, of
        the points that step started from (read off the Gram matrix ``K = X^T X`` the step
        computes anyway, before its orthonormality correction: a factor drifting from one step to
        the next shows here). A 0-dim float32 tensor on the factors' device, so a training loop
        can log it without a host sync in ``step``; ``None`` before the first step or when no
        backend reported (a step inside ``torch.compile``d code). Under FSDP2 a factor sharded
        along its long side reports its whole ``K`` (all-reduced) on every rank; a stack sharded
        over its stack dims reports on each rank the matrices that rank holds, so for one global
        number all-reduce the result with ``MAX``."""
        errs = getattr(self, "_orthogonality", None)
        if not errs:
            return None
        device = errs[0].device
        return torch.stack([e.to(device) for e in errs]).amax()

    def retraction_failure_count(self) -> Tensor | None:
        """:attr:`retraction_failures` as a tensor on the device (no sync), or ``None`` before
        any backend counted."""
        return self._retraction_failures

    @property
    def retraction_failures(self) -> int:
        """Number of ``r x r`` factorizations that failed in the retractions so far (reading it
        synchronizes with the device; the step itself never does)."""
        return 0 if self._retraction_failures is None else int(self._retraction_failures)

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, checking all of it first; on error nothing changes.

        Checked: same number of groups and of params per group, same Stiefel flags, each saved
        group's hyper-parameters (as the constructor checks them; options missing from an older
        state dict take this optimizer's defaults), and for each parameter with state: ``step``,
        ``exp_avg`` and ``exp_avg_sq`` present (``max_exp_avg_sq`` of an amsgrad group is
        created at the next step when missing), a finite ``step >= 0`` (a number is turned into
        a tensor, as torch's Adam does), floating-point moments of the parameter's shape.

        Moments are cast to the parameter's dtype and device (as torch's loader does), except
        those of half-precision Stiefel factors, kept in float32."""
        where = "StiefelAdamW.load_state_dict"
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{where}: the state dict has {len(saved_groups)} "
                             f"param groups, this optimizer {len(self.param_groups)}")
        id_map: dict[Any, tuple[int, int, Tensor]] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}: param group {gi} has "
                                 f"{len(saved['params'])} params in the state dict, {len(group['params'])} here")
            if bool(saved.get("stiefel", False)) != bool(group["stiefel"]):
                raise ValueError(f"{where}: param group {gi} is "
                                 f"{'Stiefel' if group['stiefel'] else 'Euclidean'} here but not in the state dict")
            self._validate_options({**self.defaults, **saved}, f"{where}: param group {gi}")
            for j, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                id_map[pid] = (gi, j, p)
        keep_fp32: list[tuple[Tensor, str, Tensor]] = []
        steps: dict[Any, Tensor] = {}
        for pid, st in state_dict["state"].items():
            if pid not in id_map:
                continue
            gi, j, p = id_map[pid]
            label = self._label(gi, j, p)
            if not isinstance(st, dict):
                raise ValueError(f"{where}: the state of {label} must be a dict, got {type(st).__name__}")
            if not st:
                continue
            missing = [k for k in _REQUIRED_STATE if k not in st]
            if missing:
                raise ValueError(f"{where}: the state of {label} lacks {missing} (every parameter "
                                 "with state needs step, exp_avg and exp_avg_sq)")
            step = st["step"]
            if isinstance(step, Tensor):
                value = float(step) if step.numel() == 1 else None
            elif isinstance(step, (int, float)) and not isinstance(step, bool):
                value = float(step)
                steps[pid] = torch.tensor(value, dtype=torch.float32)
            else:
                value = None
            if value is None or not math.isfinite(value) or value < 0:
                raise ValueError(f"{where}: the step counter of {label} must be a finite number "
                                 f">= 0 or a one-element tensor holding one, got {step!r}")
            for key in _STATE_KEYS:
                if key not in st:
                    continue
                t = st[key]
                if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
                    raise ValueError(f"{where}: state {key!r} of {label} must be a floating-point "
                                     f"tensor, got {t.dtype if isinstance(t, Tensor) else type(t).__name__}")
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{where}: state {key!r} of {label} has "
                        f"shape {tuple(t.shape)}; the state dict was saved for other shapes")
                if self.param_groups[gi]["stiefel"] and backends.state_dtype(p) != p.dtype:
                    keep_fp32.append((p, key, t))
        if steps:  # number steps become tensors; the caller's dict is left as it is
            state_dict = {**state_dict, "state": {
                pid: ({**st, "step": steps[pid]} if pid in steps else st)
                for pid, st in state_dict["state"].items()}}
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # options an older state dict lacks: this optimizer's defaults
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for p, key, value in keep_fp32:
            self.state[p][key] = value.to(dtype=backends.state_dtype(p), device=p.device, copy=True)
        for group in self.param_groups:  # Stiefel step counters live on their factor's device
            if group["stiefel"]:
                for p in group["params"]:
                    st = self.state.get(p)
                    if st and isinstance(st.get("step"), Tensor) and st["step"].device != p.device:
                        st["step"] = st["step"].to(p.device)
        self._pack_step_counters()

    def _pack_step_counters(self) -> None:
        """After a load: the step counters of each Stiefel group and each fused Euclidean group
        become, per device, the elements of one buffer again, as at a first step (loaded, they
        are tensors of their own), so that a resumed run still advances them with one add (see
        :meth:`_states`); the values are kept. Counters of another shape, dtype or device than
        :meth:`_init_state` makes are left as they are."""
        for group in self.param_groups:
            params = [p for p in group["params"] if self.state.get(p)]
            if len(params) > 1 and (group["stiefel"] or euclidean_fused(group, params)):
                _share_step_buffer((p, self.state[p]) for p in params)
