"""Tests of xmodal.data.sources: mesh folders, ModelNet40 HDF5 points, builtin specs."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from collections import Counter

import h5py
import numpy as np
import pytest

from xmodal.data.sources import (
    MeshFolderSource,
    ModelNetH5Source,
    open_source,
    stratified_holdout,
)
from xmodal.data.types import Mesh, PointCloud

TETRA = "OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 {z}\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"


def _tetra(path, z=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TETRA.format(z=z))
    return path


def _split_of(src):
    return {it.id: it.split for it in src.items}


# ----------------------------------------------------------------------- mesh folders


def test_modelnet_layout(tmp_path):
    for cls, split, n in [("chair", "train", 3), ("chair", "test", 1), ("table", "train", 2), ("table", "test", 2)]:
        for i in range(n):
            _tetra(tmp_path / cls / split / f"{cls}_{split}{i:04d}.off", z=1.0 + i)
    _tetra(tmp_path / "chair" / "README_dir" / "ignored.off")  # outside the split folders
    src = open_source(tmp_path)
    assert isinstance(src, MeshFolderSource)
    assert src.kind == "mesh" and src.up_axis == "z" and src.layout == "modelnet"
    assert src.classes == ["chair", "table"]
    assert Counter((it.label, it.split) for it in src.items) == {
        ("chair", "train"): 3, ("chair", "test"): 1, ("table", "train"): 2, ("table", "test"): 2,
    }
    ids = [it.id for it in src.items]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert "chair/train/chair_train0000" in ids
    for it in src.items:
        cls, split, _ = it.id.split("/")
        assert (cls, split) == (it.label, it.split)
    mesh = src.load(src.items[0])
    assert isinstance(mesh, Mesh) and mesh.faces.shape == (4, 3)


def _class_folders(root, sizes):
    for cls, n in sizes.items():
        for i in range(n):
            sub = "nested/deeper" if i % 3 == 2 else ""
            _tetra(root / cls / sub / f"{cls}{i:03d}.off", z=1.0 + i)


def test_class_folder_split_seeded_and_stratified(tmp_path):
    sizes = {"a": 10, "b": 5, "c": 1, "d": 2}
    _class_folders(tmp_path, sizes)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "notes.txt").write_text("not a mesh")
    src = MeshFolderSource(tmp_path, seed=0, test_ratio=0.2)
    assert src.layout == "class-folders"
    assert src.classes == ["a", "b", "c", "d"]  # empty folders are not classes
    n_test = Counter(it.label for it in src.items if it.split == "test")
    assert n_test == {"a": 2, "b": 1, "d": 1}  # round(n * 0.2), >= 1 when n >= 2, "c" stays train
    assert len(src.items) == sum(sizes.values())
    assert all(it.id.startswith(f"{it.label}/{it.split}/") for it in src.items)

    again = MeshFolderSource(tmp_path, seed=0, test_ratio=0.2)
    assert [(it.id, it.path) for it in again.items] == [(it.id, it.path) for it in src.items]
    other = MeshFolderSource(tmp_path, seed=1, test_ratio=0.2)
    assert {p for p, s in ((it.path, it.split) for it in other.items) if s == "test"} != {
        it.path for it in src.items if it.split == "test"
    }
    assert Counter(it.label for it in other.items if it.split == "test") == n_test
    # recursive discovery below the class folder
    assert any("nested" in it.path for it in src.items)


def test_class_folder_split_of_one_class_ignores_other_classes(tmp_path):
    _class_folders(tmp_path / "r1", {"a": 10, "b": 5})
    _class_folders(tmp_path / "r2", {"a": 10, "zzz": 7})
    s1 = {it.path.split("r1/")[1]: it.split for it in MeshFolderSource(tmp_path / "r1").items if it.label == "a"}
    s2 = {it.path.split("r2/")[1]: it.split for it in MeshFolderSource(tmp_path / "r2").items if it.label == "a"}
    assert s1 == s2


def test_duplicate_stems_get_unique_deterministic_ids(tmp_path):
    _tetra(tmp_path / "a" / "x.off")
    _tetra(tmp_path / "a" / "sub" / "x.off")
    box = tmp_path / "a" / "x.obj"
    box.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    _tetra(tmp_path / "a" / "y.off")
    src = MeshFolderSource(tmp_path, test_ratio=0.0)
    ids = [it.id for it in src.items]
    assert len(set(ids)) == 4
    assert set(ids) == {"a/train/x_off", "a/train/sub__x_off", "a/train/x_obj", "a/train/y"}
    assert ids == [it.id for it in MeshFolderSource(tmp_path, test_ratio=0.0).items]
    assert src.load(next(it for it in src.items if it.id == "a/train/x_obj")).faces.shape == (1, 3)


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="needs a file system that takes any bytes in names")
def test_names_that_are_not_utf8_become_escaped_ids_and_classes(tmp_path):
    root = os.fsencode(tmp_path)
    for name in (b"caf\xe9/m\xe9.off", b"caf\xe9/b.off", b"box/a.off"):
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(TETRA.format(z=1.0))
    src = MeshFolderSource(tmp_path, test_ratio=0.0)
    assert src.classes == ["box", "caf\\xe9"]
    assert [it.id for it in src.items] == ["box/train/a", "caf\\xe9/train/b", "caf\\xe9/train/m\\xe9"]
    for it in src.items:  # storable as UTF-8, and the path still opens the file
        it.id.encode("utf-8")
        assert src.load(it).faces.shape == (4, 3)


def test_split_folders_first_layout(tmp_path, caplog):
    """<root>/<split>/<class>/: the split and the class from the path, as in ModelNet's layout."""
    for split, cls, n in [("train", "chair", 3), ("test", "chair", 1), ("test", "bed", 2)]:
        for i in range(n):
            _tetra(tmp_path / split / cls / "deeper" / f"{cls}{i}.off", z=1.0 + i)
    _tetra(tmp_path / "train" / "bed" / "b0.off")
    _tetra(tmp_path / "val" / "chair" / "v0.off")  # no such split in a store: named, not read
    (tmp_path / "test" / "lamp").mkdir()  # no mesh: not a class
    with caplog.at_level("WARNING", logger="xmodal.data.sources"):
        src = open_source(tmp_path)
    assert isinstance(src, MeshFolderSource) and src.layout == "split-folders"
    assert src.classes == ["bed", "chair"]
    assert Counter((it.label, it.split) for it in src.items) == {
        ("chair", "train"): 3, ("chair", "test"): 1, ("bed", "train"): 1, ("bed", "test"): 2,
    }
    assert all(it.id.startswith(f"{it.label}/{it.split}/") for it in src.items)
    assert "splits from the <split>/<class>/ folders" in src.description
    assert f"{tmp_path / 'val'}: 1 mesh files in it are not used" in caplog.text
    assert "1 class folders hold no mesh file (['lamp'])" in caplog.text


