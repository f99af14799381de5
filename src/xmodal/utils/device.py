"""Device helpers shared by evaluation and feature extraction (torch imported lazily)."""

from __future__ import annotations

from typing import Any

__all__ = ["default_device", "module_device"]


def default_device(device: Any = None):
    """``device`` as a ``torch.device``; ``None`` -> CUDA when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def module_device(module, default: Any = "cpu"):
    """The device of ``module``'s first parameter (``default`` for a module without parameters)."""
    import torch

    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device(default)
