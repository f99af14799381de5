"""Reading triangle meshes from disk, with validation.

* OFF files (the format of Princeton ModelNet) are read by :func:`read_off`, our own
  tolerant, vectorised parser.
* OBJ, PLY, STL, GLB and GLTF files are read with ``trimesh`` (scenes are concatenated
  into one mesh in world coordinates).

:func:`load_mesh` builds a :class:`~xmodal.data.types.Mesh` (which validates itself), so
callers get either a usable mesh (≥1 face of non-zero area, finite coordinates, indices in
range) or a :class:`~xmodal.errors.MeshError` whose message names the file and the problem.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from xmodal.data.mesh_limit import mesh_counts
from xmodal.data.types import Mesh, MeshError
from xmodal.utils.optional import require

__all__ = ["MESH_EXTENSIONS", "read_off", "read_mesh_arrays", "load_mesh", "is_mesh_file"]

logger = logging.getLogger(__name__)

#: file extensions :func:`load_mesh` understands (lower case, with the dot)
MESH_EXTENSIONS = (".off", ".obj", ".ply", ".stl", ".glb", ".gltf")

# OFF is read by our own parser rather than ``trimesh.load`` because trimesh's OFF reader
# (a) accepts a file with fewer face lines than its header declares, so a truncated download
# would load as a partial mesh instead of failing, (b) parses line by line in Python, several
# times slower than the block-wise numpy parsing below on ModelNet's larger meshes, and
# (c) tolerates ModelNet's glued header (``OFF490 518 0``) only as an implementation detail.

# "OFF" with the optional prefixes of the Geomview family: ST (texture coords), C (colours),
# N (normals). 4OFF / nOFF (other dimensions) are not 3D triangle meshes and are refused.
_OFF_KEYWORD = re.compile(r"\s*(ST)?(C)?(N)?OFF", re.ASCII)
_LEADING_WORD = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)", re.ASCII)
_OTHER_DIMENSION = re.compile(r"\s*((?:ST)?C?N?(?:4?n|4)OFF)", re.ASCII)
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*(?=\n)")


def is_mesh_file(path: "str | os.PathLike") -> bool:
    """True when ``path`` has one of :data:`MESH_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in MESH_EXTENSIONS


def read_off(path: "str | os.PathLike") -> tuple[np.ndarray, np.ndarray]:
    """Read an Object File Format (OFF) mesh.

    Tolerant of what real files contain: ``#`` comments, blank lines, CRLF line ends, an
    ``OFF``/``COFF``/``NOFF``/``CNOFF`` header on its own line, glued to the counts
    (ModelNet's ``OFF490 518 0`` defect) or absent, extra per-vertex columns (normals,
    colours) and per-face colour columns, polygons of any size (fan-triangulated).
    Faces with fewer than three corners are dropped. Lines after the declared faces are
    ignored.

    Args:
        path: the ``.off`` file.

    Returns:
        ``vertices`` (V, 3) float64 and ``faces`` (F, 3) int64 (F ≥ number of polygons
        after triangulation; may be 0 when the file declares no faces).

    Raises:
        MeshError: unreadable file, not an OFF file, malformed counts, fewer vertices or
            faces than declared, non-numeric data, face indices out of range.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MeshError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if b"\x00" in raw[:4096]:
        raise MeshError(path, "binary data, not a text OFF file")
    text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")  # a byte-order mark (Windows editors)
    if "#" in text:
        text = re.sub(r"#[^\n]*", "", text)

    m = _OFF_KEYWORD.match(text)
    if m is not None:
        body = text[m.end():]
    else:
        other = _OTHER_DIMENSION.match(text)
        if other is not None:
            raise MeshError(path, f"header keyword {other.group(1)!r}: an OFF of points in another dimension than 3, "
                                  "not a 3D triangle mesh")
        word = _LEADING_WORD.match(text)
        if word is not None:  # some other keyword (e.g. "ply", "nOFF", "solid")
            raise MeshError(path, f"not an OFF file: header keyword {word.group(1)[:20]!r}")
        body = text  # header-less OFF: the counts come first

    body = body.replace("\r", "").strip()
    if not body:
        raise MeshError(path, "empty OFF file: no vertex/face counts")
    if _BLANK_LINE.search(body):
        lines = [ln for ln in body.split("\n") if ln and not ln.isspace()]
    else:
        lines = body.split("\n")

    counts = lines[0].split()
    try:
        n_vertices, n_faces = int(counts[0]), int(counts[1])
    except (IndexError, ValueError):
        raise MeshError(
            path, f"bad counts line {lines[0][:60]!r}: expected 'n_vertices n_faces n_edges'"
        ) from None
    if n_vertices < 0 or n_faces < 0:
        raise MeshError(path, f"negative counts in header: {n_vertices} vertices, {n_faces} faces")

    n_data = len(lines) - 1
    if n_data < n_vertices + n_faces:
        raise MeshError(
            path,
            f"truncated file or bad counts: header declares {n_vertices} vertices and {n_faces} faces "
            f"({n_vertices + n_faces} lines) but only {n_data} data lines follow",
        )
    if n_data > n_vertices + n_faces:
        logger.debug("%s: ignoring %d lines after the declared faces", path, n_data - n_vertices - n_faces)

    vertices = _parse_vertices(path, lines[1 : 1 + n_vertices], n_vertices)
    faces = _parse_faces(path, lines[1 + n_vertices : 1 + n_vertices + n_faces], n_faces)
    if faces.size and (faces.min() < 0 or faces.max() >= n_vertices):
        bad = faces[(faces < 0) | (faces >= n_vertices)]
        raise MeshError(path, f"face index out of range: {int(bad[0])} not in [0, {n_vertices})")
    return vertices, faces


def _parse_vertices(path: Path, block: list[str], n: int) -> np.ndarray:
    """(n, 3) float64 from ``n`` vertex lines; extra columns (normals, colours) dropped."""
    if n == 0:
        return np.zeros((0, 3), np.float64)
    try:
        flat = np.array(" ".join(block).split(), dtype=np.float64)
        if flat.size == 3 * n:  # the common case: exactly x y z on every line
            return flat.reshape(n, 3)
        rows = [ln.split() for ln in block]
        short = next((i for i, r in enumerate(rows) if len(r) < 3), None)
        if short is not None:
            raise MeshError(path, f"vertex {short} has fewer than 3 coordinates: {block[short][:60]!r}")
        return np.array([r[:3] for r in rows], dtype=np.float64)
    except ValueError as exc:
        if isinstance(exc, MeshError):
            raise
        raise MeshError(path, f"non-numeric vertex data ({exc})") from None


def _parse_faces(path: Path, block: list[str], n: int) -> np.ndarray:
    """(F, 3) int64 triangles from ``n`` face lines ``k i_1 … i_k [colour…]``."""
    if n == 0:
        return np.zeros((0, 3), np.int64)
    # fast path: every line is exactly "3 a b c" (ModelNet and most exporters)
    tokens = " ".join(block).split()
    if len(tokens) == 4 * n:
        try:
            table = np.array(tokens, dtype=np.int64).reshape(n, 4)
        except (ValueError, OverflowError):  # not integers, or beyond int64: the general path says which
            table = None
        if table is not None and (table[:, 0] == 3).all():
            return table[:, 1:].copy()
    # general path: polygons of any size, optional trailing colour columns
    sizes = np.empty(n, np.int64)
    corners: list[str] = []
    for i, ln in enumerate(block):
        row = ln.split()
        try:
            k = int(row[0])
        except ValueError:
            raise MeshError(path, f"face {i}: bad corner count in {ln[:60]!r}") from None
        if k < 0 or len(row) < k + 1:
            raise MeshError(path, f"face {i} declares {k} corners but has {len(row) - 1} values")
        sizes[i] = k
        corners.extend(row[1 : k + 1])
    try:
        flat = np.array(corners, dtype=np.int64)
    except (ValueError, OverflowError):
        raise MeshError(path, "non-integer (or beyond 64-bit) vertex index in face data") from None
    return _fan_triangulate(flat, sizes)


def _fan_triangulate(flat: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Fan-triangulate concatenated polygons.

    Args:
        flat: (sum(sizes),) int64 corner indices of all polygons, one after the other.
        sizes: (P,) int64 corner count of each polygon; polygons with < 3 corners are dropped.

    Returns:
        (sum(max(sizes - 2, 0)), 3) int64 triangles ``(c0, c_k, c_k+1)``.
    """
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_tri = np.maximum(sizes - 2, 0)
    total = int(n_tri.sum())
    if total == 0:
        return np.zeros((0, 3), np.int64)
    poly = np.repeat(np.arange(len(sizes)), n_tri)
    # k = 1 .. n_tri within each polygon
    first_tri = np.concatenate([[0], np.cumsum(n_tri)[:-1]])
    k = np.arange(total) - first_tri[poly] + 1
    s = starts[poly]
    return np.stack([flat[s], flat[s + k], flat[s + k + 1]], axis=1)


def read_mesh_arrays(path: "str | os.PathLike") -> tuple[np.ndarray, np.ndarray]:
    """Read a mesh file's arrays as stored, without validation.

    OFF files are read by :func:`read_off`; OBJ, PLY, STL, GLB and GLTF by ``trimesh``
    (``process=False``: vertices and faces are kept as stored and in file order, scenes
    are flattened into one mesh). Nothing is dropped, so face ``i`` is the file's
    ``i``-th triangle (what per-face label files index).

    Returns:
        ``vertices`` (V, 3) float64 and ``faces`` (F, 3) int64.

    Raises:
        MeshError: unknown extension, missing/unreadable file, parse error.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in MESH_EXTENSIONS:
        raise MeshError(path, f"unknown mesh extension {ext or '(none)'!r}; supported: {', '.join(MESH_EXTENSIONS)}")
    if not path.is_file():
        raise MeshError(path, "file does not exist" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:  # trimesh's readers fail on one with unrelated errors (IndexError...)
        raise MeshError(path, "empty file (0 bytes)")
    if ext == ".off":
        return read_off(path)
    return _load_with_trimesh(path)


def load_mesh(path: "str | os.PathLike") -> Mesh:
    """Load and validate a triangle mesh (:func:`read_mesh_arrays`, then the :class:`Mesh` constructor).

    Returns:
        :class:`Mesh` with ``vertices`` (V, 3) float64 and ``faces`` (F, 3) int64,
        degenerate (zero-area) faces removed, ``face_labels`` None.

    Raises:
        MeshError: unknown extension, missing/unreadable file, parse error, no faces,
            NaN/inf coordinates, face index out of range, zero total surface area.
    """
    vertices, faces = read_mesh_arrays(path)
    return Mesh(vertices, faces, source=Path(path))


def _load_with_trimesh(path: Path) -> tuple[np.ndarray, np.ndarray]:
    trimesh = require("trimesh", "reading OBJ/PLY/STL/GLB meshes")
    problem = _short_of_header(path)  # before trimesh, whose errors on such files vary with what is installed
    if problem:
        raise MeshError(path, problem)
    try:
        loaded = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:  # trimesh raises many exception types for broken files
        raise MeshError(path, f"could not be read by trimesh: {type(exc).__name__}: {exc}") from exc
    if isinstance(loaded, trimesh.Scene):  # older trimesh may still hand back a scene
        geoms = [g for g in loaded.dump() if isinstance(g, trimesh.Trimesh)]
        loaded = trimesh.util.concatenate(geoms) if geoms else None
    faces = getattr(loaded, "faces", None)
    vertices = getattr(loaded, "vertices", None)
    if vertices is None or faces is None:
        raise MeshError(path, f"no faces: file holds a {type(loaded).__name__}, not a triangle mesh")
    return np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64).reshape(-1, 3)


def _lines_after_header(path: Path) -> Optional[int]:
    """The lines of a text PLY after its ``end_header`` line (a last line without a newline counts)."""
    data = path.read_bytes()
    end = data.find(b"end_header")
    if end < 0:
        return None
    body = data[data.find(b"\n", end) + 1:] if data.find(b"\n", end) >= 0 else b""
    return body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)


# trimesh reads an ASCII PLY with fewer lines than its header declares, and a binary STL cut short,
# without complaint (a partial mesh, or none); the header's counts are checked here, as read_off
# checks OFF's.
def _short_of_header(path: Path) -> Optional[str]:
    """Why a PLY or STL file holds less than its header declares (truncated), else None."""
    ext = path.suffix.lower()
    try:
        if ext == ".ply":
            declared = mesh_counts(path)  # the header's element counts, and whether the file is text
            want_v, want_f, text = declared if declared else (0, 0, False)
            if want_f == 0 and want_v:
                return ("no faces: a point cloud, not a triangle mesh (point-cloud collections are read from the "
                        "ModelNet40 HDF5 layout: README, 'Your own meshes')")
            lines = _lines_after_header(path) if text else None  # trimesh refuses a short binary PLY itself
            if lines is not None and lines < want_v + want_f:
                return (f"truncated: the header declares {want_v} vertices and {want_f} faces "
                        f"({want_v + want_f} lines), the file holds {lines}")
        elif ext == ".stl":
            with open(path, "rb") as fh:
                head = fh.read(84)
            size = path.stat().st_size
            declared = int.from_bytes(head[80:84], "little")
            if len(head) == 84 and not head.lstrip()[:5].lower() == b"solid" and size < 84 + 50 * declared:
                return (f"truncated: the binary header declares {declared} triangles ({84 + 50 * declared} bytes), "
                        f"the file has {size} bytes")
    except OSError:
        return None
    return None