def test_one_class_given_for_a_collection_is_refused_with_a_hint(tmp_path):
    """The train/test folders of a single ModelNet class, given as the collection: their split
    folders hold meshes, no class folders (it used to make 'train' and 'test' the classes)."""
    from xmodal.errors import DataError

    for split in ("train", "test"):
        _tetra(tmp_path / "bathtub" / split / "bathtub_0001.off")
    with pytest.raises(DataError, match="read as splits.*give the folder that holds the class folders"):
        open_source(tmp_path / "bathtub")
    assert open_source(tmp_path).classes == ["bathtub"]


def test_meshes_in_val_folders_and_empty_class_folders_are_named(tmp_path, caplog):
    _tetra(tmp_path / "chair" / "train" / "a.off")
    _tetra(tmp_path / "chair" / "val" / "v.off")
    _tetra(tmp_path / "chair" / "Validation" / "w.off")
    (tmp_path / "lamp").mkdir()
    (tmp_path / "lamp" / "notes.txt").write_text("no mesh")
    (tmp_path / "sofa" / "train").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="xmodal.data.sources"):
        src = MeshFolderSource(tmp_path)
    assert [it.id for it in src.items] == ["chair/train/a"] and src.classes == ["chair"]
    assert "2 mesh files in its sub-folder(s) Validation/, val/ are not used" in caplog.text
    assert "2 class folders hold no mesh file (['lamp', 'sofa'])" in caplog.text


def test_meshes_a_layout_does_not_read_are_named_in_a_warning(tmp_path, caplog):
    _tetra(tmp_path / "chair" / "train" / "a.off")
    _tetra(tmp_path / "chair" / "b.off")  # beside chair/train/: not read
    _tetra(tmp_path / "table" / "c.off")
    _tetra(tmp_path / "d.off")  # directly in the root: not read
    with caplog.at_level("WARNING", logger="xmodal.data.sources"):
        src = MeshFolderSource(tmp_path, test_ratio=0.0)
    assert sorted(it.id for it in src.items) == ["chair/train/a", "table/train/c"]
    assert "1 mesh files beside its train folder(s) are not used" in caplog.text
    assert "1 mesh files lie directly in it and are not used" in caplog.text


