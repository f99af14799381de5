"""Hand-crafted shape descriptors: non-learned references for the retrieval task.

:func:`d2_descriptor` is the D2 shape distribution of Osada, Funkhouser, Chazelle & Dobkin
("Shape distributions", ACM TOG 2002): the histogram of the distances between random pairs
of surface points. Here the surface points are the dataset's stored point clouds (already
sampled area-uniformly from each mesh and normalised into the unit sphere: centred on their
mean, largest norm 1), so no further scale normalisation is applied: every pair distance
lies in [0, 2] and the histogram has ``bins`` equal bins over that fixed range (a distance
beyond 2, from a cloud outside the unit sphere, counts in the last bin). Each histogram is
divided by the number of pairs, so it sums to 1.

The pairs are the same ``pairs`` index pairs ``(i, j)``, ``i != j``, drawn once from
``seed`` for every cloud, taken after sorting each cloud's points lexicographically: the
descriptor is a function of the point *set* and the seed only (independent of the point
order and of which other clouds are in the batch). It is invariant to rotations and
reflections up to the sampling noise of the pairs, and exactly so with ``pairs=None``
(every distinct pair).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["D2_BINS", "D2_PAIRS", "D2_RANGE", "d2_descriptor"]

#: default number of histogram bins
D2_BINS = 64
#: default number of random point pairs per cloud
D2_PAIRS = 65536
#: the histogram covers distances in [0, D2_RANGE]: the diameter of the unit sphere
D2_RANGE = 2.0
#: pair coordinates processed at once (float64 values), bounding memory
_BLOCK_VALUES = 1 << 21


def _pair_indices(n_points: int, pairs: Optional[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(i, j)`` index arrays of the point pairs: ``pairs`` seeded uniform pairs with
    ``i != j``, or every pair ``i < j`` when ``pairs`` is None."""
    if pairs is None:
        return np.triu_indices(n_points, k=1)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n_points, size=int(pairs))
    j = (i + rng.integers(1, n_points, size=int(pairs))) % n_points  # uniform over the other points
    return i, j


def _sorted_points(block: np.ndarray) -> np.ndarray:
    """Each cloud of ``block`` (b, N, 3) with its points in lexicographic (x, y, z) order."""
    order = np.lexsort((block[..., 2], block[..., 1], block[..., 0]), axis=-1)
    return np.take_along_axis(block, order[..., None], axis=1)


def d2_descriptor(points, *, bins: int = D2_BINS, pairs: Optional[int] = D2_PAIRS, seed: int = 0) -> np.ndarray:
    """D2 shape distribution of each point cloud (normalisation: module doc).

    Args:
        points: (n, N, 3) point clouds in the unit sphere, N >= 2.
        bins: histogram bins over distances [0, 2].
        pairs: random point pairs per cloud (the same index pairs for every cloud), or None
            for all N (N - 1) / 2 distinct pairs (exact; ``seed`` unused).
        seed: seed of the pair choice.

    Returns:
        (n, bins) float64 histograms, each summing to 1.
    """
    pts = np.asarray(points)  # converted to float64 one block at a time, not whole
    if pts.ndim != 3 or pts.shape[2] != 3 or pts.shape[1] < 2:
        raise ValueError(f"points must be (n, N, 3) with N >= 2, got shape {pts.shape}")
    if int(bins) < 1 or (pairs is not None and int(pairs) < 1):
        raise ValueError(f"bins and pairs must be >= 1, got bins={bins}, pairs={pairs}")
    n, n_points, bins = pts.shape[0], pts.shape[1], int(bins)
    i, j = _pair_indices(n_points, pairs, seed)
    per_block = max(1, _BLOCK_VALUES // (3 * len(i)))
    out = np.empty((n, bins), dtype=np.float64)
    for s in range(0, n, per_block):
        block = np.asarray(pts[s : s + per_block], dtype=np.float64)
        if not np.isfinite(block).all():
            raise ValueError("points contain NaN or infinity")
        block = _sorted_points(block)
        dist = np.linalg.norm(block[:, i] - block[:, j], axis=2)  # (b, pairs)
        idx = np.minimum((dist * (bins / D2_RANGE)).astype(np.int64), bins - 1)
        idx += bins * np.arange(block.shape[0])[:, None]  # one histogram per cloud in one bincount
        counts = np.bincount(idx.ravel(), minlength=block.shape[0] * bins).reshape(block.shape[0], bins)
        out[s : s + block.shape[0]] = counts / len(i)
    return out
