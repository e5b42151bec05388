"""Data-parallel training with Stiefel factors: DDP as is, FSDP2 with factors sharded along
their long side (docs/design.md, "Sharding").

* DDP needs nothing: parameters are plain tensors, gradients arrive averaged, every rank takes
  the same step.
* FSDP2 (``torch.distributed.fsdp.fully_shard``) turns parameters into ``DTensor`` shards.
  :func:`stiefel_shard_placement_fn` makes ``fully_shard`` shard each Stiefel factor along its
  **long** dimension (``Shard(-1)`` of a wide ``r x n`` factor, ``Shard(-2)`` of a tall or square
  one, the last two dims of a stack). ``K = X^T X``, ``G = X^T D``, ``H = D^T D`` are sums over
  that dimension, so a step (:func:`backend_step`, the one place sharding is handled: the
  optimizer calls it, backends see plain local tensors) is: moments and pass 1 on the local
  shards, **one** all-reduce (sum) of the stacked ``(K, G, H)`` of a bucket of same-shape
  factors over the shard's process group, the ``r x r`` step locally (identical on every
  rank), pass 2 locally. The ``torch`` and ``triton`` backends step local shards
  (``steps_local_shards``). Empty shards (fewer rows in the long dim than ranks) are fine:
  their partial Grams are zero, and they still join the all-reduce.
* A factor laid out any other way (sharded on its short dim, ``_StridedShard``, several
  shardings mixed) takes the documented fallback :func:`gathered_step`: ``full_tensor()`` of
  parameter, gradient and moments, the step on full tensors, each rank keeps its slice. Correct,
  but it moves the whole factor (it warns once per layout). The ``reference`` backend (the
  literal full-matrix specification) always takes this path. ``Partial`` parameters raise.

Euclidean groups run torch's AdamW, which handles DTensors itself.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import _buckets, geometry

__all__ = ["stiefel_shard_placement_fn", "long_dim", "is_dtensor", "orthogonality_error",
           "backend_step", "gathered_step"]


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (cheap: imports nothing)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def has_dtensor(ts: Iterable[Any]) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(t, mod.DTensor) for t in ts)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def long_dim(p: Tensor) -> int:
    """The dimension a Stiefel factor's Gram matrices sum over (non-negative index): the last of
    a wide ``(..., r, n)`` factor, the second to last of a tall or square one."""
    return p.dim() - 1 if geometry.is_row_orthonormal(p.shape) else p.dim() - 2


def stiefel_shard_placement_fn(
    stiefel_params: Iterable[Tensor] | Callable[[Tensor], bool],
    default: Callable[[Tensor], Any] | None = None,
    shard_size: int | None = None,
) -> Callable[[torch.nn.Parameter], Any]:
    """A ``shard_placement_fn`` for ``fully_shard`` that shards Stiefel factors on their long dim.

    FSDP2 (torch 2.13) shards a nonzero dim only evenly, so a factor whose long dim is not dim 0
    and not divisible by the shard world size gets instead: ``Shard(0)`` for a stack (whole
    factors per rank: still local, no collective), FSDP2's default ``Shard(0)`` for a wide
    matrix (its short dim: the step then gathers it, with a warning). Tall factors (long dim 0)
    shard unevenly, empty shards included.

    Args:
        stiefel_params: the Stiefel factors (the parameters *before* ``fully_shard``), or a
            predicate ``param -> bool``.
        default: placement of every other parameter (``None``: FSDP2's default ``Shard(0)``).
        shard_size: ranks a parameter is sharded over (default: the world size; pass the shard
            mesh dim's size for HSDP).

    Example::

        fn = stiefel_shard_placement_fn([blk.A for blk in model.blocks])
        for blk in model.blocks:
            fully_shard(blk, shard_placement_fn=fn)
        fully_shard(model, shard_placement_fn=fn)
    """
    from torch.distributed.tensor import Shard

    if callable(stiefel_params):
        is_stiefel = stiefel_params
    else:
        keep = list(stiefel_params)  # keeps them alive, so their ids stay unique
        ids = {id(p) for p in keep}

        def is_stiefel(p: Tensor) -> bool:
            return id(p) in ids

    def placement(param: torch.nn.Parameter):
        if not is_stiefel(param):
            return default(param) if default is not None else None
        if param.dim() < 2:
            raise ValueError(f"a Stiefel factor needs >= 2 dims, got shape {tuple(param.shape)}")
        ld = long_dim(param)
        world = shard_size if shard_size is not None else torch.distributed.get_world_size()
        if ld == 0 or param.shape[ld] % world == 0:
            return Shard(ld)
        if param.dim() > 2:
            return Shard(0)
        warnings.warn(f"stiefel_shard_placement_fn: FSDP2 cannot shard the long dim of a factor of "
                      f"shape {tuple(param.shape)} over {world} ranks (uneven); it is sharded on its "
                      "short dim and each step gathers it", stacklevel=2)
        return None

    return placement


# ---------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class _Layout:
    """How a DTensor Stiefel factor lies on its mesh."""

    mesh: Any
    placements: tuple
    reduce_dims: tuple[int, ...]   # mesh dims sharding the long dim (Gram sums over them)
    fast: bool                     # Replicate, Shard(long dim), Shard(stack dim): local passes
    batch_sharded: bool            # a stack dim is sharded (ranks hold different factors)
    row_orthonormal: bool          # orientation of the global shape (a shard's may differ)

    def reduce(self, t: Tensor) -> Tensor:
        """Sum the contiguous ``t`` (in place) over the ranks holding the other pieces of the long
        dim; returns ``t``."""
        import torch.distributed as dist

        for i in self.reduce_dims:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.mesh.get_group(i))
        return t

    def reduce_grams(self, k: Tensor, g: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One all-reduce of the stacked ``(K, G, H)`` of a whole bucket."""
        if not self.reduce_dims:
            return k, g, h
        return tuple(self.reduce(torch.stack((k, g, h))).unbind(0))  # type: ignore[return-value]


def _layout(p: Tensor, what: str = "Stiefel factor") -> _Layout:
    from torch.distributed.tensor import Replicate, Shard

    ld = long_dim(p)
    reduce_dims, fast, batch = [], True, False
    for i, pl in enumerate(p.placements):
        if isinstance(pl, Replicate):
            continue
        dim = pl.dim % p.dim() if isinstance(pl, Shard) else None
        if type(pl) is Shard and dim == ld:
            reduce_dims.append(i)
        elif type(pl) is Shard and dim < p.dim() - 2:  # a stack dim: whole factors per rank
            batch = True
        elif isinstance(pl, Shard):  # the short dim, _StridedShard: gather
            fast = False
        else:
            raise ValueError(f"{what} of shape {tuple(p.shape)} has placements {p.placements}: "
                             "only Shard and Replicate placements can be stepped (Partial cannot)")
    return _Layout(p.device_mesh, tuple(p.placements), tuple(reduce_dims), fast, batch,
                   geometry.is_row_orthonormal(p.shape))


def _local(t: Tensor | None, p: Tensor, what: str, readonly: bool = False) -> Tensor | None:
    """Local shard of ``t``, which must lie like the parameter ``p``."""
    if t is None:
        return None
    if not is_dtensor(t):
        raise ValueError(f"{what} of a DTensor Stiefel factor (shape {tuple(p.shape)}) is a plain "
                         "tensor; it must be a DTensor laid out like the parameter")
    if t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):
        if not readonly:
            raise ValueError(f"{what} of a Stiefel factor of shape {tuple(p.shape)} has placements "
                             f"{t.placements}, the parameter {p.placements}")
        t = t.redistribute(p.device_mesh, p.placements)
    return t.to_local()


def _local_slice(full: Tensor, like: Tensor) -> Tensor:
    """This rank's piece of ``full`` laid out like the DTensor ``like`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


# ---------------------------------------------------------------------- steps
def _telemetry_kw(telemetry: list | None) -> dict:
    """Pass ``telemetry`` on only when asked for (a step function need not take it)."""
    return {} if telemetry is None else {"telemetry": telemetry}


def gathered_step(step_fn: Callable[..., Tensor | None], params: list[Tensor], grads: list[Tensor],
                  exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  max_exp_avg_sqs: list[Tensor] | None, state_steps: list[Tensor],
                  hp: Any, telemetry: list | None = None) -> Tensor | None:
    """The fallback for any DTensor layout: gather parameters, gradients and moments with
    ``full_tensor()``, run ``step_fn`` on the full tensors (the same on every rank), and write each
    rank's slice back. Plain tensors in the lists pass through unchanged."""
    for p in params:
        if is_dtensor(p):
            _layout(p)  # Partial raises

    def full(ts):
        return None if ts is None else [t.full_tensor() if is_dtensor(t) else t for t in ts]

    owned = [params, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if max_exp_avg_sqs is not None else [])
    fulls = [full(ts) for ts in owned]
    failures = step_fn(fulls[0], full(grads), fulls[1], fulls[2],
                       fulls[3] if max_exp_avg_sqs is not None else None, state_steps, hp,
                       **_telemetry_kw(telemetry))
    for ts, fs in zip(owned, fulls):
        for t, f in zip(ts, fs):
            if is_dtensor(t):
                t.to_local().copy_(_local_slice(f, t))
    return failures


#: (backend, global shape, placements) of the buckets :func:`backend_step` has warned about
_GATHER_WARNED: set = set()


def backend_step(backend: Any, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                 exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None,
                 state_steps: list[Tensor], hp: Any, telemetry: list | None = None,
                 workspace: dict | None = None) -> Tensor | None:
    """One Stiefel step of ``backend`` over a list that may hold DTensors: the one place where
    sharding is handled (``StiefelAdamW`` calls it for every Stiefel step; backends only ever see
    plain tensors).

    Without DTensors this is ``backend.step(...)``. Otherwise factors are bucketed by (global
    shape, dtype, device, mesh, placements), in list order, so every rank forms the same
    buckets (:func:`stiefel_kernels._buckets.bucket_key` with the layout), and per bucket:

    * sharded along the long side (or replicated, or sharded over stack dims), and the backend
      declares ``steps_local_shards``: ``backend.step`` on the local shards with
      ``sharding=`` the bucket's layout (the global orientation, and ``reduce``: one all-reduce of
      the bucket's stacked ``(K, G, H)`` between the passes; a rank whose shard is empty still
      joins it);
    * any other layout (the short side, ``_StridedShard``, mixed), or a backend without
      local-shard support (``reference``): :func:`gathered_step`, with a warning once per
      (backend, shape, placements) since it moves the whole factor;
    * plain tensors: ``backend.step`` as usual.

    ``telemetry`` is passed on to backends that declare ``reports_telemetry``, ``workspace`` to
    those that declare ``keeps_workspace``."""
    kw = {"telemetry": telemetry} if telemetry is not None and getattr(backend, "reports_telemetry", False) else {}
    if workspace is not None and getattr(backend, "keeps_workspace", False):
        kw["workspace"] = workspace
    if not has_dtensor(params):
        return backend.step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp, **kw)
    local_ok = bool(getattr(backend, "steps_local_shards", False))
    # key None: the plain tensors, in one call (the backend buckets them itself)
    buckets = _buckets.group(_buckets.bucket_key(p, layout=_layout(p)) if is_dtensor(p) else None
                             for p in params)
    failures = None
    for key, idx in buckets.items():
        layout = None if key is None else key.layout

        def sub(ts):
            return None if ts is None else [ts[i] for i in idx]

        ps, gs, ms, vs, mx, st = (sub(params), sub(grads), sub(exp_avgs), sub(exp_avg_sqs),
                                  sub(max_exp_avg_sqs), sub(state_steps))
        if layout is None:
            count = backend.step(ps, gs, ms, vs, mx, st, hp, **kw)
        elif not (layout.fast and local_ok):
            warn_key = (backend.name, tuple(ps[0].shape), layout.placements)
            if warn_key not in _GATHER_WARNED:
                _GATHER_WARNED.add(warn_key)
                why = ("is not sharded along its long side" if not layout.fast else
                       f"is stepped by backend {backend.name!r}, which does not step local shards")
                warnings.warn(f"Stiefel factor of shape {tuple(ps[0].shape)} with placements "
                              f"{layout.placements} {why}: each step gathers it (full_tensor) on "
                              "every rank", stacklevel=3)
            count = gathered_step(backend.step, ps, gs, ms, vs, mx, st, hp, telemetry=kw.get("telemetry"))
        else:
            count = backend.step(
                [p.to_local() for p in ps],
                [_local(g, p, "gradient", readonly=True) for g, p in zip(gs, ps)],
                [_local(m, p, "exp_avg") for m, p in zip(ms, ps)],
                [_local(v, p, "exp_avg_sq") for v, p in zip(vs, ps)],
                None if mx is None else [_local(m, p, "max_exp_avg_sq") for m, p in zip(mx, ps)],
                st, hp, sharding=layout, **kw)
        if count is not None:
            failures = count if failures is None else failures + count
    return failures


def orthogonality_error(p: Tensor) -> Tensor:
    """:func:`stiefel_kernels.geometry.orthogonality_error` for plain tensors and DTensors (a
    DTensor sharded on its long dim: the local Gram in float64 and one all-reduce; any other
    layout: on ``full_tensor()``). The same value on every rank."""
    if not is_dtensor(p):
        return geometry.orthogonality_error(p)
    layout = _layout(p)
    if not layout.fast or layout.batch_sharded:
        return geometry.orthogonality_error(p.full_tensor())
    x = p.detach().to_local().to(torch.float64)
    x = x.mT if layout.row_orthonormal else x  # a shard's own shape may look the other way
    k = layout.reduce(x.mT @ x)
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    return torch.linalg.matrix_norm(k - eye)
