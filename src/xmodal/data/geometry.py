"""Geometry of triangle meshes and point clouds, shared by every data module (numpy-level).

* per face: :func:`face_cross` (edge cross products), :func:`face_areas`,
  :func:`face_normals`, :func:`face_centers`, :func:`degenerate_faces`;
* per surface: :func:`area_weighted_centroid`, the mean of the face centres weighted by face
  area (paper §3.1: the point the cameras look at);
* per point cloud: :func:`normalize_unit_sphere` (centre on the mean, farthest point at
  distance 1), for one cloud or a batch;
* the up-axis table: :data:`UP_AXES`, :func:`up_axis_index`, :func:`up_axis_rotation`,
  :func:`from_z_up`, :func:`to_z_up`.

The mesh functions take plain arrays, ``vertices`` (V, 3) and ``faces`` (F, 3) integer
indices in ``[0, V)`` (the arrays of a :class:`~xmodal.data.types.Mesh`, validated when the
mesh was built), and do not check them again.

Why numpy by hand rather than trimesh (``trimesh.Trimesh(v, f, process=False).area_faces``,
``.face_normals``, ``.triangles_center``): trimesh does the same job, but

* it is slower for our use, because each mesh must first become a ``Trimesh``: areas of a
  30,730-face ModelNet mesh take 6.3 ms through trimesh against 2.0 ms here (areas, normals
  and centres together: 10.7 ms);
* its cross product uses the edges ``(b - a) x (c - b)``, ours ``(b - a) x (c - a)``; the
  two agree only to the last bits, and prepared datasets depend on these exact bits: the
  rendered images go through the centroid and the surface samples through the areas. Even
  taking the row lengths with ``np.linalg.norm`` instead of the ``einsum`` below changes the
  float32 vertex data sent to the renderer on 25 of 604 real and built-in meshes. So every
  length here is :func:`_row_norms`, the formula the datasets were prepared with.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = [
    "UP_AXES",
    "DEGENERATE_REL_AREA",
    "up_axis_index",
    "up_axis_rotation",
    "from_z_up",
    "to_z_up",
    "face_cross",
    "face_areas",
    "face_normals",
    "face_centers",
    "degenerate_faces",
    "area_weighted_centroid",
    "normalize_unit_sphere",
    "vertex_normals_from",
]

#: names of the axes a source may call "up", in index order
UP_AXES = ("x", "y", "z")

#: a face whose area is at most this times the square of the mesh's extent (the largest side
#: of its bounding box) is degenerate: below floating-point noise at the mesh's own scale
DEGENERATE_REL_AREA = 1e-12


# --------------------------------------------------------------------------- up axis


def up_axis_index(up_axis: str) -> int:
    """Index (0, 1, 2) of ``up_axis`` (``"x"``, ``"y"`` or ``"z"``); ValueError otherwise."""
    if up_axis not in UP_AXES:
        raise ValueError(f"up_axis must be one of 'x', 'y', 'z', got {up_axis!r}")
    return UP_AXES.index(up_axis)


def _z_up_order(up_axis: str) -> list[int]:
    """World axis ``j`` takes z-up axis ``order[j]``: the cyclic permutation taking z to ``up_axis``."""
    k = up_axis_index(up_axis)
    return [(j - k - 1) % 3 for j in range(3)]


def up_axis_rotation(up_axis: str) -> np.ndarray:
    """(3, 3) float64 rotation ``R`` taking z-up coordinates to the frame whose up axis is
    ``up_axis``: ``world = R @ zup``.

    A cyclic permutation of the axes, so a proper rotation (det +1, no mirroring): for
    ``"y"``, world (x, y, z) = z-up (y, z, x); for ``"z"`` the identity.
    """
    return np.eye(3)[_z_up_order(up_axis)]


def from_z_up(coords, up_axis: str) -> np.ndarray:
    """``coords`` (..., 3) given in a z-up frame, in the frame whose up axis is ``up_axis``
    (``coords @ up_axis_rotation(up_axis).T``, as an exact reordering of the last axis)."""
    return np.asarray(coords)[..., _z_up_order(up_axis)]


def to_z_up(coords, up_axis: str) -> np.ndarray:
    """The inverse of :func:`from_z_up`: ``coords`` (..., 3) with up axis ``up_axis`` in the
    z-up frame (the up coordinate becomes the last one)."""
    return np.asarray(coords)[..., np.argsort(_z_up_order(up_axis))]


# --------------------------------------------------------------------------- faces


def _row_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean length of each row of ``x`` (n, 3): the one length formula of this module."""
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def face_cross(vertices, faces) -> np.ndarray:
    """Cross products ``(b - a) x (c - a)`` of each face ``(a, b, c)``.

    Args:
        vertices: (V, 3) coordinates.
        faces: (F, 3) vertex indices.

    Returns:
        (F, 3) float64: normal to the face (right-hand rule on the corner order), length
        twice the face's area.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    e1, e2 = b - a, c - a
    # written out: the same values as np.cross, about 2x faster on (F, 3) arrays
    out = np.empty_like(e1)
    out[:, 0] = e1[:, 1] * e2[:, 2] - e1[:, 2] * e2[:, 1]
    out[:, 1] = e1[:, 2] * e2[:, 0] - e1[:, 0] * e2[:, 2]
    out[:, 2] = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    return out


def face_areas(vertices, faces, *, cross: Optional[np.ndarray] = None) -> np.ndarray:
    """Area of each face.

    Args:
        vertices: (V, 3) coordinates.
        faces: (F, 3) vertex indices.
        cross: the (F, 3) :func:`face_cross` of the same faces, when already computed.

    Returns:
        (F,) float64 areas (0 for a degenerate face).
    """
    if cross is None:
        cross = face_cross(vertices, faces)
    return 0.5 * _row_norms(cross)


def face_normals(vertices, faces) -> np.ndarray:
    """Unit normal of each face (right-hand rule on the corner order).

    Args:
        vertices: (V, 3) coordinates.
        faces: (F, 3) vertex indices.

    Returns:
        (F, 3) float64 unit vectors; ``(0, 0, 0)`` for a zero-area face.
    """
    cross = face_cross(vertices, faces)
    length = _row_norms(cross)
    out = np.zeros_like(cross)
    ok = length > 0
    out[ok] = cross[ok] / length[ok, None]
    return out


def _corner_sums(vertices, faces) -> np.ndarray:
    """(F, 3) sum of each face's three corners (three times its centre)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    out = vertices[faces[:, 0]]
    out += vertices[faces[:, 1]]
    out += vertices[faces[:, 2]]
    return out


