"""Tests of xmodal.data.sampling: surface sampling, exact FPS, normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from xmodal.data.sampling import (
    farthest_point_sampling,
    farthest_point_sampling_reference,
    sample_mesh_points,
    sample_point_cloud,
    sample_surface,
)
from xmodal.data.geometry import normalize_unit_sphere
from xmodal.data.types import Mesh


def _box(size=(1.0, 2.0, 3.0), offset=(0.0, 0.0, 0.0)) -> Mesh:
    sx, sy, sz = size
    v = np.array(
        [[x, y, z] for x in (0, sx) for y in (0, sy) for z in (0, sz)], dtype=np.float64
    ) + np.asarray(offset)
    f = np.array(
        [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
         [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]],
        dtype=np.int64,
    )
    return Mesh(v, f, face_labels=np.arange(12, dtype=np.int64) // 2)


def _min_dist_to_set(points, chosen):
    d = ((points[:, None, :] - points[None, chosen, :]) ** 2).sum(-1)
    return np.sqrt(d.min(1))


# ----------------------------------------------------------------- sample_surface


def test_sample_surface_points_lie_on_their_faces():
    mesh = _box()
    pts, fidx = sample_surface(mesh, 500, seed=0)
    assert pts.shape == (500, 3) and pts.dtype == np.float64
    assert fidx.shape == (500,) and fidx.dtype == np.int64
    tri = mesh.vertices[mesh.faces[fidx]]
    # barycentric reconstruction: point - a = u (b - a) + v (c - a) with u, v >= 0, u + v <= 1
    e = np.stack([tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]], axis=2)  # (n, 3, 2)
    uv, *_ = zip(*(np.linalg.lstsq(e[i], pts[i] - tri[i, 0], rcond=None) for i in range(len(pts))))
    uv = np.array(uv)
    recon = tri[:, 0] + np.einsum("nij,nj->ni", e, uv)
    np.testing.assert_allclose(recon, pts, atol=1e-9)
    assert (uv >= -1e-9).all() and (uv.sum(1) <= 1 + 1e-9).all()


def test_sample_surface_is_area_weighted():
    # two triangles, the second with 3x the area: ~75 % of the samples on it
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 1], [0, 1, 1]], float)
    f = np.array([[0, 1, 2], [3, 4, 5]])
    _, fidx = sample_surface((v, f), 20000, seed=1)
    assert abs((fidx == 1).mean() - 0.75) < 0.02


def test_sample_surface_never_picks_zero_area_faces_and_is_seeded():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 2, 2]], float)
    f = np.array([[0, 1, 1], [0, 1, 2], [3, 3, 3]])  # faces 0 and 2 are degenerate
    mesh = Mesh(v, f)
    p1, i1 = sample_surface(mesh, 300, seed=5)
    p2, i2 = sample_surface(mesh, 300, seed=5)
    p3, _ = sample_surface(mesh, 300, seed=6)
    assert (mesh.faces[i1] == [0, 1, 2]).all()
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(i1, i2)
    assert not np.array_equal(p1, p3)


def test_sample_surface_rejects_bad_input():
    with pytest.raises(ValueError, match="zero"):
        sample_surface((np.zeros((3, 3)), np.array([[0, 1, 2]])), 10, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        sample_surface((np.eye(3), np.array([[0, 1, 3]])), 10, seed=0)
    with pytest.raises(ValueError, match="no faces"):
        sample_surface((np.eye(3), np.zeros((0, 3), int)), 10, seed=0)


# ----------------------------------------------------------------- FPS


@pytest.mark.parametrize("seed", range(6))
def test_fps_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(20, 501))
    n = int(rng.integers(1, min(64, m) + 1))
    d = 3 if seed % 3 else 2
    pts = rng.normal(size=(m, d)) * rng.uniform(0.1, 10)
    start = int(rng.integers(m))
    fast = farthest_point_sampling(pts, n, start_idx=start)
    slow = farthest_point_sampling_reference(pts, n, start_idx=start)
    assert fast.dtype == np.int64 and fast.shape == (n,)
    np.testing.assert_array_equal(fast, slow)


def test_fps_max_min_property_and_distinct():
    rng = np.random.default_rng(3)
    pts = rng.random((400, 3))
    idx = farthest_point_sampling(pts, 40, start_idx=7)
    assert idx[0] == 7
    assert len(np.unique(idx)) == 40
    for k in range(1, 40):
        # the k-th pick is the farthest point from the first k picks
        dist = _min_dist_to_set(pts, idx[:k])
        assert dist[idx[k]] == pytest.approx(dist.max(), rel=1e-5)
    # and the picks are well spread: covering radius well below that of a random subset
    cover_fps = _min_dist_to_set(pts, idx).max()
    cover_rand = _min_dist_to_set(pts, rng.choice(400, 40, replace=False)).max()
    assert cover_fps < cover_rand


def test_fps_random_start_is_seeded():
    pts = np.random.default_rng(0).random((300, 3))
    a = farthest_point_sampling(pts, 20, seed=11)
    b = farthest_point_sampling(pts, 20, seed=11)
    np.testing.assert_array_equal(a, b)
    starts = {int(farthest_point_sampling(pts, 1, seed=s)[0]) for s in range(10)}
    assert len(starts) > 1


def test_fps_duplicates_give_distinct_locations():
    rng = np.random.default_rng(0)
    base = rng.random((30, 3))
    pts = np.concatenate([base, base[:20], base[5:10]])[rng.permutation(55)]
    idx = farthest_point_sampling(pts, 30, start_idx=0)
    assert len(np.unique(idx)) == 30
    assert len(np.unique(pts[idx], axis=0)) == 30  # every unique location exactly once
    np.testing.assert_array_equal(idx, farthest_point_sampling_reference(pts, 30, start_idx=0))
    with pytest.raises(ValueError, match="only 30 unique points"):
        farthest_point_sampling(pts, 31, start_idx=0)


def test_fps_duplicate_start_index_is_kept():
    pts = np.array([[0.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0], [0.0, 2, 0]])
    idx = farthest_point_sampling(pts, 3, start_idx=2)
    assert idx[0] == 2 and sorted(idx.tolist()) == [1, 2, 3]


def test_fps_edge_cases_and_errors():
    pts = np.random.default_rng(0).random((10, 3))
    assert farthest_point_sampling(pts, 0, seed=0).shape == (0,)
    assert sorted(farthest_point_sampling(pts, 10, seed=0).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="out of M=10"):
        farthest_point_sampling(pts, 11, seed=0)
    with pytest.raises(ValueError, match="start_idx"):
        farthest_point_sampling(pts, 3, start_idx=10)
    bad = pts.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        farthest_point_sampling(bad, 3, seed=0)
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        farthest_point_sampling(pts[0], 1, seed=0)


# ----------------------------------------------------------------- normalisation


# ----------------------------------------------------------------- sample_point_cloud


def test_sample_point_cloud_shapes_normalisation_and_labels():
    mesh = _box(offset=(10.0, -3.0, 5.0))
    pc = sample_point_cloud(mesh, 256, oversample=4, seed=0)
    assert pc.points.shape == (256, 3) and pc.points.dtype == np.float32
    norms = np.linalg.norm(pc.points, axis=1)
    assert norms.max() <= 1 + 1e-6 and norms.max() > 0.999
    np.testing.assert_allclose(pc.points.mean(0), 0, atol=1e-5)
    assert len(np.unique(pc.points, axis=0)) == 256
    # labels follow the faces: label k = box side k (faces 2k, 2k+1), sides are x=0, x=1,
    # y=0, y=2, z=0, z=3.  Normalisation is a translation + uniform scale, so each label's
    # points keep one constant coordinate, and opposite sides are 1, 2, 3 box units apart.
    assert pc.point_labels.shape == (256,) and pc.point_labels.dtype == np.int64
    assert set(np.unique(pc.point_labels).tolist()) == set(range(6))
    axis = np.array([0, 0, 1, 1, 2, 2])
    level = np.empty(6)
    for lab in range(6):
        coord = pc.points[pc.point_labels == lab, axis[lab]]
        assert np.ptp(coord) < 1e-5
        level[lab] = coord.mean()
    gaps = level[1::2] - level[0::2]
    np.testing.assert_allclose(gaps / gaps[0], [1.0, 2.0, 3.0], rtol=1e-4)


def test_sample_point_cloud_deterministic_by_seed_and_unlabelled():
    mesh = _box()
    mesh = Mesh(mesh.vertices, mesh.faces)
    a = sample_point_cloud(mesh, 128, seed=3)
    b = sample_point_cloud(mesh, 128, seed=3)
    c = sample_point_cloud(mesh, 128, seed=4)
    np.testing.assert_array_equal(a.points, b.points)
    assert not np.array_equal(a.points, c.points)
    assert a.point_labels is None


def test_sample_point_cloud_fps_spreads_points():
    # FPS from 8x candidates covers the surface better than the plain random sample
    box = _box()
    mesh = Mesh(box.vertices, box.faces)
    fps = sample_point_cloud(mesh, 200, oversample=8, seed=0).points
    rnd = sample_point_cloud(mesh, 200, oversample=1, seed=0).points
    dense = sample_point_cloud(mesh, 2000, oversample=1, seed=1).points

    def cover(sub):
        return np.sqrt(((dense[:, None] - sub[None]) ** 2).sum(-1).min(1)).max()

    assert cover(fps) < 0.8 * cover(rnd)


def test_sample_mesh_points_is_the_cloud_before_normalisation():
    mesh = _box(offset=(10.0, -3.0, 5.0))
    raw, face_index = sample_mesh_points(mesh, 64, oversample=4, seed=7)
    pc = sample_point_cloud(mesh, 64, oversample=4, seed=7)
    np.testing.assert_array_equal(pc.points, normalize_unit_sphere(raw)[0].astype(np.float32))
    np.testing.assert_array_equal(pc.point_labels, mesh.face_labels[face_index])
    # raw points are in the mesh's coordinates, on the box surface
    assert raw.min(0) == pytest.approx([10.0, -3.0, 5.0], abs=0.5) and (raw >= [10, -3, 5]).all()
