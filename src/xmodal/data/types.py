"""Plain data types shared by the data modules (numpy-level, no torch).

A :class:`Mesh` is valid once constructed: its constructor is the one place meshes are
validated, so the modules that sample, render or normalise a mesh never check it again.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np

from xmodal.data.geometry import degenerate_faces
from xmodal.errors import MeshError

__all__ = ["MeshError", "Mesh", "as_mesh", "PointCloud", "Item", "Source"]

logger = logging.getLogger(__name__)

#: largest absolute vertex coordinate of a :class:`Mesh`: the squares of lengths (areas,
#: normals) of a mesh beyond it overflow float64
MAX_COORDINATE = 1e150


class Mesh:
    """A valid triangle mesh; constructing one validates it.

    ``Mesh(vertices, faces, face_labels=None, *, source=None)`` converts the arrays
    (vertices to float64, faces and labels to int64), checks them and drops the degenerate
    faces (repeated vertex, or area below floating-point noise at the mesh's scale:
    :func:`xmodal.data.geometry.degenerate_faces`) together with their labels.

    Attributes (read-only; the arrays are read-only views, copied only where converted or filtered):
        vertices: (V, 3) float64, finite.
        faces: (F, 3) int64, F >= 1, every index in ``[0, V)``, no degenerate face (so the
            total area is > 0).
        face_labels: (F,) int64 (e.g. global part ids) or None.
        source: where the mesh comes from (a file path, a generator id) or None; errors
            name it (``"<mesh>"`` when None).

    Raises:
        MeshError: ``MeshError(source, reason)``: arrays of the wrong shape, no faces, no
            vertices, NaN or infinite coordinates (or beyond :data:`MAX_COORDINATE`), non-integer or
            out-of-range face indices,
            face_labels not one integer per face, zero total surface area (every face
            degenerate).
    """

    __slots__ = ("vertices", "faces", "face_labels", "source")

    def __init__(self, vertices, faces, face_labels=None, *, source: "str | os.PathLike | None" = None):
        where = "<mesh>" if source is None else os.fspath(source)
        v, f, labels = _checked_arrays(vertices, faces, face_labels, where)
        bad = degenerate_faces(v, f)
        if bad.all():
            raise MeshError(where, f"zero total surface area: all {len(f)} faces are degenerate")
        if bad.any():
            logger.debug("%s: dropped %d degenerate faces of %d", where, int(bad.sum()), len(f))
            f = f[~bad]
            labels = None if labels is None else labels[~bad]
        self.__setstate__({"vertices": v, "faces": f, "face_labels": labels, "source": None if source is None else where})

    def __setattr__(self, name, value):
        raise AttributeError(f"Mesh is immutable: build a new Mesh instead of setting {name!r}")

    def __getstate__(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: dict) -> None:
        """Set the (already valid) attributes, the arrays as read-only views (also on unpickling)."""
        for name, value in state.items():
            if isinstance(value, np.ndarray):
                value = value.view()
                value.flags.writeable = False
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        labels = "" if self.face_labels is None else ", labelled"
        return f"Mesh({len(self.vertices)} vertices, {len(self.faces)} faces{labels}, source={self.source!r})"


def _checked_arrays(vertices, faces, face_labels, where: str):
    """The mesh arrays converted (float64, int64, int64) and checked; raises MeshError naming ``where``."""
    try:
        v = np.ascontiguousarray(vertices, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MeshError(where, f"vertices are not numeric ({exc})") from None
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise MeshError(where, f"vertices must have shape (V, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise MeshError(where, f"faces must have shape (F, 3), got {f.shape}")
    if len(f) == 0:
        raise MeshError(where, "no faces")
    if len(v) == 0:
        raise MeshError(where, "no vertices")
    if not np.issubdtype(f.dtype, np.integer):
        raise MeshError(where, f"face indices must be integers, got dtype {f.dtype}")
    f = np.ascontiguousarray(f, dtype=np.int64)
    finite = np.isfinite(v).all(axis=1)
    if not finite.all():
        n_nan = int(np.isnan(v).any(axis=1).sum())
        raise MeshError(where, f"non-finite vertex coordinates: {int((~finite).sum())} vertices with NaN or inf ({n_nan} NaN)")
    if np.abs(v).max() > MAX_COORDINATE:
        raise MeshError(where, f"vertex coordinates up to {np.abs(v).max():.3g}: beyond {MAX_COORDINATE:g}, "
                        "face areas overflow")
    lo, hi = int(f.min()), int(f.max())
    if lo < 0 or hi >= len(v):
        raise MeshError(where, f"face index out of range: {lo if lo < 0 else hi} not in [0, {len(v)})")
    labels = None
    if face_labels is not None:
        labels = np.asarray(face_labels)
        if labels.shape != (len(f),):
            raise MeshError(where, f"face_labels must have shape ({len(f)},), one per face, got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise MeshError(where, f"face_labels must be integers, got dtype {labels.dtype}")
        labels = np.ascontiguousarray(labels, dtype=np.int64)
    return v, f, labels


def as_mesh(obj) -> Mesh:
    """``obj`` itself when it is a :class:`Mesh` (already valid, not checked again); otherwise
    a new, validated ``Mesh`` from a ``(vertices, faces)`` pair or from anything with
    ``vertices`` and ``faces`` attributes (e.g. a ``trimesh.Trimesh``).

    Raises:
        TypeError: ``obj`` is none of these. MeshError: the arrays are not a valid mesh.
    """
    if isinstance(obj, Mesh):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        return Mesh(*obj)
    if hasattr(obj, "vertices") and hasattr(obj, "faces"):
        return Mesh(obj.vertices, obj.faces)
    raise TypeError(f"expected a Mesh or (vertices, faces), got {type(obj).__name__}")


@dataclass
class PointCloud:
    """A point cloud. ``points`` (N, 3) float32, ``point_labels`` (N,) int64 or None."""

    points: np.ndarray
    point_labels: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Item:
    """One object of a source.

    ``id`` is unique and stable within a source (e.g. ``"chair/train/chair_0001"``);
    ``label`` the class name; ``split`` ``"train"`` or ``"test"``; ``path`` the file
    it comes from (None for procedural shapes); ``index`` a row number inside
    ``path`` (HDF5 sources) or the generator seed (built-in shapes).
    """

    id: str
    label: str
    split: str
    path: Optional[str] = None
    index: int = -1


class Source(ABC):
    """A collection of objects to prepare. ``kind`` is ``"mesh"`` or ``"points"``."""

    kind: str = "mesh"
    #: name of the up axis of the objects: "x", "y" or "z"
    up_axis: str = "z"

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.classes: list[str] = []
        #: global part names (index = part id) when objects carry part labels
        self.part_names: Optional[list[str]] = None
        #: short description written into the manifest
        self.description: str = ""

    @abstractmethod
    def load(self, item: Item) -> "Mesh | PointCloud":
        """Load one object; raises :class:`MeshError` when it cannot be used."""

    def describe(self) -> dict:
        return {"kind": self.kind, "description": self.description, "up_axis": self.up_axis}
