"""Modules: StelLA adapters (:mod:`.stella`) and factorized causal self-attention with per-head
``W_Q`` on the Stiefel manifold (:mod:`.factorized_attention`; the small GPT built from it is a
recipe model, ``python/_gpt.py``)."""
from .factorized_attention import FactorizedCausalSelfAttention, param_groups, stiefel_parameters
from .stella import (
    StelLALinear,
    inject_stella,
    load_stella_adapters,
    load_stella_state_dict,
    make_stella_optimizer,
    merge_stella,
    save_stella_adapters,
    stella_modules,
    stella_hidden_size,
    stella_parameters,
    stella_state_dict,
    unmerge_stella,
)

__all__ = [
    "StelLALinear", "inject_stella", "stella_modules", "stella_parameters", "stella_hidden_size",
    "make_stella_optimizer", "merge_stella", "unmerge_stella", "stella_state_dict",
    "load_stella_state_dict", "save_stella_adapters", "load_stella_adapters",
    "FactorizedCausalSelfAttention", "stiefel_parameters", "param_groups",
]