def test_empty_folders_raise_naming_the_folder(tmp_path):
    with pytest.raises(ValueError, match="no mesh files found") as info:
        open_source(tmp_path)
    assert str(tmp_path) in str(info.value)
    _tetra(tmp_path / "loose.off")
    with pytest.raises(ValueError, match="directly in it"):
        MeshFolderSource(tmp_path)


def test_real_modelnet_off_folder(modelnet_off_dir):
    src = open_source(modelnet_off_dir)
    assert src.classes == ["bathtub", "bed"]
    assert [it.id for it in src.items][:2] == ["bathtub/train/bathtub_0001", "bathtub/train/bathtub_0002"]
    assert {it.split for it in src.items} == {"train"} and len(src.items) == 6
    mesh = src.load(src.items[-1])
    assert mesh.faces.shape[1] == 3 and len(mesh.faces) > 0


# ----------------------------------------------------------------------- spec parsing


def test_open_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:  # a MissingInputError
        open_source(tmp_path / "missing")
    assert "accepted sources" in info.value.hint
    f = tmp_path / "one.off"
    _tetra(f)
    with pytest.raises(ValueError, match="is a file"):
        open_source(f)
    with pytest.raises(ValueError, match="builtin:shapes"):
        open_source("builtin:cubes")
    with pytest.raises(ValueError, match="test_ratio"):
        open_source(tmp_path, test_ratio=1.5)


@pytest.fixture
def fake_builtin(monkeypatch):
    """Stand-in for xmodal.data.builtin recording the keyword arguments it gets."""
    calls = []

    class BuiltinSource:
        def __init__(self, **kwargs):
            calls.append(kwargs)

    mod = types.ModuleType("xmodal.data.builtin")
    mod.BuiltinSource = BuiltinSource
    monkeypatch.setitem(sys.modules, "xmodal.data.builtin", mod)
    return calls


def test_builtin_spec_parsing(fake_builtin):
    open_source("builtin:shapes")
    open_source("builtin:shapes?train=4&test=2&seed=7")
    open_source("builtin:shapes?test=3", seed=5)
    assert fake_builtin == [
        {"seed": 0},
        {"train_per_class": 4, "test_per_class": 2, "seed": 7},
        {"test_per_class": 3, "seed": 5},
    ]
    with pytest.raises(ValueError, match="valid parameters: train, test, seed"):
        open_source("builtin:shapes?views=3")
    with pytest.raises(ValueError, match="must be an integer"):
        open_source("builtin:shapes?train=many")
    with pytest.raises(ValueError, match="2 times"):
        open_source("builtin:shapes?train=1&train=2")
    assert len(fake_builtin) == 3


# ----------------------------------------------------------------------- HDF5 points


def test_stratified_holdout_properties():
    labels = np.repeat(np.arange(4), [10, 5, 1, 3])
    t = stratified_holdout(labels, 0.2, seed=0)
    assert [int(t[labels == c].sum()) for c in range(4)] == [2, 1, 0, 1]
    np.testing.assert_array_equal(t, stratified_holdout(labels, 0.2, seed=0))
    assert not np.array_equal(t, stratified_holdout(labels, 0.2, seed=3))
    assert not stratified_holdout(labels, 0.0, seed=0).any()


