"""Tensor conversions shared by training, the feature-extraction API and evaluation.

Keeping them in one place guarantees that an encoder sees images and points
exactly as it did during pre-training.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "images_to_tensor", "points_to_tensor"]

IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def images_to_tensor(images, device=None, dtype=torch.float32) -> torch.Tensor:
    """uint8 images -> normalised float tensor.

    images: (B, S, S) or (B, S, S, C) uint8 (numpy or torch). Returns (B, C, S, S),
    C = 1 for grayscale, scaled to [0, 1] then normalised with mean/std 0.5.
    """
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if t.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4:
        t = t.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (B,S,S) or (B,S,S,C), got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=dtype).div_(255.0)
    return t.sub_(IMAGE_MEAN).div_(IMAGE_STD)


def points_to_tensor(points, device=None, dtype=torch.float32) -> torch.Tensor:
    """(B, N, 3) float points -> (B, N, 3) float tensor on ``device``."""
    t = torch.as_tensor(np.asarray(points) if not isinstance(points, torch.Tensor) else points)
    if t.ndim != 3 or t.shape[-1] != 3:
        raise ValueError(f"points must be (B, N, 3), got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)
