"""Deterministic, step-indexed sampling of pre-training batches.

Everything random about optimisation step ``s`` is drawn from
``numpy.random.default_rng([seed, s])``, for the **global** batch of ``B`` samples,
in this fixed order (:meth:`PretrainBatches.plan`):

1. objects ``i`` (B,): without replacement when ``B <= n``, else with replacement;
2. views ``v1`` (B,) uniform, ``v2 = (v1 + U{1..V-1}) mod V`` (so ``v2 != v1``);
3. negatives ``j = (i + U{1..n-1}) mod n`` (uniform over the other objects, ``j != i``)
   and their views ``v3`` (B,);
4. the point subset (``data.point_subsample: random``: the first ``num_points`` of a
   random permutation per sample; only when the store holds more points);
5. the image crops/flips for img1, img2, img3 (3 x B), then the rotation angles and the
   jitter noise of the clouds (see :mod:`xmodal.train.augment`);
6. only with ``BatchSpec.second_cloud``: the subset, angles and noise of a second copy of
   every cloud;
7. only with ``aug.point_scale`` / ``aug.point_shift`` on: the per-axis scales, then the
   offsets, of every cloud, then (with a second copy) those of the second copies.

A batch therefore depends on ``(seed, s)`` only: not on what ran before, the number
of DataLoader workers, or the number of processes. Process ``r`` of ``W`` takes the
contiguous slice ``[r*B/W, (r+1)*B/W)`` of the global batch, so a distributed run
sees exactly the batches of a single-process run, and a resumed run the batches of
one that never stopped.

:class:`PretrainBatches` is a ``torch.utils.data.Dataset`` whose item ``k`` is the
whole (process-local) batch of step ``start + k``; use it with
``DataLoader(ds, batch_size=None, num_workers=w)`` so workers prefetch whole batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from xmodal.errors import ConfigError, DataError
from xmodal.train.augment import (augment_points, resize_images, sample_crop_params, sample_point_params,
                                  sample_scale_shift, scale_shift_points)
from xmodal.train.config import AugConfig, PretrainConfig

__all__ = ["StepPlan", "BatchSpec", "PretrainBatches", "LABELS"]

#: labels of the pairs (img1, p), (img2, p), (img3, p): same object, same object, other object
LABELS = (1, 1, 0)


@dataclass
class StepPlan:
    """The random choices of one step for the global batch of ``B`` samples.

    objects (B,) int64 i; views (B, 3) int64 (v1, v2 of i; v3 of j); negatives (B,) int64 j;
    point_index (B, num_points) int64 or None; boxes (3, B, 4) float32 crop windows of
    img1..img3; flip (3, B) bool; angles (B,) float32; noise (B, num_points, 3) float32 or None.
    """

    step: int
    objects: np.ndarray
    views: np.ndarray
    negatives: np.ndarray
    point_index: Optional[np.ndarray]
    boxes: np.ndarray
    flip: np.ndarray
    angles: np.ndarray
    noise: Optional[np.ndarray]
    #: (point_index, angles, noise, scale_shift) of the second copy of each cloud (``BatchSpec.second_cloud``)
    second: Optional[tuple] = None
    #: (scales (B, 3), shifts (B, 3)) of each cloud when ``aug.point_scale`` / ``aug.point_shift`` are
    #: on, else None; drawn after everything else, so that turning them on changes no other choice
    scale_shift: Optional[tuple] = None


@dataclass(frozen=True)
class BatchSpec:
    """What a batch holds: the global batch size ``B``, the run seed, points per cloud, image
    side, augmentation (None: none), how clouds are reduced to ``num_points`` ("random" or
    "fps") and whether each sample carries a second, independently augmented copy of its cloud
    (``points2``, for ``loss.point_nce``)."""

    batch_size: int
    seed: int
    num_points: int
    image_size: int
    aug: Optional[AugConfig] = None
    point_subsample: str = "random"
    second_cloud: bool = False

    @classmethod
    def from_config(cls, cfg: PretrainConfig) -> "BatchSpec":
        return cls(batch_size=cfg.batch_size, seed=cfg.seed, num_points=cfg.data.num_points,
                   image_size=cfg.data.image_size, aug=cfg.aug, point_subsample=cfg.data.point_subsample,
                   second_cloud=cfg.loss.point_nce > 0)


def check_training_split(split, spec: "BatchSpec", *, n: int, world_size: int = 1,
                         where: Optional[Any] = None) -> tuple[int, int, int]:
    """Whether ``n`` objects of ``split`` can feed pre-training with ``spec`` on ``world_size``
    processes: at least 2 objects, rendered views (at least 2 per object), enough stored points
    and a batch that divides among the processes. ``where`` (the dataset) is named in the error.

    Returns ``(views per object, stored image size, stored points per object)``.
    Raises :class:`DataError` / :class:`ConfigError`; reads one object's views and points.
    """
    name = getattr(split, "name", "?")
    if n < 2:
        raise DataError(f"split '{name}' has {n} object(s) to train on; pre-training needs at least 2 "
                        "(for negatives)", path=where)
    if not split.has_images:
        raise DataError(f"split '{name}' has no images: pre-training needs rendered views (prepare with "
                        "views >= 2)", path=where)
    first = split.images(0)
    num_views, stored_size = int(first.shape[0]), int(first.shape[1])
    if num_views < 2:
        raise DataError(f"split '{name}' has {num_views} view(s) per object; need >= 2 distinct views", path=where)
    stored_points = int(split.points(0).shape[0])
    if spec.num_points > stored_points:
        raise ConfigError(
            f"data.num_points={spec.num_points} but the dataset stores {stored_points} points per object; "
            f"set data.num_points <= {stored_points}", path=where,
        )
    if world_size < 1:
        raise ValueError(f"bad world_size {world_size}")
    if spec.batch_size % world_size:
        raise ConfigError(
            f"batch_size={spec.batch_size} is not divisible by the number of processes ({world_size}); "
            "choose a global batch size that is a multiple of it"
        )
    return num_views, stored_size, stored_points


class PretrainBatches(torch.utils.data.Dataset):
    """Step-indexed batches of (img1, img2, img3, points, labels) for one process.

    Args:
        split: a :class:`xmodal.data.store.SplitView` with images (the training split).
        spec: what a batch holds (:class:`BatchSpec`: global batch size ``B``, divisible by
            ``world_size``; seed; points per cloud, <= stored points; image side, stored images
            are resized when different; augmentation; "random" = a fresh subset each step or
            "fps" = a fixed farthest-point subset per object; a second copy of each cloud).
        up_axis: the dataset's up axis, for the point rotation.
        start, stop: the steps covered: item ``k`` is step ``start + k``, ``len = stop - start``.
        rank, world_size: this process's slice of the global batch.
        indices: (n,) the object indices of ``split`` to sample from (default: all); the
            plan draws positions among them (``objects`` and ``negatives`` are then
            ``indices[position]``), so with all objects the batches are those of ``None``.

    Item ``k`` is a dict of tensors: ``step`` (int), ``images`` (3, b, S, S[, 3]) uint8
    (img1, img2, img3; un-augmented), ``boxes`` (3, b, 4) float32 and ``flip`` (3, b) bool
    (their crop/flip, applied on the training device by
    :func:`xmodal.train.augment.crop_resize_flip`), ``points`` (b, num_points, 3) float32
    (already rotated and jittered), ``labels`` (b, 3) int64 = (1, 1, 0), ``objects`` (b,),
    ``negatives`` (b,), ``views`` (b, 3), with ``b = B / world_size``; with
    ``spec.second_cloud`` also ``points2`` (b, num_points, 3), each cloud again with its own
    subset, rotation and jitter (drawn after everything else, so the rest of the batch is the same).
    """

    def __init__(
        self,
        split,
        spec: "BatchSpec",
        *,
        up_axis: str = "z",
        start: int = 0,
        stop: int = 1,
        rank: int = 0,
        world_size: int = 1,
        indices: Optional[np.ndarray] = None,
    ) -> None:
        batch_size, seed, num_points, image_size = spec.batch_size, spec.seed, spec.num_points, spec.image_size
        aug, point_subsample = spec.aug, spec.point_subsample
        self.split = split
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.n = int(split.n) if self.indices is None else len(self.indices)
        self.num_views, self.stored_size, self.stored_points = check_training_split(
            split, spec, n=self.n, world_size=world_size
        )
        if not 0 <= rank < world_size:
            raise ValueError(f"bad rank/world_size {rank}/{world_size}")
        if point_subsample not in ("random", "fps"):
            raise ValueError(f"point_subsample must be 'random' or 'fps', got {point_subsample!r}")
        if stop < start:
            raise ValueError(f"stop ({stop}) < start ({start})")
        self.batch_size = int(batch_size)
        self.local_batch = self.batch_size // world_size
        self.seed = int(seed)
        self.num_points = int(num_points)
        self.image_size = int(image_size)
        self.up_axis = up_axis
        self.aug = aug if (aug is not None and aug.enabled) else None
        self.point_subsample = point_subsample
        self.second_cloud = bool(spec.second_cloud)
        self.start, self.stop = int(start), int(stop)
        self.rank, self.world_size = int(rank), int(world_size)
        self._fps_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    # ------------------------------------------------------------------ plan
    def plan(self, step: int) -> StepPlan:
        """The random choices of global step ``step`` for the whole global batch (see module doc)."""
        rng = np.random.default_rng([self.seed, int(step)])
        b, n, nv = self.batch_size, self.n, self.num_views
        objects = rng.choice(n, size=b, replace=b > n).astype(np.int64)
        v1 = rng.integers(0, nv, size=b)
        v2 = (v1 + rng.integers(1, nv, size=b)) % nv
        negatives = (objects + rng.integers(1, n, size=b)) % n
        v3 = rng.integers(0, nv, size=b)
        if self.indices is not None:
            objects, negatives = self.indices[objects], self.indices[negatives]
        views = np.stack([v1, v2, v3], axis=1).astype(np.int64)
        point_index = None
        if self.point_subsample == "random" and self.num_points < self.stored_points:
            point_index = np.argsort(rng.random((b, self.stored_points)), axis=1)[:, : self.num_points]
        if self.aug is not None:
            a = self.aug
            boxes, flip = sample_crop_params(3 * b, scale=a.crop_scale, ratio=a.crop_ratio, hflip_p=a.hflip_p, seed=rng)
            angles, noise = sample_point_params(
                b, self.num_points, rotate=a.rotate, jitter_sigma=a.jitter_sigma, seed=rng
            )
        else:
            boxes = np.tile(np.array([0, 0, 1, 1], np.float32), (3 * b, 1))
            flip = np.zeros(3 * b, dtype=bool)
            angles, noise = np.zeros(b, np.float32), None
        second = self._second_cloud_plan(rng, b) if self.second_cloud else None
        scale_shift = scale_shift2 = None
        if self.aug is not None and self.aug.scales_points:  # drawn last: the draws above stay as they were
            a = self.aug
            scale_shift = sample_scale_shift(b, scale=a.point_scale, shift=a.point_shift, seed=rng)
            if second is not None:
                scale_shift2 = sample_scale_shift(b, scale=a.point_scale, shift=a.point_shift, seed=rng)
        if second is not None:
            second = (*second, scale_shift2)
        return StepPlan(
            step=int(step),
            objects=objects,
            views=views,
            negatives=negatives.astype(np.int64),
            point_index=point_index,
            boxes=boxes.reshape(3, b, 4),
            flip=flip.reshape(3, b),
            angles=angles,
            noise=noise,
            second=second,
            scale_shift=scale_shift,
        )

    def _second_cloud_plan(self, rng: np.random.Generator, b: int) -> tuple:
        """A second, independently subsampled and augmented copy of each cloud: (point_index, angles,
        noise); :meth:`plan` adds its scale and shift (None when those are off)."""
        index = None
        if self.point_subsample == "random" and self.num_points < self.stored_points:
            index = np.argsort(rng.random((b, self.stored_points)), axis=1)[:, : self.num_points]
        if self.aug is None:
            return index, np.zeros(b, np.float32), None
        a = self.aug
        angles, noise = sample_point_params(b, self.num_points, rotate=a.rotate, jitter_sigma=a.jitter_sigma, seed=rng)
        return index, angles, noise

    # ------------------------------------------------------------------ loading
    def _points(self, i: int, index: Optional[np.ndarray]) -> np.ndarray:
        pts = np.asarray(self.split.points(i), dtype=np.float32)
        if index is not None:
            return pts[index]
        if self.num_points == self.stored_points:
            return pts
        # point_subsample == "fps": a fixed farthest-point subset per object, cached per process
        idx = self._fps_cache.get(i)
        if idx is None:
            from xmodal.data.sampling import farthest_point_sampling

            idx = farthest_point_sampling(pts, self.num_points, start_idx=0)
            self._fps_cache[i] = idx
        return pts[idx]

    def batch(self, step: int) -> dict:
        """This process's slice of the batch of global step ``step`` (see the class doc)."""
        p = self.plan(step)
        sl = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        objs, negs, views = p.objects[sl], p.negatives[sl], p.views[sl]
        img12 = [self.split.images(int(i), v[:2]) for i, v in zip(objs, views)]  # each (2, S, S[, 3])
        img3 = [self.split.image(int(j), int(v[2])) for j, v in zip(negs, views)]
        images = np.stack(
            [np.stack([x[0] for x in img12]), np.stack([x[1] for x in img12]), np.stack(img3)]
        )  # (3, b, S, S[, 3])
        if self.stored_size != self.image_size:
            flat = images.reshape((-1,) + images.shape[2:])
            images = resize_images(flat, self.image_size).reshape((3, len(objs)) + (self.image_size,) * 2 + images.shape[4:])
        points = self._clouds(objs, p.point_index, p.angles, p.noise, p.scale_shift, sl)
        b = len(objs)
        extra = {}
        if p.second is not None:
            extra["points2"] = self._clouds(objs, *p.second, sl)
        return {
            **extra,
            "step": int(step),
            "images": torch.from_numpy(np.ascontiguousarray(images)),
            "boxes": torch.from_numpy(np.ascontiguousarray(p.boxes[:, sl])),
            "flip": torch.from_numpy(np.ascontiguousarray(p.flip[:, sl])),
            "points": points,
            "labels": torch.tensor([LABELS] * b, dtype=torch.int64),
            "objects": torch.from_numpy(objs.copy()),
            "negatives": torch.from_numpy(negs.copy()),
            "views": torch.from_numpy(views.copy()),
        }

    def _clouds(self, objs, point_index, angles, noise, scale_shift, sl) -> torch.Tensor:
        """The clouds of ``objs`` with this process's slice ``sl`` of a plan's subsets and augmentations."""
        pidx = point_index[sl] if point_index is not None else [None] * len(objs)
        points = torch.from_numpy(np.stack([self._points(int(i), ix) for i, ix in zip(objs, pidx)]))
        if self.aug is None:
            return points.contiguous()
        points = augment_points(points, angles[sl], noise[sl] if noise is not None else None, up_axis=self.up_axis,
                                sigma=self.aug.jitter_sigma, clip=self.aug.jitter_clip)
        if scale_shift is not None:
            points = scale_shift_points(points, scale_shift[0][sl], scale_shift[1][sl])
        return points.contiguous()

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < len(self):
            raise IndexError(f"batch index {k} out of range [0, {len(self)})")
        return self.batch(self.start + k)