def _write_h5_folder(root, *, with_test, names=("zebra", "apple", "mango"), p=16):
    """A tiny ModelNet40-HDF5-like folder; returns {(file name, row): (points, label)}."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "shape_names.txt").write_text("\n".join(names) + "\n")
    files = [("ply_data_train0.h5", 12), ("ply_data_train1.h5", 9)] + ([("ply_data_test0.h5", 6)] if with_test else [])
    truth = {}
    for fname, n in files:
        data = rng.standard_normal((n, p, 3)).astype(np.float32)
        label = (np.arange(n) % len(names)).astype(np.uint8)[:, None]
        with h5py.File(root / fname, "w") as h5:
            h5.create_dataset("data", data=data, chunks=(4, p, 1), compression="gzip")
            h5.create_dataset("label", data=label)
        for r in range(n):
            truth[(fname, r)] = (data[r], names[label[r, 0]])
    ids = [f"{names[r % 3]}/{names[r % 3]}_{r:04d}.off" for r in range(12)]
    (root / "ply_data_train_0_id2file.json").write_text(json.dumps(ids))
    (root / "train_files.txt").write_text("data/x/ply_data_train0.h5\ndata/x/ply_data_train1.h5\n")
    return truth


def test_h5_source_with_test_file(tmp_path):
    truth = _write_h5_folder(tmp_path, with_test=True)
    src = open_source(tmp_path)
    assert isinstance(src, ModelNetH5Source)
    assert src.kind == "points" and src.up_axis == "y" and src.num_points == 16
    assert src.held_out is False and "held-out" not in src.description
    assert src.classes == ["apple", "mango", "zebra"]
    assert Counter(it.split for it in src.items) == {"train": 21, "test": 6}
    assert len({it.id for it in src.items}) == 27
    first = src.items[0]
    assert first.id == "zebra/train/zebra_0000" and first.index == 0  # from the id2file json
    assert any(it.id == "apple/test/ply_data_test0_00001" for it in src.items)  # no json: file + row
    for it in src.items[::5]:
        pc = src.load(it)
        assert isinstance(pc, PointCloud) and pc.points.dtype == np.float32
        pts, label = truth[(it.path.rsplit("/", 1)[1], it.index)]
        np.testing.assert_array_equal(pc.points, pts)
        assert it.label == label
    pts, labels, ids = src.load_all("test")
    assert pts.shape == (6, 16, 3) and pts.dtype == np.float32 and labels.dtype == np.int64
    test_items = [it for it in src.items if it.split == "test"]
    assert ids == [it.id for it in test_items]
    for k, it in enumerate(test_items):
        np.testing.assert_array_equal(pts[k], src.load(it).points)
        assert src.classes[labels[k]] == it.label  # labels index the sorted class list
    # picklable for worker processes, even with open handles
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.load(src.items[3]).points, src.load(src.items[3]).points)
    src.close()


def test_h5_source_holds_out_test_when_missing(tmp_path):
    _write_h5_folder(tmp_path, with_test=False)
    src = ModelNetH5Source(tmp_path, seed=0, test_ratio=0.25)
    assert src.held_out is True and "held-out" in src.description
    assert src.describe()["held_out"] is True
    assert len(src.items) == 21
    per_class = Counter(it.label for it in src.items)
    per_class_test = Counter(it.label for it in src.items if it.split == "test")
    assert per_class_test == {c: round(n * 0.25) for c, n in per_class.items()}
    same = ModelNetH5Source(tmp_path, seed=0, test_ratio=0.25)
    assert _split_of(same) == _split_of(src)
    assert _split_of(ModelNetH5Source(tmp_path, seed=1, test_ratio=0.25)) != _split_of(src)
    pts_tr, lab_tr, ids_tr = src.load_all("train")
    pts_te, lab_te, ids_te = src.load_all("test")
    assert len(ids_tr) + len(ids_te) == 21 and not set(ids_tr) & set(ids_te)
    assert all(i.split("/")[1] == "test" for i in ids_te)


def test_h5_source_rejects_bad_files(tmp_path):
    _write_h5_folder(tmp_path, with_test=False)
    with h5py.File(tmp_path / "ply_data_train1.h5", "a") as h5:
        del h5["label"]
        h5.create_dataset("label", data=np.full((9, 1), 7, np.uint8))
    with pytest.raises(ValueError, match=r"ply_data_train1\.h5: class label 7 out of range"):
        open_source(tmp_path)
    (tmp_path / "train_files.txt").write_text("ply_data_train9.h5\n")
    with pytest.raises(FileNotFoundError, match="ply_data_train9.h5"):
        open_source(tmp_path)


def test_real_modelnet40_h5(modelnet_h5_dir):
    src = open_source(modelnet_h5_dir, seed=0, test_ratio=0.2)
    assert isinstance(src, ModelNetH5Source) and src.held_out
    assert len(src.classes) == 40 and src.classes == sorted(src.classes)
    n = Counter(it.split for it in src.items)
    assert n["train"] + n["test"] == 9843
    assert abs(n["test"] - 0.2 * 9843) < 40  # per-class rounding
    assert all(it.id.split("/")[0] == it.label for it in src.items[:200])
    pts, labels, ids = src.load_all("test")
    assert pts.shape == (n["test"], 1024, 3) and pts.dtype == np.float32
    assert labels.min() >= 0 and labels.max() < 40
    assert len(np.unique(labels)) == 40  # every class is represented in the held-out part
    assert np.isfinite(pts).all() and np.linalg.norm(pts, axis=-1).max() <= 1.0 + 1e-4
    test_items = [it for it in src.items if it.split == "test"]
    np.testing.assert_array_equal(src.load(test_items[7]).points, pts[7])
    assert ids[7] == test_items[7].id
    src.close()
