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
    """The device of ``module``'s first parameter, else of its first buffer (``default`` for a
    module with neither)."""
    import torch

    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device(default)
