"""Frozen features of a run's encoders on a dataset split, with a cache.

Every evaluation task works on *global* features of the frozen encoders:

* 3D: ``Fp(points)`` — one 512-d vector per object (:func:`point_features`): Fp on a seeded
  subset of the stored cloud of the size trained on, or (``subsets > 1``, beyond the paper) the
  mean of Fp over several such subsets, consecutive blocks of one permutation of the cloud;
* 2D: ``Fimg(view)`` for ``v`` seeded-random distinct stored views per object
  (:func:`view_features`), max-pooled over the views into one vector per object
  (:func:`pool_views`, Sec. 4.3 of the paper: "each extracted feature for 2D
  recognition task is max pooled from v extracted features of v random views").

The views of object ``i`` are the first ``v`` entries of a permutation of its
``V`` stored views drawn from ``numpy.random.default_rng((seed, i))``. Because
the permutation does not depend on ``v``, the views for a smaller ``v`` are a
prefix of those for a larger one: features computed once for the largest ``v``
serve every smaller ``v`` (and each prefix is itself a uniformly random subset
of ``v`` distinct views). ``v`` is capped at the dataset's ``V``.

:class:`FeatureCache` memoises both per split so that the SVM, retrieval,
few-shot, cross-modal and t-SNE tasks never run an encoder twice.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from xmodal.errors import DataError
from xmodal.utils.device import default_device

__all__ = [
    "view_indices",
    "clouds_subsampled",
    "subsample_points",
    "point_features",
    "view_features",
    "pool_views",
    "effective_views",
    "FeatureCache",
]

log = logging.getLogger(__name__)


def effective_views(views: Sequence[int], available: int) -> list[int]:
    """View counts actually usable on a dataset with ``available`` stored views.

    Each requested ``v`` is capped at ``available`` and duplicates are removed,
    so ``(1, 12, 36, 80)`` on a 20-view dataset gives ``[1, 12, 20]`` ("as many
    views as the dataset has" stands in for the missing larger counts).
    Returns ``[]`` when the dataset has no images.
    """
    if available <= 0:
        return []
    out: list[int] = []
    for v in views:
        v = int(v)
        if v < 1:
            raise ValueError(f"view counts must be >= 1, got {v}")
        v = min(v, int(available))
        if v not in out:
            out.append(v)
    return sorted(out)


def view_indices(n: int, num_stored: int, v: int, *, seed: int = 0) -> np.ndarray:
    """Seeded random distinct view indices per object: ``(n, v)`` int64.

    Row ``i`` is the first ``v`` entries of a permutation of ``range(num_stored)``
    drawn from ``default_rng((seed, i))``; rows for a smaller ``v`` are prefixes
    of the rows for a larger one. ``v`` must not exceed ``num_stored``.
    """
    if not 1 <= v <= num_stored:
        raise ValueError(f"need 1 <= v <= {num_stored} stored views, got v={v}")
    out = np.empty((n, v), dtype=np.int64)
    for i in range(n):
        out[i] = np.random.default_rng((int(seed), i)).permutation(num_stored)[:v]
    return out


def clouds_subsampled(stored: int, num_points: Optional[int]) -> bool:
    """Whether clouds of ``stored`` points are reduced to ``num_points`` before Fp sees them: only
    when they hold more (the rule of :func:`subsample_points` and :func:`point_features`; ``None``:
    no reduction asked)."""
    return num_points is not None and int(num_points) < int(stored)


def subsample_points(points: np.ndarray, num_points: int, *, seed: int = 0, start: int = 0,
                     subset: int = 0) -> np.ndarray:
    """Seeded random subset of ``num_points`` points per cloud: (n, N, 3) -> (n, num_points, 3).

    Row ``r`` is object ``i = start + r`` (``start``: the index of the first row in the split,
    for a block of a split). With ``perm = default_rng((seed, i)).permutation(N)`` it keeps the
    points ``perm[(subset * num_points + j) % N]`` for ``j < num_points`` (in increasing order):
    subset 0 is ``perm[:num_points]``, and subsets ``0 .. ceil(N / num_points) - 1`` are
    consecutive blocks of the same permutation that together hold every point (disjoint when
    ``num_points`` divides ``N``; the last one wraps around to the start otherwise). A split
    subsampled block by block equals the split subsampled whole. Clouds with
    ``N <= num_points`` are returned unchanged.
    """
    n, total = points.shape[:2]
    if not clouds_subsampled(total, num_points):
        return points
    if subset < 0:
        raise ValueError(f"subset must be >= 0, got {subset}")
    take = (int(subset) * int(num_points) + np.arange(int(num_points))) % total
    rows = range(int(start), int(start) + n)
    keep = np.stack([np.sort(np.random.default_rng((int(seed), i)).permutation(total)[take]) for i in rows])
    return np.take_along_axis(points, keep[:, :, None], axis=1)


def point_features(
    run,
    split,
    *,
    batch_size: int = 32,
    device: Any = None,
    num_points: Optional[int] = None,
    seed: int = 0,
    subsets: int = 1,
    progress: bool = False,
) -> np.ndarray:
    """Global point features of every object of ``split``: ``(n, 512)`` float32.

    run: a :class:`xmodal.api.LoadedRun` (its ``point_encoder`` is used as is,
    in eval mode); split: a :class:`xmodal.data.store.SplitView`.
    ``num_points`` (default: ``run.num_points``, the size trained on): clouds
    with more stored points are reduced to a seeded random subset of that size
    (:func:`subsample_points`), so that DGCNN's k-NN graph has the density it
    was trained with; clouds with fewer points are used as stored.

    ``subsets`` (beyond the paper, which encodes one cloud per object): the feature is the mean
    of Fp over subsets ``0 .. subsets - 1`` of :func:`subsample_points` (2 subsets of a 1,024-point
    cloud at 512 points use every point once); it costs ``subsets`` encodings per object. With no
    subsampling (the cloud is not larger than ``num_points``) every subset is the whole cloud and
    Fp runs once.

    The clouds are read block by block (``16 * batch_size`` objects,
    :meth:`~xmodal.data.store.SplitView.points_range`): only one block of
    points is in memory at a time, whatever the size of the split.
    """
    from xmodal.api import extract_point_features

    device = default_device(device)
    subsets = int(subsets)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    n = split.n
    if n == 0:
        raise DataError(f"split '{split.name}' is empty: no features to compute")
    if num_points is None:
        num_points = getattr(run, "num_points", None)
    feats: Optional[np.ndarray] = None
    # encode in blocks of objects: one block of clouds in memory at a time, and a progress bar can advance
    block = max(batch_size, 1) * 16
    it = range(0, n, block)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"3D features ({split.name})", leave=False, total=-(-n // block))
    for s in it:
        pts = split.points_range(s, s + block)
        if not clouds_subsampled(pts.shape[1], num_points):
            f = extract_point_features(run.point_encoder, pts, batch_size=batch_size, device=device)
        else:
            f = None
            for j in range(subsets):  # a running sum: one subset's features in memory at a time
                sub = subsample_points(pts, int(num_points), seed=seed, start=s, subset=j)
                fj = extract_point_features(run.point_encoder, sub, batch_size=batch_size, device=device)
                f = fj if f is None else f + fj
            if subsets > 1:
                f = f / np.float32(subsets)
        if feats is None:  # the output, filled block by block (no list of blocks to concatenate)
            feats = np.empty((n,) + f.shape[1:], dtype=np.float32)
        feats[s : s + len(f)] = f
    return feats


def view_features(
    run,
    split,
    views: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    device: Any = None,
    num_stored: Optional[int] = None,
    progress: bool = False,
) -> np.ndarray:
    """Image features of ``v`` seeded-random distinct views per object: ``(n, v, 512)`` float32.

    ``v = min(views, V)`` where ``V`` is the number of stored views (``num_stored``,
    read from the first object when not given); the views are
    :func:`view_indices` ``(n, V, v, seed=seed)``. Images are streamed through
    ``run.image_encoder`` in batches of ``batch_size``.
    """
    from xmodal.api import extract_image_features

    device = default_device(device)
    n = split.n
    if n == 0:
        raise DataError(f"split '{split.name}' is empty: no features to compute")
    if not split.has_images:
        raise DataError(f"split '{split.name}' has no images (a points-only dataset): no 2D features")
    if num_stored is None:
        num_stored = int(split.images(0).shape[0])
    v = min(int(views), int(num_stored))
    if v < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    idx = view_indices(n, num_stored, v, seed=seed)
    feats: Optional[np.ndarray] = None  # the output, filled as the buffered objects are encoded
    buf: list[np.ndarray] = []
    buffered = first = 0
    # objects per encoder call: whole objects, about batch_size*4 images at once
    # (extract_image_features batches internally; this only bounds memory)
    target = max(batch_size, 1) * 4
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"2D features ({split.name}, {v} views)", leave=False)
    for i in it:
        buf.append(split.images(i, idx[i]))
        buffered += v
        if buffered >= target or i == n - 1:
            f = extract_image_features(run.image_encoder, np.concatenate(buf), batch_size=batch_size, device=device)
            if feats is None:
                feats = np.empty((n, v) + f.shape[1:], dtype=np.float32)
            feats[first : i + 1] = f.reshape((i + 1 - first, v) + f.shape[1:])
            buf, buffered, first = [], 0, i + 1
    return feats


def pool_views(feats: np.ndarray, v: int) -> np.ndarray:
    """Max-pool the first ``v`` views: feats ``(n, V', D)`` -> ``(n, D)``.

    ``v = 1`` returns the single first view (no pooling). ``v`` must not exceed
    ``V'``, the number of views in ``feats``.
    """
    feats = np.asarray(feats)
    if feats.ndim != 3:
        raise ValueError(f"feats must be (n, v, D), got shape {feats.shape}")
    if not 1 <= v <= feats.shape[1]:
        raise ValueError(f"cannot pool {v} views from features of {feats.shape[1]} views")
    if v == 1:
        return feats[:, 0].copy()
    return feats[:, :v].max(axis=1)


class FeatureCache:
    """Memoised frozen features of one run on one dataset.

    ``points(split_name) -> (n, 512)`` (:func:`point_features` with ``point_subsets`` subsets);
    ``views(split_name, v) -> (n, v, 512)``.
    View features are kept once per split at the largest ``v`` asked so far;
    a smaller ``v`` is served as a prefix (see the module docstring), a larger
    one recomputes and replaces the entry.
    """

    def __init__(
        self,
        run,
        store,
        *,
        seed: int = 0,
        device: Any = None,
        point_batch_size: int = 32,
        image_batch_size: int = 64,
        point_subsets: int = 1,
        progress: bool = False,
    ):
        self.run = run
        self.store = store
        self.seed = int(seed)
        self.point_subsets = int(point_subsets)
        self.device = default_device(device)
        self.point_batch_size = point_batch_size
        self.image_batch_size = image_batch_size
        self.progress = progress
        self._points: dict[str, np.ndarray] = {}
        self._views: dict[str, np.ndarray] = {}

    @property
    def num_views(self) -> int:
        """Stored views per object (0 on a points-only dataset)."""
        return int(self.store.views) if self.store.has_images else 0

    def labels(self, split: str) -> np.ndarray:
        return self.store.split(split).labels

    def points(self, split: str) -> np.ndarray:
        if split not in self._points:
            log.info("computing 3D features of split '%s'", split)
            self._points[split] = point_features(
                self.run,
                self.store.split(split),
                batch_size=self.point_batch_size,
                device=self.device,
                seed=self.seed,
                subsets=self.point_subsets,
                progress=self.progress,
            )
        return self._points[split]

    def views(self, split: str, v: int) -> np.ndarray:
        if self.num_views == 0:
            raise DataError("this dataset has no images (points only): no 2D features")
        v = min(int(v), self.num_views)
        cached = self._views.get(split)
        if cached is None or cached.shape[1] < v:
            log.info("computing 2D features of split '%s' (%d views per object)", split, v)
            cached = view_features(
                self.run,
                self.store.split(split),
                v,
                seed=self.seed,
                batch_size=self.image_batch_size,
                device=self.device,
                num_stored=self.num_views,
                progress=self.progress,
            )
            self._views[split] = cached
        return cached[:, :v]

    def pooled(self, split: str, v: int) -> np.ndarray:
        """Max-pooled 2D features of ``v`` views: ``(n, 512)``."""
        return pool_views(self.views(split, v), min(int(v), self.num_views))
