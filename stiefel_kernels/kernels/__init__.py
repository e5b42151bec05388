"""Triton kernels and their launchers (needs triton; imported by
:mod:`stiefel_kernels.backends.triton_backend`).

* :mod:`.stiefel_adamw_triton`: the pass-1 / pass-2 streaming kernels;
* :mod:`.small_step_triton`: the ``r x r`` step of ``cayley_fp`` / ``newton_schulz``;
* :mod:`.launch`: launch configurations, pointer arrays, one function per launch.
"""
from .small_step_triton import small_step_kernel
from .stiefel_adamw_triton import stiefel_pass1_kernel, stiefel_pass2_kernel

__all__ = ["small_step_kernel", "stiefel_pass1_kernel", "stiefel_pass2_kernel"]
