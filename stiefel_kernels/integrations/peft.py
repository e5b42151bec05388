"""Hugging Face PEFT integration: two-factor Stiefel LoRA with :class:`~stiefel_kernels.StiefelAdamW`.

Needs the optional dependencies ``peft`` and ``transformers`` (``pip install "stiefel_kernels[peft]"``).

Example::

    from peft import LoraConfig, get_peft_model
    from stiefel_kernels.integrations.peft import create_stiefel_adamw

    model = get_peft_model(base_model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    opt = create_stiefel_adamw(model, lr=2e-4, weight_decay=0.01)
    sched = transformers.get_linear_schedule_with_warmup(opt, 100, 10_000)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched))
"""
from __future__ import annotations

import re
import warnings

import torch
from torch import Tensor, nn

from ..geometry import orthonormalize_
from ..optim import StiefelAdamW

__all__ = ["create_stiefel_adamw", "lora_pairs", "orthonormalize_lora_"]

# "<prefix>.lora_A.<adapter>.weight" / "<prefix>.lora_embedding_A.<adapter>"
_A_RE = re.compile(r"^(?P<prefix>.*)\.lora_(?P<emb>embedding_)?A\.(?P<adapter>[^.]+)(?P<suffix>\.weight)?$")


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "stiefel_kernels.integrations.peft needs the optional dependencies 'peft' and 'transformers' "
            f"({e}); install them with:  pip install \"stiefel_kernels[peft]\"  (or pip install peft transformers)"
        ) from e


def lora_pairs(model: nn.Module, trainable_only: bool = True) -> list[tuple[str, Tensor, str, Tensor]]:
    """``(name_A, A, name_B, B)`` for every LoRA pair of a PEFT model, matched by module name
    (``x.lora_A.<adapter>.weight`` with ``x.lora_B.<adapter>.weight``; also
    ``lora_embedding_A``/``lora_embedding_B``). Only 2-D ``A`` (linear/embedding LoRA; conv LoRA is
    skipped). ``A`` is ``r x in``, ``B`` is ``out x r``, ``delta W = B A``."""
    params = dict(model.named_parameters())
    pairs = []
    for name, a in params.items():
        m = _A_RE.match(name)
        if m is None:
            continue
        b_name = f"{m['prefix']}.lora_{m['emb'] or ''}B.{m['adapter']}{m['suffix'] or ''}"
        b = params.get(b_name)
        if b is None or a.dim() != 2 or b.dim() != 2:
            continue
        if trainable_only and not (a.requires_grad and b.requires_grad):
            continue
        pairs.append((name, a, b_name, b))
    return pairs


def _orthonormalized_lora(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """New values ``(A', B')`` with ``A'`` (``r x in``, ``r <= in``) row-orthonormal and
    ``B' A' = B A`` (up to rounding; ``B R^T`` is formed in float64); ``a``, ``b`` are not touched.

    Raises:
        ValueError: ``A`` is rank deficient.
    """
    new_a = a.detach().clone()
    x = new_a if new_a.shape[0] < new_a.shape[1] else new_a.mT  # a square A: its rows as well
    r = orthonormalize_(x).to(torch.float64)   # A_old = R^T A_new
    return new_a, (b.detach().to(torch.float64) @ r.mT).to(b.dtype)


@torch.no_grad()
def orthonormalize_lora_(a: Tensor, b: Tensor) -> None:
    """Make ``A`` (``r x in``, ``r <= in``) row-orthonormal in place and set ``B <- B R^T`` so that
    ``B A`` is unchanged (up to rounding; the product is formed in float64). A rank-deficient
    ``A`` raises ``ValueError`` with both unchanged."""
    new_a, new_b = _orthonormalized_lora(a, b)
    a.copy_(new_a)
    b.copy_(new_b)


def create_stiefel_adamw(peft_model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                         **kwargs) -> StiefelAdamW:
    """A :class:`~stiefel_kernels.StiefelAdamW` for a PEFT LoRA model (two-factor Stiefel LoRA).

    Pairs each ``lora_A`` with its ``lora_B`` by module name, makes ``A`` row-orthonormal **now**
    while keeping ``B A`` unchanged (``B <- B R^T``; so it also works for a loaded adapter with
    nonzero ``B``), and returns an optimizer with groups

    * ``{"params": [A, ...], "stiefel": True}`` (no weight decay on the Stiefel factors),
    * ``{"params": [B, ...] + every other trainable parameter, "weight_decay": weight_decay}``.

    Works as ``transformers.Trainer(..., optimizers=(opt, scheduler))``.

    Everything is checked before the model is touched: the optimizer (with all of
    ``StiefelAdamW``'s validation of ``lr``, ``weight_decay`` and ``**kwargs``, per group) is built
    first, then every ``A`` is factorized into new tensors, and only then are the new values
    copied in (in place, so the optimizer holds the same tensors). An invalid option or a
    rank-deficient ``A`` raises with the model unchanged.

    Args:
        peft_model: a ``peft`` model (or any module with PEFT-style ``lora_A``/``lora_B`` names).
        lr, weight_decay: as for ``StiefelAdamW``.
        **kwargs: passed to ``StiefelAdamW`` (``betas``, ``eps``, ``retraction``, ``backend``, ...).
    Raises:
        ImportError: when ``peft``/``transformers`` are not installed.
        ValueError: when the model has no trainable LoRA pair, a rank-deficient ``lora_A``, or
            for an invalid option (as ``StiefelAdamW`` raises it; ``TypeError`` for an unknown
            keyword).
    """
    _require_peft()
    pairs = lora_pairs(peft_model)
    if not pairs:
        raise ValueError("create_stiefel_adamw: no trainable lora_A/lora_B pair found (is this a PEFT LoRA model?)")
    st_names, st, st_pairs = [], [], []
    for a_name, a, b_name, b in pairs:
        if a.shape[0] > a.shape[1]:
            warnings.warn(f"create_stiefel_adamw: {a_name} has rank {a.shape[0]} > its input size {a.shape[1]}; "
                          "it cannot have orthonormal rows and stays Euclidean", stacklevel=2)
            continue
        st_names.append(a_name)
        st.append(a)
        st_pairs.append((a, b))
    st_ids = {id(p) for p in st}
    eu_names, eu = [], []
    for name, p in peft_model.named_parameters():
        if p.requires_grad and id(p) not in st_ids:
            eu_names.append(name)
            eu.append(p)
            st_ids.add(id(p))
    groups = [{"params": st, "param_names": st_names, "stiefel": True}]
    if eu:
        groups.append({"params": eu, "param_names": eu_names, "weight_decay": weight_decay})
    # all validation first (it reads no parameter values), then every factorization (a
    # rank-deficient A raises here); the model is touched last, when nothing can fail any more
    opt = StiefelAdamW(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    with torch.no_grad():
        new_values = [_orthonormalized_lora(a, b) for a, b in st_pairs]
        for (a, b), (new_a, new_b) in zip(st_pairs, new_values):
            a.copy_(new_a)
            b.copy_(new_b)
    return opt
