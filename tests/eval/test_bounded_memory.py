"""Feature extraction and retrieval hold a bounded part of a split at once, with the same results."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from xmodal.data.store import write_store
from xmodal.eval import retrieval
from xmodal.eval.descriptors import d2_descriptor
from xmodal.eval.features import point_features, subsample_points, view_features, view_indices

N, POINTS, VIEWS = 37, 12, 4


class _PointStub(nn.Module):
    """(B, N, 3) -> (B, 9): mean, max and min of the coordinates (depends on which points are kept)."""

    def forward(self, x):
        return torch.cat([x.mean(1), x.amax(1), x.amin(1)], dim=1)


class _ImageStub(nn.Module):
    """(B, 1, S, S) -> (B, 3): mean, max and first pixel."""

    def forward(self, x):
        flat = x.flatten(1)
        return torch.stack([flat.mean(1), flat.amax(1), flat[:, 0]], dim=1)


class CountingSplit:
    """A split that records the most point clouds and images it handed out in one call,
    and refuses to hand out the whole split at once."""

    def __init__(self, inner):
        self.inner, self.name, self.n, self.has_images = inner, inner.name, inner.n, inner.has_images
        self.most_clouds = 0

    def all_points(self):
        raise AssertionError("the whole split's points were loaded at once")

    def points_range(self, start, stop):
        out = self.inner.points_range(start, stop)
        self.most_clouds = max(self.most_clouds, len(out))
        return out

    def images(self, i, views=None):
        return self.inner.images(i, views)


@pytest.fixture
def split(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "ids": [f"o{i:03d}" for i in range(N)],
        "labels": rng.integers(0, 3, N),
        "points": rng.normal(size=(N, POINTS, 3)).astype(np.float32),
        "images": rng.integers(0, 256, (N, VIEWS, 8, 8), dtype=np.uint8),
    }
    return write_store(tmp_path / "ds", classes=["a", "b", "c"], splits={"test": arrays}, chunk_size=5).split("test")


def test_point_features_stream_blocks_and_equal_the_whole_split(split):
    run = SimpleNamespace(point_encoder=_PointStub(), num_points=7)
    counting = CountingSplit(split)
    got = point_features(run, counting, batch_size=1, device="cpu", seed=3)  # blocks of 16 clouds
    assert counting.most_clouds == 16
    whole = subsample_points(split.all_points(), 7, seed=3)
    want = _PointStub()(torch.from_numpy(whole)).numpy()
    assert got.shape == (N, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_point_features_average_subsets_that_cover_each_cloud(split):
    run = SimpleNamespace(point_encoder=_PointStub(), num_points=5)
    # blocks of 16 objects; 12 points: 5 + 5 + 2 and 3 wrapped around
    got = point_features(run, split, batch_size=1, device="cpu", seed=3, subsets=3)
    pts = split.all_points()
    # the slow obvious reference: per object, its permutation cut into consecutive blocks of 5 (wrapping around)
    for i in (0, 1, 15, 16, N - 1):
        perm = np.random.default_rng((3, i)).permutation(POINTS)
        blocks = [np.sort(perm[np.arange(j * 5, j * 5 + 5) % POINTS]) for j in range(3)]
        assert set(np.concatenate(blocks).tolist()) == set(range(POINTS))  # every point is used
        want = np.mean([_PointStub()(torch.from_numpy(pts[i : i + 1, b])).numpy()[0] for b in blocks], axis=0)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    # one subset is the features of subsample_points' subset 0, unchanged
    np.testing.assert_allclose(point_features(run, split, device="cpu", seed=3, subsets=1),
                               _PointStub()(torch.from_numpy(subsample_points(pts, 5, seed=3))).numpy(), rtol=1e-6)
    # a cloud no larger than the subset: every subset is the whole cloud, encoded once
    encoded = []
    counting = _PointStub()
    counting.register_forward_hook(lambda module, args, out: encoded.append(len(args[0])))
    whole = SimpleNamespace(point_encoder=counting, num_points=POINTS)
    np.testing.assert_allclose(point_features(whole, split, device="cpu", subsets=3),
                               _PointStub()(torch.from_numpy(pts)).numpy(), rtol=1e-6)
    assert sum(encoded) == N
    with pytest.raises(ValueError, match="subsets"):
        point_features(run, split, device="cpu", subsets=0)


def test_subsample_point_subsets_partition_the_cloud():
    pts = np.random.default_rng(2).normal(size=(4, 24, 3))
    assert np.array_equal(subsample_points(pts, 8, seed=1, subset=0), subsample_points(pts, 8, seed=1))
    parts = [subsample_points(pts, 8, seed=1, subset=j) for j in range(3)]
    for i in range(4):  # three disjoint blocks of 8 hold the 24 points once each
        rows = sorted(tuple(p) for part in parts for p in part[i])
        assert rows == sorted(tuple(p) for p in pts[i])
    assert np.array_equal(subsample_points(pts, 8, seed=1, subset=3), parts[0])  # subset 3 wraps to subset 0
    with pytest.raises(ValueError, match="subset"):
        subsample_points(pts, 8, subset=-1)


def test_subsample_points_by_block_equals_whole():
    pts = np.random.default_rng(1).normal(size=(10, 30, 3))
    whole = subsample_points(pts, 8, seed=5)
    blocks = np.concatenate([subsample_points(pts[s : s + 3], 8, seed=5, start=s) for s in range(0, 10, 3)])
    assert np.array_equal(blocks, whole)


def test_view_features_fill_each_object_in_order(split):
    run = SimpleNamespace(image_encoder=_ImageStub())
    got = view_features(run, split, 2, seed=4, batch_size=1, device="cpu")  # encodes ~2 objects at a time
    idx = view_indices(N, VIEWS, 2, seed=4)
    enc = _ImageStub()
    for i in (0, 1, 2, 17, N - 1):
        imgs = torch.from_numpy(split.images(i, idx[i])).float()[:, None] / 127.5 - 1.0
        np.testing.assert_allclose(got[i], enc(imgs).numpy(), rtol=1e-5, atol=1e-6)
    assert got.shape == (N, 2, 3)


def test_split_d2_reads_blocks_and_equals_the_whole_split(split):
    counting = CountingSplit(split)
    got = retrieval.split_d2(counting, seed=2, block=5)
    assert counting.most_clouds == 5
    np.testing.assert_array_equal(got, d2_descriptor(split.all_points(), seed=2))


def test_ranking_holds_a_bounded_number_of_entries(monkeypatch):
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(60, 4)), rng.integers(0, 4, 60)
    want_m, want_p = retrieval.retrieval_metrics(feats, labels, chunk=60), retrieval.psb_statistics(feats, labels, chunk=60)
    monkeypatch.setattr(retrieval, "RANK_VALUES", 600)
    ranked = []
    inner = retrieval.rank_gallery_rows
    monkeypatch.setattr(retrieval, "rank_gallery_rows", lambda f, a, b: ranked.append((b - a) * len(f)) or inner(f, a, b))
    assert retrieval.retrieval_metrics(feats, labels) == want_m
    assert retrieval.psb_statistics(feats, labels) == pytest.approx(want_p, rel=1e-12)  # sums per chunk
    assert max(ranked) <= 600 and len(ranked) == 2 * 6  # 10 queries of 60 at a time
    assert retrieval.query_chunk(10**9) == 1
    with pytest.raises(ValueError, match="chunk"):
        retrieval.query_chunk(10, 0)
