"""Tests of xmodal.data.geometry against slow, obvious references on tiny meshes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xmodal.data.geometry import (
    UP_AXES,
    area_weighted_centroid,
    degenerate_faces,
    face_areas,
    face_centers,
    face_cross,
    face_normals,
    from_z_up,
    normalize_unit_sphere,
    to_z_up,
    up_axis_index,
    up_axis_rotation,
)

# unit cube [0, 1]^3, 12 outward-wound triangles
CUBE_V = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=np.float64)
CUBE_F = np.array(
    [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
     [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]],
    dtype=np.int64,
)


def _random_mesh(seed: int, n_vertices: int = 30, n_faces: int = 50):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n_vertices, 3)) * rng.uniform(0.1, 10.0)
    f = np.array([rng.choice(n_vertices, 3, replace=False) for _ in range(n_faces)], dtype=np.int64)
    return v, f


def _random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _heron(a, b, c) -> float:
    """Area of the triangle with corners a, b, c from its side lengths (no cross product)."""
    x, y, z = sorted((math.dist(a, b), math.dist(b, c), math.dist(c, a)), reverse=True)
    # Kahan's numerically stable form of Heron's formula (x >= y >= z)
    return 0.25 * math.sqrt(max((x + (y + z)) * (z - (x - y)) * (z + (x - y)) * (x + (y - z)), 0.0))


# ----------------------------------------------------------------------- up axis


def test_up_axis_index_and_bad_name():
    assert [up_axis_index(a) for a in UP_AXES] == [0, 1, 2]
    with pytest.raises(ValueError, match="up_axis must be one of 'x', 'y', 'z', got 'w'"):
        up_axis_index("w")
    with pytest.raises(ValueError, match="up_axis"):
        up_axis_rotation("Z")


@pytest.mark.parametrize("up", UP_AXES)
def test_up_axis_rotation_is_a_proper_rotation_taking_z_to_up(up):
    r = up_axis_rotation(up)
    np.testing.assert_array_equal(r @ r.T, np.eye(3))
    assert np.linalg.det(r) == pytest.approx(1.0)  # a rotation, never a mirror
    np.testing.assert_array_equal(r @ [0, 0, 1], np.eye(3)[up_axis_index(up)])


@pytest.mark.parametrize("up", UP_AXES)
def test_from_and_to_z_up_are_the_rotation_and_its_inverse(up):
    pts = np.random.default_rng(1).normal(size=(7, 3))
    r = up_axis_rotation(up)
    np.testing.assert_array_equal(from_z_up(pts, up), pts @ r.T)
    np.testing.assert_array_equal(to_z_up(pts, up), pts @ r)
    np.testing.assert_array_equal(to_z_up(from_z_up(pts, up), up), pts)
    # the up coordinate becomes the last one
    np.testing.assert_array_equal(to_z_up(pts, up)[:, 2], pts[:, up_axis_index(up)])


def test_y_up_table_by_hand():
    # z-up (x, y, z) -> y-up world (y, z, x): a cyclic permutation
    np.testing.assert_array_equal(from_z_up([1.0, 2.0, 3.0], "y"), [2.0, 3.0, 1.0])
    np.testing.assert_array_equal(from_z_up([1.0, 2.0, 3.0], "z"), [1.0, 2.0, 3.0])


# ----------------------------------------------------------------------- faces


def test_face_cross_matches_the_textbook_cross_product():
    v, f = _random_mesh(0)
    ref = np.array([np.cross(v[b] - v[a], v[c] - v[a]) for a, b, c in f])
    np.testing.assert_allclose(face_cross(v, f), ref, rtol=1e-13, atol=1e-13)


def test_face_areas_of_known_triangles():
    v = np.array([[0, 0, 0], [3, 0, 0], [0, 4, 0],           # right triangle 3-4-5: area 6
                  [0, 0, 1], [2, 0, 1], [1, math.sqrt(3), 1],  # equilateral, side 2: area sqrt(3)
                  [0, 0, 2], [1, 1, 2], [2, 2, 2]], float)     # collinear: area 0
    f = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 2, 1]])  # last: the first, reversed
    np.testing.assert_allclose(face_areas(v, f), [6.0, math.sqrt(3), 0.0, 6.0], rtol=1e-15)
    assert face_areas(CUBE_V, CUBE_F).sum() == pytest.approx(6.0)


@pytest.mark.parametrize("seed", range(3))
def test_face_areas_match_heron_and_are_rigid_invariant(seed):
    v, f = _random_mesh(seed)
    areas = face_areas(v, f)
    np.testing.assert_allclose(areas, [_heron(*v[face]) for face in f], rtol=1e-9)
    moved = v @ _random_rotation(seed).T + [5.0, -3.0, 100.0]
    np.testing.assert_allclose(face_areas(moved, f), areas, rtol=1e-9)
    np.testing.assert_allclose(face_areas(2.5 * v, f), 6.25 * areas, rtol=1e-12)
    np.testing.assert_array_equal(face_areas(v, f, cross=face_cross(v, f)), areas)


def test_face_normals_unit_right_handed_and_zero_for_degenerate():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0]], float)
    n = face_normals(v, np.array([[0, 1, 2], [0, 2, 1], [0, 1, 3]]))
    np.testing.assert_array_equal(n, [[0, 0, 1], [0, 0, -1], [0, 0, 0]])
    rv, rf = _random_mesh(4)
    rn = face_normals(rv, rf)
    np.testing.assert_allclose(np.linalg.norm(rn, axis=1), 1.0, rtol=1e-12)
    for edge in (rv[rf[:, 1]] - rv[rf[:, 0]], rv[rf[:, 2]] - rv[rf[:, 0]]):
        np.testing.assert_allclose((rn * edge).sum(1), 0.0, atol=1e-9)  # normal to the face
    # the cube is wound outwards: each face normal points away from the cube's centre
    assert ((face_normals(CUBE_V, CUBE_F) * (face_centers(CUBE_V, CUBE_F) - 0.5)).sum(1) > 0).all()


def test_face_centers_are_corner_means():
    v, f = _random_mesh(5)
    np.testing.assert_allclose(face_centers(v, f), [v[face].mean(axis=0) for face in f], rtol=1e-14, atol=1e-14)


def test_degenerate_faces_repeated_collinear_and_relative_to_scale():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [0.5, 1e-7, 0]], float)
    f = np.array([[0, 1, 2], [0, 0, 1], [0, 1, 3], [0, 1, 4]])
    # repeated vertex and collinear are degenerate; a sliver of area 5e-8 is not (>> 1e-12)
    expected = [False, True, True, False]
    np.testing.assert_array_equal(degenerate_faces(v, f), expected)
    for s in (1e-6, 1e6):  # the threshold follows the mesh's own scale
        np.testing.assert_array_equal(degenerate_faces(v * s, f), expected)
    # area 5e-13 of an extent-1 mesh: below floating-point noise
    tiny = v.copy()
    tiny[4, 1] = 1e-12
    assert degenerate_faces(tiny, f)[3]
    # a vertex on no face, however far, does not move the threshold (it held 1e-12 * 1e16 = 1e4)
    stray = np.vstack([v, [1e8, 0, 0]])
    np.testing.assert_array_equal(degenerate_faces(stray, f), expected)


# ----------------------------------------------------------------------- centroid


def _centroid_reference(v, f) -> np.ndarray:
    weights = [_heron(*v[face]) for face in f]
    centres = [v[face].mean(axis=0) for face in f]
    return np.average(centres, axis=0, weights=weights)


def test_centroid_of_the_unit_cube_surface_is_its_centre_whatever_the_tessellation():
    # split the top face (z = 1) into a fan of 8 triangles: 8 extra vertices pull the vertex
    # mean up, but the area-weighted centroid stays at the cube's centre
    ring = [(0, 0), (0.5, 0), (1, 0), (1, 0.5), (1, 1), (0.5, 1), (0, 1), (0, 0.5)]
    top = np.array([[x, y, 1.0] for x, y in ring] + [[0.5, 0.5, 1.0]])
    v = np.vstack([CUBE_V, top])
    fan = [[8 + k, 8 + (k + 1) % 8, 16] for k in range(8)]
    f = np.vstack([np.delete(CUBE_F, [10, 11], axis=0), fan])  # faces 10, 11 were the top
    assert face_areas(v, f).sum() == pytest.approx(6.0)
    np.testing.assert_allclose(area_weighted_centroid(v, f), [0.5, 0.5, 0.5], atol=1e-15)
    assert v.mean(axis=0)[2] > 0.6


@pytest.mark.parametrize("seed", range(3))
def test_centroid_matches_reference_and_is_rigid_equivariant(seed):
    v, f = _random_mesh(seed)
    c = area_weighted_centroid(v, f)
    np.testing.assert_allclose(c, _centroid_reference(v, f), rtol=1e-9, atol=1e-9)
    t = np.array([40.0, -7.0, 3.0])
    np.testing.assert_allclose(area_weighted_centroid(v + t, f), c + t, rtol=1e-9, atol=1e-9)
    r = _random_rotation(seed + 10)
    np.testing.assert_allclose(area_weighted_centroid(v @ r.T, f), r @ c, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(area_weighted_centroid(v, f, areas=face_areas(v, f)), c)


def test_centroid_of_zero_area_raises():
    with pytest.raises(ValueError, match="zero"):
        area_weighted_centroid(np.zeros((3, 3)), np.array([[0, 1, 2]]))


# ----------------------------------------------------------------------- normalisation


def test_normalize_unit_sphere():
    rng = np.random.default_rng(0)
    pts = (rng.normal(size=(100, 3)) * 7 + 40).astype(np.float32)
    out, center, scale = normalize_unit_sphere(pts)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-5)
    assert np.linalg.norm(out, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out * scale + center, pts, rtol=1e-5)
    with pytest.raises(ValueError, match="coincide"):
        normalize_unit_sphere(np.ones((5, 3)))


def test_normalize_unit_sphere_reference_and_integer_input():
    pts = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 0, 2]])
    out, center, scale = normalize_unit_sphere(pts)
    assert out.dtype == np.float64 and isinstance(scale, float)
    np.testing.assert_allclose(center, [0.5, 0.5, 0.5])
    # farthest point from the mean (0.5, 0.5, 0.5): any of the last three, sqrt(1.5^2 + 2 * 0.5^2)
    assert scale == pytest.approx(math.sqrt(2.75))
    np.testing.assert_allclose(out, (pts - 0.5) / math.sqrt(2.75))


def test_normalize_unit_sphere_batch_is_each_cloud_on_its_own():
    rng = np.random.default_rng(3)
    batch = rng.normal(size=(4, 50, 3)) * rng.uniform(0.1, 10, size=(4, 1, 1)) + rng.normal(size=(4, 1, 3)) * 20
    out, center, scale = normalize_unit_sphere(batch)
    assert out.shape == batch.shape and center.shape == (4, 3) and scale.shape == (4,)
    for i in range(4):
        one, c, s = normalize_unit_sphere(batch[i])
        np.testing.assert_allclose(out[i], one, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(center[i], c, rtol=1e-12)
        assert scale[i] == pytest.approx(s, rel=1e-12)


def test_normalize_unit_sphere_lenient_keeps_coincident_clouds_centred():
    batch = np.stack([np.full((5, 3), 7.0), np.arange(15.0).reshape(5, 3)])
    with pytest.raises(ValueError, match="coincide"):
        normalize_unit_sphere(batch)
    out, _, scale = normalize_unit_sphere(batch, strict=False)
    np.testing.assert_array_equal(out[0], 0.0)
    assert scale[0] == 1.0 and np.linalg.norm(out[1], axis=1).max() == pytest.approx(1.0)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 3)), "N >= 1"),
    (np.zeros(3), r"\(N, D\)"),
    (np.array([[0.0, np.nan, 0.0], [1.0, 0.0, 0.0]]), "NaN"),
])
def test_normalize_unit_sphere_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        normalize_unit_sphere(bad)
