"""Point sampling on mesh surfaces: area-weighted surface samples and exact farthest point
sampling (FPS) (paper §3.1, "Point cloud sampling").

The point cloud of an object is made as in PointNet++: draw ``oversample * N``
points uniformly on the surface (area-weighted), pick ``N`` of them by greedy
farthest point sampling from a random start, and normalise the result into the unit
sphere (centre = mean, farthest point at distance 1;
:func:`xmodal.data.geometry.normalize_unit_sphere`).

The mesh functions take a :class:`~xmodal.data.types.Mesh` (valid by construction; a
``(vertices, faces)`` pair is turned into one). All functions are numpy-level and
deterministic given ``seed``.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from xmodal.data.geometry import face_areas, normalize_unit_sphere
from xmodal.data.types import Mesh, PointCloud, as_mesh

__all__ = [
    "sample_surface",
    "farthest_point_sampling",
    "farthest_point_sampling_reference",
    "sample_mesh_points",
    "sample_point_cloud",
]

logger = logging.getLogger(__name__)


def sample_surface(mesh: Mesh, n: int, *, seed=None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` points uniformly (area-weighted) on a triangle mesh surface.

    Args:
        mesh: a :class:`~xmodal.data.types.Mesh` (or a ``(vertices, faces)`` pair, validated
            into one), ``vertices`` (V, 3), ``faces`` (F, 3).
        n: number of points.
        seed: anything :func:`numpy.random.default_rng` accepts.

    Returns:
        ``points (n, 3)`` float64 and ``face_index (n,)`` int64, the face of ``mesh.faces``
        each point lies on.

    Raises:
        ValueError: ``n < 0``. MeshError (a ValueError): a pair that is not a valid mesh.
    """
    # Plain numpy rather than trimesh.sample.sample_surface: that one draws its random
    # numbers in another order (so the points of every prepared dataset would change for
    # the same seed) and needs a Trimesh built first.
    mesh = as_mesh(mesh)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    vertices, faces = mesh.vertices, mesh.faces
    cum = np.cumsum(face_areas(vertices, faces))
    total = cum[-1]  # > 0: a Mesh has no degenerate face
    rng = np.random.default_rng(seed)
    # inverse-CDF face choice: face i takes the draws in [cum[i - 1], cum[i])
    face_index = np.searchsorted(cum, rng.random(n) * total, side="right")
    np.minimum(face_index, len(faces) - 1, out=face_index)
    u, v = rng.random((2, n))
    flip = u + v > 1.0  # reflect into the triangle: uniform barycentric coordinates
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    tri = vertices[faces[face_index]]
    points = tri[:, 0] + u[:, None] * (tri[:, 1] - tri[:, 0]) + v[:, None] * (tri[:, 2] - tri[:, 0])
    return points, face_index.astype(np.int64)


def _check_points(points, n: int) -> np.ndarray:
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"points must have shape (M, D) with M, D >= 1, got {points.shape}")
    if not np.issubdtype(points.dtype, np.number):
        raise ValueError(f"points must be numeric, got dtype {points.dtype}")
    if not np.all(np.isfinite(points)):
        raise ValueError("points contain NaN or infinite coordinates")
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n}")
    if n > len(points):
        raise ValueError(f"cannot pick n={n} points out of M={len(points)}")
    return points


