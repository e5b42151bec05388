"""Triton kernels (imported only by :mod:`stiefel_kernels.backends.triton_backend`; needs triton)."""
from .small_step_triton import small_step_kernel
from .stiefel_adamw_triton import stiefel_pass1_kernel, stiefel_pass2_kernel

__all__ = ["small_step_kernel", "stiefel_pass1_kernel", "stiefel_pass2_kernel"]
