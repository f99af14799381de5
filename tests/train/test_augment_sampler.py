"""Augmentations (shapes, invariants) and the deterministic step sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xmodal.data.store import write_store
from xmodal.train.augment import (
    crop_resize_flip,
    jitter_points,
    random_resized_crop_flip,
    random_rotate_jitter,
    resize_images,
    rotate_points,
    sample_crop_params,
    sample_point_params,
    sample_scale_shift,
    scale_shift_points,
)
from xmodal.train.config import AugConfig
from xmodal.train.sampler import LABELS, BatchSpec, PretrainBatches


def _store(root, n=6, views=4, size=32, points=128, seed=0):
    rng = np.random.default_rng(seed)
    return write_store(
        root,
        classes=["a", "b"],
        splits={
            "train": {
                "ids": [f"o{i}" for i in range(n)],
                "labels": np.arange(n) % 2,
                "points": rng.normal(size=(n, points, 3)).astype(np.float32),
                "images": rng.integers(0, 256, size=(n, views, size, size), dtype=np.uint8),
            },
            "test": {
                "ids": ["t0", "t1"],
                "labels": [0, 1],
                "points": rng.normal(size=(2, points, 3)).astype(np.float32),
                "images": rng.integers(0, 256, size=(2, views, size, size), dtype=np.uint8),
            },
        },
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("store"))


# --------------------------------------------------------------------------- augment


def test_crop_params_in_range():
    boxes, flip = sample_crop_params(500, scale=(0.5, 1.0), ratio=(0.75, 4 / 3), hflip_p=0.5, seed=1)
    x0, y0, w, h = boxes.T
    assert boxes.shape == (500, 4) and flip.dtype == bool
    assert (w > 0).all() and (w <= 1).all() and (h <= 1).all()
    assert (x0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area = w * h
    assert area.max() <= 1 + 1e-6 and area.min() >= 0.5 * 0.75 - 1e-6  # clipping can only shrink extreme ratios
    assert 0.4 < flip.mean() < 0.6
    again, _ = sample_crop_params(500, scale=(0.5, 1.0), seed=1)
    np.testing.assert_array_equal(boxes, again)


def test_full_box_is_identity_and_flip_twice_is_identity():
    x = torch.rand(3, 1, 16, 16)
    full = np.tile([0, 0, 1, 1], (3, 1)).astype(np.float32)
    no, yes = np.zeros(3, bool), np.ones(3, bool)
    torch.testing.assert_close(crop_resize_flip(x, full, no), x, atol=1e-5, rtol=0)
    flipped = crop_resize_flip(x, full, yes)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(crop_resize_flip(flipped, full, yes), x, atol=1e-5, rtol=0)


def test_crop_takes_the_window():
    # an image whose value is its column index: the left-half crop resized x2 spans columns 0..7
    x = torch.arange(16.0).repeat(16, 1)[None, None]
    out = crop_resize_flip(x, np.array([[0, 0, 0.5, 1.0]], np.float32), np.zeros(1, bool), size=16)
    assert out.shape == (1, 1, 16, 16)
    assert out.min() >= 0 and out.max() <= 7.5
    assert torch.all(out[0, 0, :, 1:] >= out[0, 0, :, :-1])  # still increasing left to right
    rand = random_resized_crop_flip(torch.rand(5, 3, 20, 20), size=12, seed=0)
    assert rand.shape == (5, 3, 12, 12)


def test_resize_images_uint8():
    imgs = np.full((2, 32, 32), 200, np.uint8)
    out = resize_images(imgs, 16)
    assert out.shape == (2, 16, 16) and out.dtype == np.uint8 and (out == 200).all()
    assert resize_images(imgs, 32) is imgs
    with pytest.raises(TypeError, match="uint8"):
        resize_images(imgs.astype(np.float32), 16)


@pytest.mark.parametrize("axis, idx", [("x", 0), ("y", 1), ("z", 2)])
def test_rotation_preserves_norms_and_up_coordinate(axis, idx):
    pts = torch.randn(4, 50, 3)
    ang = np.array([0.3, 1.0, math.pi, 5.0], np.float32)
    rot = rotate_points(pts, ang, axis)
    torch.testing.assert_close(rot.norm(dim=-1), pts.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rot[..., idx], pts[..., idx])
    assert not torch.allclose(rot, pts)
    # pairwise distances inside a cloud are preserved (rigid motion)
    exact = "donot_use_mm_for_euclid_dist"
    torch.testing.assert_close(
        torch.cdist(rot, rot, compute_mode=exact), torch.cdist(pts, pts, compute_mode=exact), atol=1e-5, rtol=1e-5
    )


def test_rotation_is_counter_clockwise_about_z():
    p = torch.tensor([[[1.0, 0.0, 0.5]]])
    out = rotate_points(p, np.array([math.pi / 2], np.float32), "z")
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0, 0.5]]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="up_axis"):
        rotate_points(p, [0.0], "w")


def test_jitter_sigma_and_clip():
    pts = torch.zeros(2, 4000, 3)
    ang, noise = sample_point_params(2, 4000, seed=0)
    assert ((ang >= 0) & (ang < 2 * math.pi)).all()
    j = jitter_points(pts, noise, sigma=0.02)
    assert abs(float(j.std()) - 0.02) < 0.001
    c = jitter_points(pts, noise, sigma=0.02, clip=0.01)
    assert float(c.abs().max()) <= 0.01 + 1e-7
    x = torch.randn(2, 10, 3)
    a, b, c = (random_rotate_jitter(x, up_axis="y", seed=s) for s in (3, 3, 4))
    assert a.shape == (2, 10, 3) and torch.equal(a, b) and not torch.equal(a, c)


def test_scale_shift_matches_a_per_point_loop_and_stays_in_range():
    scales, shifts = sample_scale_shift(500, scale=(2 / 3, 3 / 2), shift=0.2, seed=0)
    assert scales.shape == shifts.shape == (500, 3) and scales.dtype == shifts.dtype == np.float32
    assert scales.min() >= 2 / 3 and scales.max() <= 3 / 2 and np.abs(shifts).max() <= 0.2
    assert scales.std() > 0.1 and shifts.std() > 0.05  # drawn, not constant
    same, _ = sample_scale_shift(500, scale=(2 / 3, 3 / 2), shift=0.2, seed=0)
    np.testing.assert_array_equal(scales, same)
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    out = scale_shift_points(x, scales[:3], shifts[:3])
    ref = torch.empty_like(x)
    for i in range(3):
        for j in range(7):
            for a in range(3):
                ref[i, j, a] = x[i, j, a] * float(scales[i, a]) + float(shifts[i, a])
    torch.testing.assert_close(out, ref)
    ones, zeros = sample_scale_shift(4, seed=1)  # the defaults are the identity
    assert torch.equal(scale_shift_points(x[:1].expand(4, 7, 3), ones, zeros), x[:1].expand(4, 7, 3))
    with pytest.raises(ValueError, match=r"scales must be \(3, 3\)"):
        scale_shift_points(x, scales[:2], shifts[:3])


# --------------------------------------------------------------------------- sampler


def _ds(store, **kw):
    args = dict(batch_size=4, seed=0, num_points=64, image_size=32, aug=AugConfig(), start=0, stop=10)
    args.update(kw)
    spec_keys = ("batch_size", "seed", "num_points", "image_size", "aug", "point_subsample", "second_cloud")
    spec = BatchSpec(**{k: args.pop(k) for k in spec_keys if k in args})
    return PretrainBatches(store.split("train"), spec, **args)


def test_batch_contents(store):
    ds = _ds(store)
    b = ds[2]
    assert b["step"] == 2
    assert b["images"].shape == (3, 4, 32, 32) and b["images"].dtype == torch.uint8
    assert b["points"].shape == (4, 64, 3) and b["points"].dtype == torch.float32
    assert b["boxes"].shape == (3, 4, 4) and b["flip"].shape == (3, 4)
    assert b["labels"].tolist() == [list(LABELS)] * 4
    objs, negs, views = b["objects"], b["negatives"], b["views"]
    assert len(set(objs.tolist())) == 4  # without replacement when B <= n
    assert (negs != objs).all() and (views[:, 0] != views[:, 1]).all()
    split = store.split("train")
    for k in range(4):
        np.testing.assert_array_equal(b["images"][0, k].numpy(), split.image(int(objs[k]), int(views[k, 0])))
        np.testing.assert_array_equal(b["images"][1, k].numpy(), split.image(int(objs[k]), int(views[k, 1])))
        np.testing.assert_array_equal(b["images"][2, k].numpy(), split.image(int(negs[k]), int(views[k, 2])))


def test_plan_properties_over_many_steps(store):
    ds = _ds(store, batch_size=8)  # B > n: objects with replacement
    for s in range(30):
        p = ds.plan(s)
        assert (p.negatives != p.objects).all()
        assert (p.views[:, 0] != p.views[:, 1]).all()
        assert p.objects.max() < 6 and p.views.max() < 4
        assert p.point_index.shape == (8, 64) and all(len(set(r)) == 64 for r in p.point_index.tolist())


def test_deterministic_and_step_dependent(store):
    a, b = _ds(store), _ds(store, start=3)
    x, y = a[5], b[2]  # both global step 5
    for key in ("images", "points", "boxes", "flip", "objects", "negatives", "views"):
        assert torch.equal(x[key], y[key]), key
    assert not torch.equal(a[4]["points"], x["points"])
    other_seed = _ds(store, seed=1)[5]
    assert not torch.equal(other_seed["points"], x["points"])


def test_rank_slices_concatenate_to_global_batch(store):
    full = _ds(store, batch_size=4)[1]
    parts = [_ds(store, batch_size=4, rank=r, world_size=2)[1] for r in range(2)]
    for key, dim in (("images", 1), ("points", 0), ("boxes", 1), ("flip", 1), ("objects", 0), ("labels", 0)):
        assert torch.equal(torch.cat([p[key] for p in parts], dim=dim), full[key]), key
    with pytest.raises(ValueError, match="divisible"):
        _ds(store, batch_size=4, world_size=3, rank=0)


def test_resize_and_bad_sizes(store):
    b = _ds(store, image_size=16, aug=None)[0]
    assert b["images"].shape == (3, 4, 16, 16)
    torch.testing.assert_close(b["boxes"][0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="num_points"):
        _ds(store, num_points=1000)


def test_dataloader_workers_give_the_same_batches(store):
    ds = _ds(store, stop=4)
    ref = [ds[k]["points"] for k in range(4)]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = [b["points"] for b in loader]
    assert all(torch.equal(r, g) for r, g in zip(ref, got))


def test_second_cloud_is_another_augmentation_and_leaves_the_batch_unchanged(store):
    plain, twice = _ds(store), _ds(store, second_cloud=True)
    a, b = plain[3], twice[3]
    for key in a:
        assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key
    p2 = b["points2"]
    assert p2.shape == b["points"].shape and not torch.equal(p2, b["points"])
    # without augmentation each copy is another subset of its own object's stored points
    raw = _ds(store, second_cloud=True, aug=None)[3]
    split = store.split("train")
    for i, obj in enumerate(raw["objects"].tolist()):
        stored = {tuple(q) for q in np.asarray(split.points(obj)).tolist()}
        assert {tuple(q) for q in raw["points2"][i].tolist()} <= stored
        assert {tuple(q) for q in raw["points2"][i].tolist()} != {tuple(q) for q in raw["points"][i].tolist()}


def test_scale_and_shift_change_only_the_clouds_and_each_copy_draws_its_own(store):
    aug = AugConfig(point_scale=(2 / 3, 3 / 2), point_shift=0.2)
    plain, scaled = _ds(store, second_cloud=True), _ds(store, second_cloud=True, aug=aug)
    p, q = plain.plan(3), scaled.plan(3)
    for key in ("objects", "views", "negatives", "point_index", "boxes", "flip", "angles", "noise"):
        np.testing.assert_array_equal(getattr(p, key), getattr(q, key), err_msg=key)  # the same draws as before
    for x, y in zip(p.second[:3], q.second[:3]):
        np.testing.assert_array_equal(x, y)
    assert p.scale_shift is None and q.scale_shift is not None
    a, b = plain[3], scaled[3]
    for key, (scales, shifts) in (("points", q.scale_shift), ("points2", q.second[3])):
        expect = a[key] * torch.from_numpy(scales)[:, None] + torch.from_numpy(shifts)[:, None]
        torch.testing.assert_close(b[key], expect)
    assert not np.array_equal(q.scale_shift[0], q.second[3][0])  # the two copies are scaled independently
    for key in ("images", "boxes", "objects", "negatives", "views"):
        assert torch.equal(a[key], b[key]), key
    halves = [_ds(store, second_cloud=True, aug=aug, rank=r, world_size=2)[3]["points2"] for r in range(2)]
    assert torch.equal(torch.cat(halves), b["points2"])  # each process takes its slice of the scales
