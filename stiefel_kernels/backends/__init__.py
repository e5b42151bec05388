"""Backends of the Stiefel-AdamW step: one contract, several implementations.

A backend is a module-level object with

* ``name``: the string users pass as ``backend=`` (or ``STIEFEL_KERNELS_BACKEND``);
* ``unsupported_reason(param) -> str | None``: why it cannot step this parameter (device,
  dtype, ...) or ``None`` when it can;
* ``step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp) -> Tensor | None``:
  one Stiefel-AdamW step over a list of Stiefel factors of one parameter group, in place
  (parameters, moments, step counters), returning an optional int32 device tensor counting
  failed ``r x r`` factorizations (never read on the host inside the step). The lists hold
  plain tensors: DTensors never reach a backend (see "Sharded factors" below).

Optional attributes (:class:`FunctionBackend` fields):

* ``reports_telemetry``: ``step`` takes ``telemetry=``, a list to which it appends the largest
  ``||X^T X - I||_F`` of its input factors (0-dim device tensors);
* ``steps_local_shards``: ``step`` takes ``sharding=`` (a :class:`ShardGroup`) and can step the
  local shards of factors sharded along their long side.

Sharded factors (FSDP2) are handled once, above the backends, by
:func:`stiefel_kernels.distributed.backend_step` (which ``StiefelAdamW`` calls): it reads each
factor's placement and, per bucket of same-shape factors laid out alike, either calls a backend
with ``steps_local_shards`` on the plain local shards with ``sharding=`` (the global orientation,
and the hook that sums a bucket's Gram matrices over the shard group: one all-reduce between
the two passes), or gathers the factors (``full_tensor()``), calls ``step`` on the full
tensors and keeps each rank's slice (any other layout, or a backend without local-shard
support; it warns once per layout).

Every backend must give :mod:`.reference`'s result within the tolerance policy of
``tests/README.md``. Adding one is local: write the module, call :func:`register_backend`,
and say in :func:`auto_backend` when it is the default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

__all__ = ["StiefelHyperparams", "Backend", "ShardGroup", "FunctionBackend", "register_backend", "get_backend",
           "available_backends", "auto_backend", "resolve_backend", "ENV_VAR"]

ENV_VAR = "STIEFEL_KERNELS_BACKEND"


@dataclass(frozen=True)
class StiefelHyperparams:
    """Hyper-parameters of one Stiefel group's step (``retraction`` is canonical)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    maximize: bool
    retraction: str
    cayley_iters: int
    ns_steps: int
    drift_tol: float


