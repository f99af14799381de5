"""Data augmentation of pre-training (paper §4.1), vectorised over a batch.

Images: a random resized crop (a random window, then resized back to the input
size) and a horizontal flip with probability 0.5. Point clouds: a rotation by a
uniform angle in [0, 2π) about the dataset's up axis, then Gaussian jitter of
every coordinate (σ = 0.02); beyond the paper, optionally a per-axis scale and a
translation of each cloud (``scale_shift_points``, off by default).

Every augmentation is split in two:

* ``sample_*_params(..., seed=)`` draws the random parameters with numpy from a
  seed or a ``numpy.random.Generator`` (no global RNG). The deterministic
  sampler (:mod:`xmodal.train.sampler`) calls these with its per-step generator,
  which is what makes a resumed or distributed run identical to a plain one.
* ``crop_resize_flip`` / ``rotate_points`` / ``jitter_points`` apply given
  parameters as pure torch functions (any device, autograd-free, batched).

``random_resized_crop_flip`` and ``random_rotate_jitter`` combine both for
standalone use.

The crop, resize and flip of a whole batch are one ``affine_grid`` +
``grid_sample`` call with a per-image affine map, so the batch never leaves the
device and no per-image Python loop runs (torchvision's ``RandomResizedCrop``
works per image and does not import on the CPU torch build used here).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from xmodal.data.geometry import up_axis_index

__all__ = [
    "as_rng",
    "resize_images",
    "sample_crop_params",
    "crop_resize_flip",
    "random_resized_crop_flip",
    "sample_point_params",
    "rotation_matrices",
    "rotate_points",
    "jitter_points",
    "augment_points",
    "random_rotate_jitter",
    "sample_scale_shift",
    "scale_shift_points",
]


def as_rng(seed) -> np.random.Generator:
    """``int`` / ``SeedSequence`` / sequence of ints / ``Generator`` -> ``numpy.random.Generator``."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        raise ValueError("a seed (or numpy Generator) is required: augmentations never use the global RNG")
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- images


def resize_images(images, size: int):
    """Resize square uint8 images to ``size`` x ``size`` (antialiased bilinear).

    images: (n, S, S) or (n, S, S, 3) uint8, numpy or torch. Returns the same kind
    and layout with side ``size`` (the input itself when ``S == size``). Used both by
    the training sampler and by :func:`xmodal.api.extract_image_features`, so an
    encoder sees resized images the same way in both.
    """
    is_np = not isinstance(images, torch.Tensor)
    t = torch.as_tensor(np.asarray(images)) if is_np else images
    if t.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {t.dtype}")
    if t.ndim not in (3, 4) or t.shape[1] != t.shape[2]:
        raise ValueError(f"images must be (n, S, S) or (n, S, S, C), got shape {tuple(t.shape)}")
    if int(t.shape[1]) == int(size):
        return images
    if len(t) == 0:
        out = t.new_zeros((0, size, size) + tuple(t.shape[3:]))
        return out.numpy() if is_np else out
    x = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    x = x[:, 0] if t.ndim == 3 else x.permute(0, 2, 3, 1).contiguous()
    return x.numpy() if is_np else x


