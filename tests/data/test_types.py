"""Tests of xmodal.data.types.Mesh: valid once constructed, one error naming the source."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from xmodal.data.geometry import degenerate_faces, face_areas
from xmodal.data.types import Mesh, as_mesh
from xmodal.errors import MeshError

TRI_V = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
TRI_F = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]], dtype=np.int64)

BAD = {
    "vertex shape": (np.zeros((4, 2)), TRI_F, None, "vertices must have shape (V, 3), got (4, 2)"),
    "face shape": (TRI_V, np.array([[0, 1, 2, 3]]), None, "faces must have shape (F, 3), got (1, 4)"),
    "no faces": (TRI_V, np.zeros((0, 3), np.int64), None, "no faces"),
    "no vertices": (np.zeros((0, 3)), TRI_F, None, "no vertices"),
    "nan": (np.where(np.eye(4, 3) == 1, np.nan, TRI_V), TRI_F, None, "non-finite vertex coordinates: 3 vertices"),
    "inf": (np.array([[0, 0, 0], [np.inf, 0, 0], [0, 1, 0], [0, 0, 1]]), TRI_F, None, "1 vertices with NaN or inf (0 NaN)"),
    "not numeric": ([["a", "b", "c"]], [[0, 0, 0]], None, "vertices are not numeric"),
    "float indices": (TRI_V, TRI_F.astype(np.float64), None, "face indices must be integers, got dtype float64"),
    "index too large": (TRI_V, [[0, 1, 4]], None, "face index out of range: 4 not in [0, 4)"),
    "negative index": (TRI_V, [[0, -1, 2]], None, "face index out of range: -1 not in [0, 4)"),
    "labels count": (TRI_V, TRI_F, [1, 2, 3], "face_labels must have shape (4,), one per face, got (3,)"),
    "labels float": (TRI_V, TRI_F, [0.5, 1, 2, 3], "face_labels must be integers"),
    "zero area": (np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2]], float), [[0, 1, 2], [0, 0, 1]], None,
                  "zero total surface area: all 2 faces are degenerate"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_mesh_raises_mesh_error_naming_the_source(case):
    vertices, faces, labels, reason = BAD[case]
    with pytest.raises(MeshError) as info:
        Mesh(vertices, faces, labels, source="models/chair.off")
    assert str(info.value) == f"models/chair.off: {info.value.reason}"
    assert info.value.path == "models/chair.off"
    assert reason in info.value.reason, info.value.reason


def test_error_without_a_source_names_an_anonymous_mesh():
    with pytest.raises(MeshError, match=r"^<mesh>: no faces$"):
        Mesh(TRI_V, np.zeros((0, 3), np.int64))
    assert isinstance(MeshError("x", "y"), ValueError)  # callers catching ValueError still work


def test_arrays_are_converted():
    m = Mesh(TRI_V.astype(np.float32), TRI_F.astype(np.int32), np.arange(4, dtype=np.int16), source=None)
    assert m.vertices.dtype == np.float64 and m.faces.dtype == np.int64 and m.face_labels.dtype == np.int64
    assert m.vertices.flags.c_contiguous and m.faces.flags.c_contiguous
    np.testing.assert_array_equal(m.faces, TRI_F)
    assert m.source is None
    m2 = Mesh(TRI_V.tolist(), TRI_F.tolist(), source=Path("a/b.off"))
    assert m2.source == "a/b.off" and m2.face_labels is None


def test_degenerate_faces_leave_with_their_labels():
    v = np.vstack([TRI_V, [[2, 0, 0]]])
    # face 1 repeats a vertex, face 3 is collinear (0, 1, 4 on the x axis)
    f = np.array([[0, 1, 2], [0, 0, 1], [0, 1, 3], [0, 1, 4], [1, 2, 3]])
    m = Mesh(v, f, np.array([10, 11, 12, 13, 14]))
    np.testing.assert_array_equal(m.faces, [[0, 1, 2], [0, 1, 3], [1, 2, 3]])
    np.testing.assert_array_equal(m.face_labels, [10, 12, 14])
    np.testing.assert_array_equal(m.vertices, v)  # vertices are kept (indices stay valid)


def test_a_mesh_is_valid_and_stays_so():
    m = Mesh(TRI_V, TRI_F, np.arange(4), source="t.off")
    assert not degenerate_faces(m.vertices, m.faces).any()
    assert face_areas(m.vertices, m.faces).min() > 0
    with pytest.raises(AttributeError, match="immutable"):
        m.faces = np.zeros((0, 3), np.int64)
    for arr in (m.vertices, m.faces, m.face_labels):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 0
    # the caller's own arrays are untouched (a read-only view, not a read-only flag on them)
    v = TRI_V.copy()
    Mesh(v, TRI_F)
    assert v.flags.writeable


def test_pickle_round_trip_keeps_the_mesh_read_only():
    m = Mesh(TRI_V, TRI_F, np.arange(4), source="t.off")
    back = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(back.faces, m.faces)
    np.testing.assert_array_equal(back.face_labels, m.face_labels)
    assert back.source == "t.off" and not back.vertices.flags.writeable
    assert "4 faces" in repr(back) and "labelled" in repr(back)


def test_as_mesh():
    m = Mesh(TRI_V, TRI_F)
    assert as_mesh(m) is m  # a Mesh is not validated again
    from_pair = as_mesh((TRI_V, TRI_F))
    assert isinstance(from_pair, Mesh) and len(from_pair.faces) == 4
    import trimesh
    box = as_mesh(trimesh.creation.box())
    assert isinstance(box, Mesh) and len(box.faces) == 12
    with pytest.raises(MeshError, match="out of range"):
        as_mesh((TRI_V, [[0, 1, 9]]))
    with pytest.raises(TypeError, match="Mesh or"):
        as_mesh(np.zeros((3, 3)))