def face_centers(vertices, faces) -> np.ndarray:
    """Centre (mean of the three corners) of each face: (F, 3) float64."""
    return _corner_sums(vertices, faces) / 3.0


def degenerate_faces(vertices, faces, *, areas: Optional[np.ndarray] = None, rel_area: float = DEGENERATE_REL_AREA) -> np.ndarray:
    """Which faces are degenerate: they repeat a vertex, or their area is at most
    ``rel_area * extent**2`` (``extent``: the largest side of the bounding box of the vertices
    the faces use; units vary wildly between files, so the threshold follows the mesh's own
    scale, and a stray vertex on no face, however far, does not move it).

    Args:
        vertices: (V, 3) coordinates, V >= 1.
        faces: (F, 3) vertex indices.
        areas: the (F,) :func:`face_areas`, when already computed.
        rel_area: the relative area threshold.

    Returns:
        (F,) bool, True for a degenerate face.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    if areas is None:
        areas = face_areas(vertices, faces)
    used = np.zeros(len(vertices), dtype=bool)
    used[faces.reshape(-1)] = True
    used = vertices[used] if used.any() else vertices
    extent = float((used.max(axis=0) - used.min(axis=0)).max())
    repeated = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])
    return repeated | ~(areas > rel_area * extent**2)


def area_weighted_centroid(vertices, faces, *, areas: Optional[np.ndarray] = None) -> np.ndarray:
    """Centroid of the surface: ``sum_f A_f c_f / sum_f A_f`` with ``c_f`` the centre of face
    ``f`` and ``A_f`` its area (paper §3.1, the point the cameras look at).

    Args:
        vertices: (V, 3) coordinates.
        faces: (F, 3) vertex indices.
        areas: the (F,) :func:`face_areas`, when already computed.

    Returns:
        (3,) float64.

    Raises:
        ValueError: zero (or non-finite) total area.
    """
    if areas is None:
        areas = face_areas(vertices, faces)
    total = areas.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("zero (or non-finite) total surface area: the centroid is undefined")
    # the corner sums are 3 c_f: one division by 3 at the end instead of one per face
    return (areas @ _corner_sums(vertices, faces)) / (3.0 * total)


# --------------------------------------------------------------------------- point clouds


def normalize_unit_sphere(points, *, strict: bool = True):
    """Centre each cloud on its mean and scale it so its farthest point has norm 1.

    Args:
        points: (N, D) one cloud, or (..., N, D) a batch of clouds.
        strict: raise when all points of a cloud coincide; when False such a cloud is only
            centred (scale 1).

    Returns:
        ``(normalised, center, scale)`` with ``normalised = (points - center) / scale``:
        ``normalised`` the shape of ``points`` (floating inputs keep their dtype, integer
        inputs become float64; computed in float64), ``center`` (..., D) float64 and
        ``scale`` a float for one cloud, a (...,) float64 array for a batch.

    Raises:
        ValueError: fewer than 2 dimensions, no points, NaN or infinite values, or (with
            ``strict``) a cloud whose points all coincide.
    """
    points = np.asarray(points)
    if points.ndim < 2 or points.shape[-2] == 0:
        raise ValueError(f"points must have shape (N, D) or (..., N, D) with N >= 1, got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("points contain NaN or infinite coordinates")
    out_dtype = points.dtype if np.issubdtype(points.dtype, np.floating) else np.float64
    p = points.astype(np.float64)
    center = p.mean(axis=-2)
    p -= center[..., None, :]
    scale = np.sqrt((p * p).sum(axis=-1).max(axis=-1))
    if np.any(scale <= 0):
        if strict:
            raise ValueError("cannot normalise: all points coincide")
        scale = np.where(scale > 0, scale, 1.0)
    p /= scale[..., None, None]
    return p.astype(out_dtype, copy=False), center, (float(scale) if points.ndim == 2 else scale)


def vertex_normals_from(faces: np.ndarray, fn: np.ndarray, areas: np.ndarray, nv: int) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted unit vertex normals ``(V, 3)``, robust to inconsistent winding, and the area
    of the faces around each vertex ``(V,)``, from the face cross products ``fn`` (F, 3) (of
    length twice the area, :func:`face_cross`) and the face ``areas`` (F,); ``nv`` vertices.

    Where the faces around a vertex are consistently wound this is the usual normalised sum of
    area-weighted face normals. Where they are not (the summed normal is shorter than half the
    summed area, as on ModelNet meshes whose faces are wound at random) each face normal is
    first flipped to agree with the dominant direction of the faces around the vertex (the
    principal axis of the area-weighted normal tensor); the sign of such normals is arbitrary,
    which two-sided lighting does not mind. Vertices on no face get ``(0, 0, 1)``.
    """
    flat = faces.ravel()
    w = np.repeat(fn, 3, axis=0)  # one row per face corner, matching ``flat``
    acc = np.empty((nv, 3))
    for c in range(3):
        acc[:, c] = np.bincount(flat, weights=w[:, c], minlength=nv)
    total = np.bincount(flat, weights=np.repeat(areas, 3), minlength=nv)
    length = _row_norms(acc)
    # |sum of cross products| < half their summed length (= the summed area)
    bad = (length < total) & (total > 0)
    if bad.any():
        # sign-align the face normals around inconsistently wound vertices
        corner = bad[flat]
        vid, wn = flat[corner], w[corner]
        # np.linalg.norm here (not _row_norms): the exact bits the datasets were prepared with
        wlen = np.maximum(np.linalg.norm(wn, axis=1), 1e-300)
        tensor = np.zeros((nv, 3, 3))
        np.add.at(tensor, vid, wn[:, :, None] * wn[:, None, :] / wlen[:, None, None])
        _, vec = np.linalg.eigh(tensor[bad])
        principal = np.zeros((nv, 3))
        principal[bad] = vec[:, :, 2]
        sign = np.where(np.einsum("ij,ij->i", wn, principal[vid]) < 0, -1.0, 1.0)
        fixed = np.zeros((nv, 3))
        np.add.at(fixed, vid, sign[:, None] * wn)
        acc[bad] = fixed[bad]
        length = _row_norms(acc)
    out = np.zeros((nv, 3))
    out[:, 2] = 1.0
    ok = length > 0
    out[ok] = acc[ok] / length[ok, None]
    return out, total