def sample_crop_params(
    n: int,
    *,
    scale: Sequence[float] = (0.5, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    seed=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop windows and flips for ``n`` images.

    The window area is uniform in ``scale`` (fraction of the image), its aspect
    ratio log-uniform in ``ratio``; a side that would exceed the image is clipped
    to it (so extreme ratios at large scales give slightly smaller areas, instead
    of torchvision's rejection loop, which cannot be vectorised); the position is
    uniform over the valid placements.

    Returns ``boxes`` (n, 4) float32 ``[x0, y0, w, h]`` as fractions of the image
    side (x to the right, y down) and ``flip`` (n,) bool.
    """
    rng = as_rng(seed)
    area = rng.uniform(scale[0], scale[1], size=n)
    logr = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=n)
    r = np.exp(logr)
    w = np.minimum(np.sqrt(area * r), 1.0)
    h = np.minimum(np.sqrt(area / r), 1.0)
    x0 = rng.uniform(size=n) * (1.0 - w)
    y0 = rng.uniform(size=n) * (1.0 - h)
    flip = rng.uniform(size=n) < hflip_p
    boxes = np.stack([x0, y0, w, h], axis=1).astype(np.float32)
    return boxes, flip


def crop_resize_flip(
    images: torch.Tensor,
    boxes,
    flip,
    size: Optional[int] = None,
) -> torch.Tensor:
    """Crop each image to its box, resize to ``size``, flip horizontally where asked.

    images: (n, C, H, W) float; boxes: (n, 4) ``[x0, y0, w, h]`` fractions (see
    :func:`sample_crop_params`); flip: (n,) bool; size: output side (default H).
    Returns (n, C, size, size). Bilinear sampling at the output pixel centres; the
    full box without flip is the identity (for ``size == H == W``).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (n, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    size = int(size or h)
    dev, dt = images.device, images.dtype
    b = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, torch.Tensor) else boxes)
    b = b.to(device=dev, dtype=torch.float32)
    fl = torch.as_tensor(np.asarray(flip) if not isinstance(flip, torch.Tensor) else flip).to(dev)
    if b.shape != (n, 4) or fl.shape != (n,):
        raise ValueError(f"boxes must be ({n}, 4) and flip ({n},), got {tuple(b.shape)} and {tuple(fl.shape)}")
    sign = 1.0 - 2.0 * fl.float()
    # output coords u in [-1, 1] -> input coords centre + half-extent * u (normalised, align_corners=False)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=torch.float32)
    theta[:, 0, 0] = b[:, 2] * sign
    theta[:, 0, 2] = 2 * b[:, 0] + b[:, 2] - 1
    theta[:, 1, 1] = b[:, 3]
    theta[:, 1, 2] = 2 * b[:, 1] + b[:, 3] - 1
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(dt)


def random_resized_crop_flip(
    images: torch.Tensor,
    *,
    size: Optional[int] = None,
    scale: Sequence[float] = (0.5, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    seed=None,
) -> torch.Tensor:
    """Random resized crop + horizontal flip of a batch ``(n, C, H, W)`` -> ``(n, C, size, size)``."""
    boxes, flip = sample_crop_params(len(images), scale=scale, ratio=ratio, hflip_p=hflip_p, seed=seed)
    return crop_resize_flip(images, boxes, flip, size)


# --------------------------------------------------------------------------- points


def sample_point_params(
    n: int,
    num_points: int,
    *,
    rotate: bool = True,
    jitter_sigma: float = 0.02,
    seed=None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Rotation angles (n,) float32 in [0, 2π) (zeros when ``rotate`` is False) and
    unit Gaussian noise (n, num_points, 3) float32 (None when ``jitter_sigma`` is 0)."""
    rng = as_rng(seed)
    angles = rng.uniform(0.0, 2 * math.pi, size=n) if rotate else np.zeros(n)
    noise = rng.standard_normal((n, num_points, 3), dtype=np.float32) if jitter_sigma > 0 else None
    return angles.astype(np.float32), noise


def rotation_matrices(angles, up_axis: str = "z") -> torch.Tensor:
    """Right-handed rotations by ``angles`` (n,) radians about ``up_axis``: (n, 3, 3) float32."""
    u = up_axis_index(up_axis)
    a_, b_ = (u + 1) % 3, (u + 2) % 3  # the plane (a, b) rotated counter-clockwise seen from +up
    t = torch.as_tensor(np.asarray(angles) if not isinstance(angles, torch.Tensor) else angles)
    t = t.to(torch.float64)
    c, s = torch.cos(t), torch.sin(t)
    r = torch.zeros(t.shape[0], 3, 3, dtype=torch.float64, device=t.device)
    r[:, u, u] = 1
    r[:, a_, a_] = c
    r[:, a_, b_] = -s
    r[:, b_, a_] = s
    r[:, b_, b_] = c
    return r.float()


def rotate_points(points: torch.Tensor, angles, up_axis: str = "z") -> torch.Tensor:
    """Rotate each cloud ``points`` (n, N, 3) by its angle about ``up_axis``; the up coordinate is unchanged."""
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be (n, N, 3), got shape {tuple(points.shape)}")
    r = rotation_matrices(angles, up_axis).to(device=points.device, dtype=points.dtype)
    return points @ r.transpose(1, 2)


def jitter_points(points: torch.Tensor, noise, sigma: float = 0.02, clip: Optional[float] = None) -> torch.Tensor:
    """``points + sigma * noise`` (noise: unit Gaussian, same shape), clipped to ±clip when given."""
    z = torch.as_tensor(np.asarray(noise) if not isinstance(noise, torch.Tensor) else noise)
    z = z.to(device=points.device, dtype=points.dtype)
    if z.shape != points.shape:
        raise ValueError(f"noise shape {tuple(z.shape)} != points shape {tuple(points.shape)}")
    d = z * sigma
    if clip is not None:
        d = d.clamp(-clip, clip)
    return points + d


def augment_points(
    points: torch.Tensor,
    angles,
    noise,
    *,
    up_axis: str = "z",
    sigma: float = 0.02,
    clip: Optional[float] = None,
) -> torch.Tensor:
    """Rotation about the up axis, then jitter: (n, N, 3) -> (n, N, 3). ``noise`` None: no jitter."""
    out = rotate_points(points, angles, up_axis)
    if noise is not None and sigma > 0:
        out = jitter_points(out, noise, sigma, clip)
    return out


def random_rotate_jitter(
    points: torch.Tensor,
    *,
    up_axis: str = "z",
    sigma: float = 0.02,
    clip: Optional[float] = None,
    seed=None,
) -> torch.Tensor:
    """Random rotation about ``up_axis`` + Gaussian jitter of a batch (n, N, 3)."""
    angles, noise = sample_point_params(points.shape[0], points.shape[1], jitter_sigma=sigma, seed=seed)
    return augment_points(points, angles, noise, up_axis=up_axis, sigma=sigma, clip=clip)


def sample_scale_shift(
    n: int,
    *,
    scale: Sequence[float] = (1.0, 1.0),
    shift: float = 0.0,
    seed=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis scale factors (n, 3) uniform in ``scale`` = (lo, hi) and offsets (n, 3) uniform in
    ±``shift``, both float32: the cloud augmentation DGCNN and CrossPoint train with (scale
    (2/3, 3/2), shift 0.2). The scales are drawn before the offsets."""
    rng = as_rng(seed)
    lo, hi = (float(x) for x in scale)
    scales = rng.uniform(lo, hi, size=(n, 3))
    shifts = rng.uniform(-shift, shift, size=(n, 3))
    return scales.astype(np.float32), shifts.astype(np.float32)


def scale_shift_points(points: torch.Tensor, scales, shifts) -> torch.Tensor:
    """``points * scales + shifts`` per cloud: points (n, N, 3), scales and shifts (n, 3)."""
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be (n, N, 3), got shape {tuple(points.shape)}")
    s = torch.as_tensor(np.asarray(scales) if not isinstance(scales, torch.Tensor) else scales)
    t = torch.as_tensor(np.asarray(shifts) if not isinstance(shifts, torch.Tensor) else shifts)
    for name, x in (("scales", s), ("shifts", t)):
        if tuple(x.shape) != (points.shape[0], 3):
            raise ValueError(f"{name} must be ({points.shape[0]}, 3), got shape {tuple(x.shape)}")
    s = s.to(device=points.device, dtype=points.dtype)
    t = t.to(device=points.device, dtype=points.dtype)
    return points * s[:, None, :] + t[:, None, :]
