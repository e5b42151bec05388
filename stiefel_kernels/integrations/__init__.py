"""Integrations with other libraries (optional dependencies, imported lazily).

* :mod:`stiefel_kernels.integrations.peft`: ``create_stiefel_adamw`` for Hugging Face PEFT LoRA
  models (needs ``pip install "stiefel_kernels[peft]"``).
"""
__all__ = ["create_stiefel_adamw"]


def __getattr__(name):
    if name == "create_stiefel_adamw":
        from .peft import create_stiefel_adamw
        return create_stiefel_adamw
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
