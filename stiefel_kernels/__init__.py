"""stiefel_kernels: geometry-aware AdamW for low-rank factors ``W = B A``."""
from . import geometry, gram, smallmat
from .geometry import orthogonality_error, orthonormalize_, project_tangent, random_stiefel

__version__ = "0.1.0"
