"""ShapeNet-Part readers on tiny synthetic folders written in tmp_path."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from xmodal.data.geometry import normalize_unit_sphere
from xmodal.data.shapenetpart import (
    SHAPENETPART_PARTS,
    PartSegData,
    PartSegError,
    PartSegSplit,
    load_partseg,
    load_shapenetpart_h5,
    load_shapenetpart_txt,
    sample_labelled_mesh,
    stratified_subset,
)

SYN = {"Airplane": "02691156", "Bag": "02773838"}


def _shape_rows(rng, n, parts):
    xyz = rng.normal(size=(n, 3)) * 3 + 5
    nrm = rng.normal(size=(n, 3))
    lab = rng.choice(parts, size=n)
    return np.column_stack([xyz, nrm, lab])


def write_txt_folder(root, *, counts=None, seed=0, n_points=(40, 30)):
    """2 categories; counts {split: shapes per category}; Bag shapes have fewer points."""
    counts = counts or {"train": 3, "val": 1, "test": 2}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "synsetoffset2category.txt").write_text("".join(f"{k}\t{v}\n" for k, v in SYN.items()))
    (root / "train_test_split").mkdir()
    truth = {}
    for split, k in counts.items():
        entries = []
        for ci, (name, syn) in enumerate(SYN.items()):
            (root / syn).mkdir(exist_ok=True)
            for j in range(k):
                sid = f"{split}{name.lower()}{j:03d}"
                # Airplane uses only parts 0,1 (of 0-3): the table must fill in 2,3
                rows = _shape_rows(rng, n_points[ci], [0, 1] if name == "Airplane" else [4, 5])
                np.savetxt(root / syn / f"{sid}.txt", rows, fmt="%.6f")
                entries.append(f"shape_data/{syn}/{sid}")
                truth[sid] = rows
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))
    return truth


def test_txt_reader(tmp_path):
    root = tmp_path / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    truth = write_txt_folder(root)
    data = load_shapenetpart_txt(root, num_points=32, seed=1)
    assert data.category_names == ["Airplane", "Bag"]
    assert data.category_parts == [SHAPENETPART_PARTS["Airplane"], SHAPENETPART_PARTS["Bag"]]
    assert data.num_parts == 50 and len(data.part_names) == 50
    tr = data.split("train")
    assert tr.points.shape == (6, 32, 3) and tr.points.dtype == np.float32
    assert tr.seg.shape == (6, 32) and tr.seg.dtype == np.int64
    assert tr.category.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.split("val").n == 2 and data.split("test").n == 4
    assert np.linalg.norm(tr.points, axis=2).max() <= 1 + 1e-5
    # every sampled point is a row of its shape file, normalised over the whole shape
    # (centred on the mean, max norm 1), and carries that row's part label
    for i in (0, 3):
        rows = truth[tr.ids[i].split("/")[1]]
        full = normalize_unit_sphere(rows[:, :3])[0]
        np.testing.assert_allclose(full.mean(0), 0, atol=1e-5)
        assert abs(np.linalg.norm(full, axis=1).max() - 1) < 1e-5
        for p, lab in zip(tr.points[i], tr.seg[i]):
            d = np.linalg.norm(full - p, axis=1)
            assert d.min() < 1e-5 and rows[d.argmin(), 6] == lab
    # Airplane has 40 >= 32 points -> no duplicates; Bag has 30 < 32 -> with replacement
    assert len(np.unique(tr.points[0], axis=0)) == 32
    assert tr.category[3] == 1 and len(np.unique(tr.points[3], axis=0)) <= 30
    # seeded
    again = load_shapenetpart_txt(root, num_points=32, seed=1)
    np.testing.assert_array_equal(again.split("test").points, data.split("test").points)
    other = load_shapenetpart_txt(root, num_points=32, seed=2)
    assert not np.array_equal(other.split("train").points, tr.points)


def test_txt_category_subset_and_dispatch(tmp_path):
    root = tmp_path / "pkg" / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    write_txt_folder(root)
    data = load_shapenetpart_txt(root, num_points=16, categories=["bag"], splits=("train", "test"))
    assert data.category_names == ["Bag"] and data.category_parts == [[4, 5]]
    assert set(data.splits) == {"train", "test"} and data.split("train").category.tolist() == [0, 0, 0]
    # load_partseg finds the layout, also one folder down
    d2 = load_partseg(tmp_path / "pkg", num_points=16)
    assert isinstance(d2, PartSegData) and d2.split("train").n == 6


def test_txt_bad_layout_errors(tmp_path):
    with pytest.raises(PartSegError, match="synsetoffset2category.txt"):
        load_shapenetpart_txt(tmp_path)
    root = tmp_path / "sn"
    write_txt_folder(root)
    (root / "train_test_split" / "shuffled_val_file_list.json").unlink()
    with pytest.raises(PartSegError, match="shuffled_val_file_list.json"):
        load_shapenetpart_txt(root, num_points=8)
    # a listed shape file that is missing is named
    victim = next((root / SYN["Bag"]).glob("test*.txt"))
    victim.unlink()
    with pytest.raises(PartSegError, match=victim.name):
        load_shapenetpart_txt(root, num_points=8, splits=("test",))
    with pytest.raises(PartSegError, match="not a part-segmentation dataset"):
        load_partseg(tmp_path / "sn" / "train_test_split")
    with pytest.raises(PartSegError, match="no such folder"):
        load_partseg(tmp_path / "nope")


def test_txt_bad_rows(tmp_path):
    root = tmp_path / "sn"
    write_txt_folder(root, counts={"train": 1, "test": 1})
    f = next((root / SYN["Airplane"]).glob("train*.txt"))
    f.write_text("0 0 0 1 0 0 0\n1 1 1 0 1 0 0.5\n")
    with pytest.raises(PartSegError, match="integer part ids"):
        load_shapenetpart_txt(root, num_points=8, splits=("train",))


def _write_h5(path, data, label, pid):
    with h5py.File(path, "w") as f:
        f["data"], f["label"], f["pid"] = data, label, pid


def test_h5_reader(tmp_path):
    rng = np.random.default_rng(0)
    N = 64
    for split, files in {"train": 2, "val": 1, "test": 1}.items():
        for k in range(files):
            n = 5
            lab = np.array([0, 1, 0, 1, 1])[:, None].astype(np.uint8)
            pid = np.where(lab == 0, rng.integers(0, 4, (n, N)), rng.integers(4, 6, (n, N)))
            _write_h5(tmp_path / f"ply_data_{split}{k}.h5", rng.normal(size=(n, N, 3)).astype(np.float32), lab, pid)
    (tmp_path / "all_object_categories.txt").write_text("Airplane\t02691156\nBag\t02773838\n")
    data = load_shapenetpart_h5(tmp_path)
    assert data.category_names == ["Airplane", "Bag"]
    assert data.category_parts == [[0, 1, 2, 3], [4, 5]]
    tr = data.split("train")
    assert tr.points.shape == (10, N, 3) and tr.seg.shape == (10, N)
    assert tr.category.tolist() == [0, 1, 0, 1, 1] * 2
    np.testing.assert_allclose(np.linalg.norm(tr.points, axis=2).max(axis=1), 1, atol=1e-5)
    assert tr.ids[5].startswith("ply_data_train1.h5")
    sub = load_partseg(tmp_path, num_points=32)
    assert sub.split("test").points.shape == (5, 32, 3)
    # seg stays aligned with points after resampling: Bag shapes only carry parts 4, 5
    assert set(np.unique(sub.split("test").seg[sub.split("test").category == 1])) <= {4, 5}


def test_h5_without_pid_is_rejected(tmp_path):
    with h5py.File(tmp_path / "ply_data_train0.h5", "w") as f:
        f["data"], f["label"] = np.zeros((2, 8, 3), np.float32), np.zeros((2, 1), np.uint8)
    with h5py.File(tmp_path / "ply_data_test0.h5", "w") as f:
        f["data"], f["label"] = np.zeros((2, 8, 3), np.float32), np.zeros((2, 1), np.uint8)
    with pytest.raises(PartSegError, match="pid"):
        load_partseg(tmp_path)
    (tmp_path / "ply_data_test0.h5").unlink()
    with pytest.raises(PartSegError, match="ply_data_test"):
        load_shapenetpart_h5(tmp_path)


def test_stratified_subset_seeded():
    cat = np.array([0] * 50 + [1] * 10 + [2] * 1)
    a = stratified_subset(cat, 0.2, seed=3)
    b = stratified_subset(cat, 0.2, seed=3)
    c = stratified_subset(cat, 0.2, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.bincount(cat[a]).tolist() == [10, 2, 1]  # stratified, >= 1 per category
    assert np.all(np.diff(a) > 0)
    assert np.bincount(cat[stratified_subset(cat, 0.02, seed=0)]).tolist() == [1, 1, 1]
    np.testing.assert_array_equal(stratified_subset(cat, 1.0), np.arange(cat.size))
    with pytest.raises(ValueError):
        stratified_subset(cat, 0.0)


def test_split_validation():
    with pytest.raises(ValueError, match="seg"):
        PartSegSplit(np.zeros((2, 4, 3)), np.zeros((2, 5)), np.zeros(2))
    with pytest.raises(ValueError, match="outside"):
        PartSegData({"train": PartSegSplit(np.zeros((1, 4, 3)), np.full((1, 4), 7), np.zeros(1))},
                    ["a"], ["a/x", "a/y"], [[0, 1]])


def test_from_store(tmp_path):
    import xmodal.data.store as store_mod
    rng = np.random.default_rng(0)
    classes = ["chair", "lamp"]
    part_names = ["chair/leg", "chair/seat", "lamp/base", "lamp/shade", "lamp/pole"]
    splits = {}
    for split, n in {"train": 4, "test": 2}.items():
        labels = np.array([0, 1] * (n // 2))
        pl = np.where(labels[:, None] == 0, rng.integers(0, 2, (n, 16)), rng.integers(2, 5, (n, 16)))
        splits[split] = {
            "ids": [f"{classes[l]}/{split}/{i}" for i, l in enumerate(labels)],
            "labels": labels,
            "points": rng.normal(size=(n, 16, 3)).astype(np.float32),
            "point_labels": pl,
        }
    store_mod.write_store(tmp_path / "ds", classes=classes, splits=splits, part_names=part_names)
    data = load_partseg(tmp_path / "ds")
    assert data.category_names == classes and data.part_names == part_names
    assert data.category_parts == [[0, 1], [2, 3, 4]]
    np.testing.assert_array_equal(data.split("train").seg, splits["train"]["point_labels"])
    np.testing.assert_array_equal(data.split("test").category, [0, 1])
    assert data.split("train").ids[1] == "lamp/train/1"


def test_from_builtin_source():
    import xmodal.data.builtin  # noqa: F401  (fails, not skips, if broken)
    data = load_partseg("builtin:shapes?train=1&test=1", num_points=48, seed=0)
    tr = data.split("train")
    assert tr.points.shape == (data.num_categories, 48, 3)
    assert np.linalg.norm(tr.points, axis=2).max() <= 1 + 1e-5
    for c, parts in enumerate(data.category_parts):
        names = {data.part_names[p].split("/")[0] for p in parts}
        assert names == {data.category_names[c]}
        assert set(np.unique(tr.seg[tr.category == c])) <= set(parts)
    again = load_partseg("builtin:shapes?train=1&test=1", num_points=48, seed=0)
    np.testing.assert_array_equal(again.split("test").points, data.split("test").points)


def test_sample_labelled_mesh_keeps_faces_in_the_points_frame():
    from xmodal.data.sampling import sample_point_cloud
    from xmodal.data.types import Mesh

    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 3)) * 5 + 20  # a tetrahedron far from the origin
    f = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    mesh = Mesh(v, f, face_labels=np.array([4, 4, 7, 9]))
    points, seg, faces = sample_labelled_mesh(mesh, 64, seed=3)
    pc = sample_point_cloud(mesh, 64, seed=3)
    np.testing.assert_array_equal(points, pc.points)
    np.testing.assert_array_equal(seg, pc.point_labels)
    np.testing.assert_array_equal(faces.labels, [4, 4, 7, 9])
    # the same similarity maps the mesh onto the points: recover it from the vertices' images
    # (the centroids) and check the areas scale by its square
    raw_centroids = v[f].mean(axis=1)
    scale = np.linalg.norm(raw_centroids[1] - raw_centroids[0]) / np.linalg.norm(faces.centroids[1] - faces.centroids[0])
    offset = raw_centroids - scale * faces.centroids
    np.testing.assert_allclose(offset, offset[:1].repeat(4, 0), atol=1e-4)
    tri = v[f]
    raw_areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    np.testing.assert_allclose(faces.areas * scale**2, raw_areas, rtol=1e-5)
    assert np.linalg.norm(faces.centroids, axis=1).max() < 1.0  # inside the cloud's unit sphere