def farthest_point_sampling(points, n: int, *, start_idx: Optional[int] = None, seed=None) -> np.ndarray:
    """Exact greedy max-min farthest point sampling.

    Starting from ``start_idx`` (drawn from ``seed`` when None), repeatedly pick the point
    whose distance to the already picked set is largest.  Runs the compiled ``fpsample``
    implementation; :func:`farthest_point_sampling_reference` is the plain numpy version
    it agrees with (fpsample computes in float32, so where two candidates are equally far
    to float32 precision the pick may differ from the float64 reference; the max-min
    distances do not).

    Duplicate input points are handled by sampling among unique locations (a location is
    represented by the first index where it occurs, or by ``start_idx`` for the start), so
    the result never contains the same location twice.

    Args:
        points: ``(M, D)`` coordinates.
        n: number of indices to return, ``0 <= n <= number of unique points``.
        start_idx: index of the first point, or None for a random one.
        seed: seed for the random start (ignored when ``start_idx`` is given).

    Returns:
        ``(n,)`` int64 distinct indices into ``points``, in selection order.

    Raises:
        ValueError: bad shape, non-finite values, ``start_idx`` out of range, or ``n``
            larger than the number of unique points.
    """
    points = _check_points(points, n)
    m = len(points)
    if start_idx is None:
        start_idx = int(np.random.default_rng(seed).integers(m))
    elif not (0 <= int(start_idx) < m):
        raise ValueError(f"start_idx={start_idx} out of range [0, {m})")
    start_idx = int(start_idx)
    n = int(n)
    if n == 0:
        return np.zeros(0, dtype=np.int64)

    # fpsample works in float32; centring first keeps precision for far-off coordinates
    # (FPS is translation invariant).  Deduplicate on exactly what fpsample sees.
    p64 = points.astype(np.float64, copy=False)
    pc = np.ascontiguousarray(p64 - p64.mean(axis=0), dtype=np.float32)
    _, first, inverse = np.unique(pc, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(first) < m:
        if n > len(first):
            raise ValueError(
                f"cannot pick n={n} distinct points: only {len(first)} unique points among M={m}"
            )
        order = np.argsort(first)  # keep the original order of first occurrences
        keep = first[order]
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        local_start = int(rank[inverse[start_idx]])
        keep[local_start] = start_idx
        pc = np.asfortranarray(pc[keep])
    else:
        keep = None
        local_start = start_idx
        pc = np.asfortranarray(pc)

    fpsample = _fpsample()
    idx = np.asarray(fpsample.fps_sampling(pc, n, start_idx=local_start), dtype=np.int64)
    if len(np.unique(idx)) != n:
        # Only possible when distinct points are closer than float32 can resolve.
        logger.warning("fpsample returned repeated indices; falling back to the float64 reference FPS")
        idx = farthest_point_sampling_reference(p64 if keep is None else p64[keep], n, start_idx=local_start)
    return idx if keep is None else keep[idx].astype(np.int64)


def _fpsample():
    from xmodal.utils.optional import require

    return require("fpsample", "farthest point sampling")


def farthest_point_sampling_reference(points, n: int, start_idx: int = 0) -> np.ndarray:
    """Plain numpy O(n M) greedy farthest point sampling (the obvious version).

    Keeps the squared distance of every point to the picked set and picks the arg-max
    (lowest index on ties); already picked points are excluded.

    Args:
        points: ``(M, D)`` coordinates.
        n: number of indices, ``n <= M``.
        start_idx: index of the first point.

    Returns:
        ``(n,)`` int64 distinct indices in selection order.
    """
    points = _check_points(points, n).astype(np.float64)
    if not (0 <= start_idx < len(points)):
        raise ValueError(f"start_idx={start_idx} out of range [0, {len(points)})")
    out = np.empty(int(n), dtype=np.int64)
    if n == 0:
        return out
    dist = np.full(len(points), np.inf)
    cur = int(start_idx)
    for k in range(int(n)):
        out[k] = cur
        dist = np.minimum(dist, ((points - points[cur]) ** 2).sum(axis=1))
        dist[out[: k + 1]] = -np.inf
        cur = int(np.argmax(dist))
    return out


def sample_mesh_points(mesh: Mesh, n_points: int, *, oversample: int = 8, seed=None) -> tuple[np.ndarray, np.ndarray]:
    """Surface samples -> FPS, in the mesh's own coordinates (not normalised).

    Draws ``oversample * n_points`` area-weighted surface samples and picks ``n_points``
    of them by farthest point sampling from a random start (``oversample == 1`` skips FPS).

    Args:
        mesh: a :class:`~xmodal.data.types.Mesh` (or a ``(vertices, faces)`` pair).
        n_points: N, points to return.
        oversample: candidates per output point (``>= 1``).
        seed: seed of the surface sampling and the FPS start.

    Returns:
        ``points (N, 3)`` float64 and ``face_index (N,)`` int64, the face each point lies on.
    """
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    if isinstance(seed, np.random.Generator):
        seed_surface = seed_fps = seed
    else:
        ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        seed_surface, seed_fps = ss.spawn(2)
    pts, face_index = sample_surface(mesh, int(n_points) * int(oversample), seed=seed_surface)
    if oversample > 1:
        idx = farthest_point_sampling(pts, n_points, seed=seed_fps)
        pts, face_index = pts[idx], face_index[idx]
    return pts, face_index


def sample_point_cloud(mesh: Mesh, n_points: int = 2048, *, oversample: int = 8, seed=None) -> PointCloud:
    """Sample a mesh into a normalised point cloud: surface samples -> FPS -> unit sphere.

    :func:`sample_mesh_points`, then :func:`normalize_unit_sphere`. Part labels follow the
    faces the points lie on.

    Args:
        mesh: a :class:`~xmodal.data.types.Mesh` (``face_labels`` optional; or a
            ``(vertices, faces)`` pair).
        n_points: N, points in the cloud.
        oversample: candidates per output point (``>= 1``; 1 skips FPS).
        seed: seed of the surface sampling and the FPS start.

    Returns:
        :class:`~xmodal.data.types.PointCloud` with ``points (N, 3)`` float32 (max norm 1)
        and ``point_labels (N,)`` int64 when the mesh has ``face_labels``.
    """
    mesh = as_mesh(mesh)
    pts, face_index = sample_mesh_points(mesh, n_points, oversample=oversample, seed=seed)
    pts, _, _ = normalize_unit_sphere(pts)
    labels = None if mesh.face_labels is None else mesh.face_labels[face_index]
    return PointCloud(points=pts.astype(np.float32), point_labels=labels)
