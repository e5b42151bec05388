"""Factorized causal self-attention for Stiefel-AdamW pre-training.

Per head the score matrix is ``x W_Q W_K^T x^T``; the map ``(W_Q, W_K) -> W_Q W_K^T`` is highly
non-injective. Following the Stiefel-AdamW talk ("GPT2 pre-training") we optimize on
``St(d_model, d_head) x R^(d_model x d_head) / O(d_head)``: ``W_Q`` (``d_model x d_head``, tall)
keeps orthonormal columns, ``W_K`` is Euclidean. The query factors of all heads are one stacked
parameter ``w_q`` of shape ``(n_head, d_model, d_head)`` (a stack of tall factors: one Stiefel
"parameter" per layer, orthonormal per head), ``w_k`` has the same shape. Queries and keys have
no bias (a bias would break the factorization); values and the output projection are ordinary
``nn.Linear`` layers.

Use :func:`param_groups` to build the ``StiefelAdamW`` groups of any model built with this layer
(the talk's recipe: ``W_Q`` on Stiefel, biases/norms without decay, everything else plain AdamW).
A small GPT made of it is a recipe model: ``python/_gpt.py`` (used by ``python/pretrain_gpt.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..geometry import random_stiefel

__all__ = ["FactorizedCausalSelfAttention", "stiefel_parameters", "param_groups"]


class FactorizedCausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with per-head query/key factors ``W_Q``, ``W_K``.

    Args:
        d_model: model width.
        n_head: number of heads.
        d_head: head width (default ``d_model // n_head``); ``d_head <= d_model``.
        bias: bias of the value and output projections.
        dropout: attention and residual dropout.

    Parameters: ``w_q`` (``(n_head, d_model, d_head)``, orthonormal columns per head: Stiefel),
    ``w_k`` (same shape, Euclidean), ``v_proj``, ``out_proj`` (``nn.Linear``).
    """

    def __init__(self, d_model: int, n_head: int, d_head: int | None = None, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        d_head = d_model // n_head if d_head is None else d_head
        if not 1 <= d_head <= d_model:
            raise ValueError(f"FactorizedCausalSelfAttention: need 1 <= d_head <= d_model, got {d_head}, {d_model}")
        self.d_model, self.n_head, self.d_head, self.dropout = d_model, n_head, d_head, dropout
        self.w_q = nn.Parameter(random_stiefel(n_head, d_model, d_head))
        self.w_k = nn.Parameter(torch.empty(n_head, d_model, d_head))
        self.v_proj = nn.Linear(d_model, n_head * d_head, bias=bias)
        self.out_proj = nn.Linear(n_head * d_head, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.w_q.copy_(random_stiefel(*self.w_q.shape, dtype=self.w_q.dtype))
        # W_Q's columns are unit vectors (entries ~ 1/sqrt(d_model)); W_K at the usual GPT scale
        nn.init.normal_(self.w_k, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = torch.einsum("btc,hcd->bhtd", x, self.w_q)
        k = torch.einsum("btc,hcd->bhtd", x, self.w_k)
        v = self.v_proj(x).view(b, t, self.n_head, self.d_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.d_head)
        return self.resid_dropout(self.out_proj(y))


def stiefel_parameters(model: nn.Module) -> list[Tensor]:
    """The Stiefel factors of ``model``: the stacked ``w_q`` of every
    :class:`FactorizedCausalSelfAttention`, in module order."""
    return [m.w_q for m in model.modules() if isinstance(m, FactorizedCausalSelfAttention)]


def param_groups(model: nn.Module, weight_decay: float = 0.1, *, stiefel: bool = True) -> list[dict]:
    """Parameter groups for :class:`stiefel_kernels.StiefelAdamW` (or ``torch.optim.AdamW``).

    * ``{"params": [w_q, ...], "stiefel": True}`` (no weight decay on a Stiefel factor);
    * ``{"params": <other matrices/embeddings>, "weight_decay": weight_decay}``;
    * ``{"params": <biases, norms (dim < 2)>, "weight_decay": 0.0}``.

    With ``stiefel=False`` (the AdamW baseline with the same hyper-parameters) the query factors
    join the decayed group and no group carries the ``"stiefel"`` key. Only parameters with
    ``requires_grad`` are included; shared (tied) parameters appear once; empty groups are dropped.
    """
    st_ids = {id(p) for p in stiefel_parameters(model)} if stiefel else set()
    seen: set[int] = set()
    st, decay, no_decay = [], [], []
    for p in model.parameters():  # deduplicates tied parameters itself
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (st if id(p) in st_ids else decay if p.dim() >= 2 else no_decay).append(p)
    groups = []
    if st:
        groups.append({"params": st, "stiefel": True})
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