class ShardGroup(Protocol):
    """What a backend with ``steps_local_shards`` is told about one bucket of local shards (all
    of one global shape, sharded alike along the long side: the sums ``K, G, H`` of pass 1 are
    partial on each rank). :class:`stiefel_kernels.distributed._Layout` implements it."""

    #: orientation of the *global* factor (a shard's own shape may look the other way)
    row_orthonormal: bool

    def reduce(self, t: Tensor) -> Tensor:
        """Sum the contiguous ``t`` in place over the ranks holding the other pieces of the long
        side (every rank calls it, empty shards included); returns ``t``."""
        ...

    def reduce_grams(self, k: Tensor, g: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(K, G, H)`` summed over the shard group in one all-reduce (stacked)."""
        ...


class Backend(Protocol):
    name: str

    def unsupported_reason(self, param: Tensor) -> str | None: ...

    def step(self, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
             exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None,
             state_steps: list[Tensor], hp: StiefelHyperparams) -> Tensor | None: ...


@dataclass(frozen=True)
class FunctionBackend:
    """A :class:`Backend` made of a module's two functions (how the built-in ones are written)."""

    name: str
    unsupported_reason: Callable[[Tensor], "str | None"]
    step: Callable[..., "Tensor | None"]
    #: ``step`` takes ``telemetry=`` (a list it appends the orthogonality errors of its input to)
    reports_telemetry: bool = False
    #: ``step`` takes ``sharding=`` (a :class:`ShardGroup`): it steps local shards of factors
    #: sharded along their long side, calling ``sharding.reduce`` between its passes
    steps_local_shards: bool = False
    #: ``step`` takes ``workspace=`` (a dict the caller keeps from step to step, in which the
    #: backend keeps per-bucket buffers for its per-step intermediates instead of allocating them)
    keeps_workspace: bool = False


_REGISTRY: dict[str, Backend] = {}
_LAZY: dict[str, Callable[[], Backend]] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` selectable by its name."""
    _REGISTRY[backend.name] = backend
    return backend


def _register_lazy(name: str, loader: Callable[[], Backend]) -> None:
    _LAZY[name] = loader


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` besides ``"auto"``."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or a backend whose
            dependencies are missing (the message says which).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _LAZY:
        try:
            return register_backend(_LAZY[name]())
        except ImportError as exc:
            raise ValueError(f"backend {name!r} is not usable here: {exc}") from exc
    raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {available_backends()}")


#: messages of the Triton load failures :func:`auto_backend` has warned about (each warns once)
_TRITON_LOAD_WARNED: set[str] = set()


def auto_backend(param: Tensor) -> Backend:
    """The default backend for a parameter: ``triton`` on CUDA when importable and able to step
    it, else ``torch`` (a DTensor is judged by its global shape, dtype and device).

    Loading the triton backend on CUDA:

    * triton not installed (``ModuleNotFoundError`` for ``triton`` itself): ``torch``, silently;
    * a bad value of one of this package's environment variables (``STIEFEL_KERNELS_TRITON_DOT``):
      ``ValueError``; the user set it on purpose, so it is not ignored;
    * any other import error (a broken or incompatible triton): ``torch``, with one warning per
      distinct error.

    Raises:
        ValueError: for a bad ``STIEFEL_KERNELS_*`` value met while loading the triton backend.
    """
    if param.device.type == "cuda" and "triton" in _LAZY:
        try:
            backend = get_backend("triton")
        except ValueError as exc:
            cause = exc.__cause__
            missing = isinstance(cause, ModuleNotFoundError) and cause.name == "triton"
            if not missing:
                if "STIEFEL_KERNELS_" in str(cause):
                    raise
                if str(exc) not in _TRITON_LOAD_WARNED:
                    _TRITON_LOAD_WARNED.add(str(exc))
                    import warnings

                    warnings.warn(f"{exc}; CUDA parameters fall back to the torch backend",
                                  RuntimeWarning, stacklevel=2)
        else:
            if backend.unsupported_reason(param) is None:
                return backend
    return get_backend("torch")


def resolve_backend(name: str | None, param: Tensor) -> Backend:
    """Pick the backend for ``param``: an explicit ``name`` wins, then ``$STIEFEL_KERNELS_BACKEND``,
    then :func:`auto_backend`. A backend that cannot handle ``param`` raises ``ValueError``."""
    name = name or "auto"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    backend = auto_backend(param) if name == "auto" else get_backend(name)
    reason = backend.unsupported_reason(param)
    if reason is not None:
        raise ValueError(f"backend {backend.name!r} cannot step this parameter: {reason}")
    return backend


# Moments of a Stiefel factor are kept in its working dtype: float32 for half-precision
# parameters, else the parameter's dtype (the package's one rule, :mod:`stiefel_kernels._buckets`).
from .._buckets import working_dtype as state_dtype  # noqa: E402


def bias_corrections(state_steps: list[Tensor], beta1: float, beta2: float) -> tuple[list[float], list[float]]:
    """``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` per factor as Python floats (reads every
    counter: a host sync for counters on a GPU; the reference backend's literal form)."""
    steps = [float(s) for s in state_steps]
    return [1.0 - beta1 ** t for t in steps], [(1.0 - beta2 ** t) ** 0.5 for t in steps]


_REPEAT_INDEX: dict = {}


def gram_orthogonality_error(k: Tensor, scratch: Tensor | None = None) -> Tensor | None:
    """Largest ``||K - I||_F`` over a batch of Gram matrices ``K = X^T X`` (``(..., r, r)``): the
    orthogonality error of the points a step starts from, read off the ``K`` the step computes
    anyway (a 0-dim device tensor, no sync); ``None`` for an empty batch. ``scratch``: a tensor
    of ``k``'s shape and dtype for ``K - I`` (a caller's buffer), else one is allocated."""
    if k.numel() == 0:
        return None
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    diff = k - eye if scratch is None else torch.sub(k, eye, out=scratch)
    return torch.linalg.matrix_norm(diff).amax().float()


def advance_steps(state_steps: list[Tensor], values: bool = True) -> Tensor | None:
    """Add one to every step counter; returns the counters as one ``(F,)`` tensor (``None``
    with ``values=False``: the adds only).

    Counters that are, in order, consecutive elements of one 1-D buffer (``StiefelAdamW``
    creates the counters of tensors that start together so; a bucket of them is a slice) take
    one in-place add on that slice, which is also the result (on the CPU, scattered elements of
    one buffer take one indexed add and a gather); any others take ``torch._foreach_add_`` and
    a ``stack`` (a loop of ``F`` adds on the CPU, two launches on a GPU)."""
    base = state_steps[0]._base
    if (base is not None and not torch.compiler.is_compiling() and base.dim() == 1
            and base.is_contiguous() and all(s._base is base for s in state_steps)):
        # a run of consecutive elements (a bucket of factors that started together is a slice
        # of their group's buffer)
        first = state_steps[0].storage_offset() - base.storage_offset()
        run = base[first:first + len(state_steps)]
        offsets = tuple(map(Tensor.storage_offset, state_steps))
        if (run.numel() == len(state_steps)
                and offsets == tuple(range(run.storage_offset(), run.storage_offset() + len(state_steps)))):
            run.add_(1)
            return run if values else None
        if base.device.type == "cpu":  # scattered over the buffer (buckets of interleaved
            # shapes): one indexed add and one gather instead of F adds and a stack
            index = torch.tensor(offsets, dtype=torch.long) - base.storage_offset()
            base.index_add_(0, index, torch.ones(len(offsets), dtype=base.dtype))
            return base.index_select(0, index) if values else None
    torch._foreach_add_(state_steps, 1)
    return torch.stack(state_steps) if values else None


def bias_correction_tensor(state_steps: list[Tensor] | Tensor, beta1: float, beta2: float,
                           device: torch.device, repeats: tuple[int, ...] | None = None,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """``(2, F)`` of ``dtype`` on ``device``: ``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` per factor,
    computed in float64 (as :func:`bias_corrections` does) from the step counters where they
    live (a list of 0-dim counters, or their ``(F,)`` values as :func:`advance_steps` returns
    them): no host sync and, for counters on ``device``, no host-to-device copy (a capturable
    step). ``repeats[i]`` (a stack of matrices) repeats factor ``i``'s column that many times."""
    t = state_steps if isinstance(state_steps, Tensor) else torch.stack(state_steps)
    t = t.to(device=device, dtype=torch.float64, non_blocking=True)
    bc = torch.stack((1.0 - torch.pow(beta1, t), torch.sqrt(1.0 - torch.pow(beta2, t)))).to(dtype)
    if repeats is not None and any(k != 1 for k in repeats):
        key = (repeats, device)
        index = _REPEAT_INDEX.get(key)
        if index is None:
            if len(_REPEAT_INDEX) > 64:
                _REPEAT_INDEX.clear()
            index = _REPEAT_INDEX[key] = torch.repeat_interleave(
                torch.arange(len(repeats)), torch.tensor(repeats)).to(device)
        bc = bc[:, index]
    return bc


from . import reference as _reference  # noqa: E402
from . import torch_backend as _torch_backend  # noqa: E402

register_backend(_reference.BACKEND)
register_backend(_torch_backend.BACKEND)


def _load_triton() -> Backend:
    from . import triton_backend  # raises ImportError without triton

    return triton_backend.BACKEND


_register_lazy("triton", _load_triton)
