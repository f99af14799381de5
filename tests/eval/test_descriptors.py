"""D2 shape distribution: a histogram of pair distances with the invariances it must have."""

from __future__ import annotations

import numpy as np
import pytest

from xmodal.eval.descriptors import D2_BINS, d2_descriptor


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _sphere(n: int, seed: int) -> np.ndarray:
    p = np.random.default_rng(seed).normal(size=(n, 3))
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def _cube(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.uniform(-1, 1, size=(n, 3))
    p[np.arange(n), rng.integers(0, 3, n)] = rng.choice([-1.0, 1.0], n)  # onto a face
    return p / np.sqrt(3)


def test_histograms_sum_to_one_and_put_known_distances_in_their_bins():
    clouds = np.stack([_sphere(256, 0), _cube(256, 1)]).astype(np.float32)
    d = d2_descriptor(clouds, bins=32, pairs=5000)
    assert d.shape == (2, 32) and d.dtype == np.float64
    assert (d >= 0).all()
    np.testing.assert_allclose(d.sum(axis=1), 1.0)
    two = np.array([[[0, 0, 0], [0.5, 0, 0]], [[-1, 0, 0], [1, 0, 0]]], float)  # distances 0.5 and 2
    exact = d2_descriptor(two, bins=64, pairs=None)
    assert exact[0, 16] == 1.0 and exact[1, 63] == 1.0 and exact.sum() == 2.0


def test_invariant_to_point_order_exactly():
    rng = np.random.default_rng(2)
    cloud = _cube(300, 3)
    perms = np.stack([cloud] + [cloud[rng.permutation(300)] for _ in range(3)])
    d = d2_descriptor(perms, pairs=4096, seed=7)
    for k in range(1, 4):
        np.testing.assert_array_equal(d[k], d[0])


def test_invariant_to_rotation():
    cloud = _cube(200, 4)
    rotated = np.stack([cloud, cloud @ _rotation(5).T, -cloud @ _rotation(6).T])  # incl. a reflection
    exact = d2_descriptor(rotated, pairs=None)
    n_pairs = 200 * 199 // 2
    for k in (1, 2):  # the same distances up to rounding: at most one pair may cross a bin edge
        assert np.abs(exact[k] - exact[0]).sum() <= 2 / n_pairs + 1e-12
    # with random pairs the rotated cloud differs only by sampling noise, far less than another shape
    sampled = d2_descriptor(np.stack([cloud, cloud @ _rotation(5).T, _sphere(200, 7)]), pairs=65536)
    noise, other = np.abs(sampled[1] - sampled[0]).sum(), np.abs(sampled[2] - sampled[0]).sum()
    assert noise < 0.06 and other > 0.4


def test_seeded_deterministic_and_independent_of_the_batch():
    clouds = np.stack([_sphere(128, s) for s in range(5)])
    a = d2_descriptor(clouds, pairs=2000, seed=3)
    np.testing.assert_array_equal(a, d2_descriptor(clouds, pairs=2000, seed=3))
    np.testing.assert_array_equal(a[2:3], d2_descriptor(clouds[2:3], pairs=2000, seed=3))
    assert not np.array_equal(a, d2_descriptor(clouds, pairs=2000, seed=4))
    assert d2_descriptor(clouds).shape == (5, D2_BINS)


@pytest.mark.parametrize(
    "points, kw, match",
    [
        (np.zeros((2, 5, 2)), {}, "shape"),
        (np.zeros((2, 1, 3)), {}, "N >= 2"),
        (np.full((1, 4, 3), np.nan), {}, "NaN"),
        (np.zeros((1, 4, 3)), {"bins": 0}, "bins"),
        (np.zeros((1, 4, 3)), {"pairs": 0}, "pairs"),
    ],
)
def test_bad_input(points, kw, match):
    with pytest.raises(ValueError, match=match):
        d2_descriptor(points, **kw)
