"""The package version, in one place: pyproject.toml reads it (``[tool.setuptools.dynamic]``) and
``stiefel_kernels.__version__`` re-exports it. Keep it a plain string literal: setuptools reads it
without importing the package (which would import torch)."""
__version__ = "0.1.0"
