"""stiefel_kernels: geometry-aware AdamW for low-rank factors ``W = B A``.

* :class:`StiefelAdamW`: AdamW whose ``"stiefel": True`` groups stay orthonormal.
* :mod:`stiefel_kernels.geometry`: tangent projection and the full-matrix retractions (the spec).
* :mod:`stiefel_kernels.gram`: the same retractions from three ``r x r`` Gram matrices (fast path).
* :mod:`stiefel_kernels.backends`: ``reference`` / ``torch`` / ``triton`` implementations of a step.
"""
from . import _native, backends, geometry, gram, smallmat
from .geometry import (
    as_column_form,
    orthogonality_error,
    orthonormalize_,
    project_tangent,
    random_stiefel,
    retract_cayley,
    retract_cayley_direct,
    retract_cayley_fixed_point,
    retract_newton_schulz,
    retract_polar,
    retract_qr,
)
from .gram import RETRACTIONS, apply_coefficients, gram_pass, retraction_coefficients
from .optim import StiefelAdamW

from ._version import __version__

__all__ = [
    "StiefelAdamW",
    "orthonormalize_",
    "orthogonality_error",
    "project_tangent",
    "as_column_form",
    "random_stiefel",
    "retract_qr",
    "retract_polar",
    "retract_newton_schulz",
    "retract_cayley",
    "retract_cayley_direct",
    "retract_cayley_fixed_point",
    "RETRACTIONS",
    "gram_pass",
    "retraction_coefficients",
    "apply_coefficients",
    "geometry",
    "gram",
    "smallmat",
    "backends",
]

# StelLA / any-optimizer Riemannian hooks / factorized attention (torch only). The PEFT
# integration needs optional packages: import stiefel_kernels.integrations.peft explicitly.
from . import nn, riemannian  # noqa: E402
from .nn import StelLALinear, inject_stella, load_stella_adapters, save_stella_adapters  # noqa: E402
from .riemannian import RiemannianHooks, make_riemannian  # noqa: E402

__all__ += ["nn", "riemannian", "make_riemannian", "RiemannianHooks", "StelLALinear", "inject_stella",
            "save_stella_adapters", "load_stella_adapters"]
