"""Tests of the dataset store: writer, reader, manifest validation, atomicity."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from xmodal.data import store as st
from xmodal.data.datasets import open_dataset
from xmodal.data.store import (
    FORMAT_VERSION,
    ShapeStore,
    StoreError,
    read_shard,
    write_shard,
    write_store,
)


def _split_arrays(n, *, views=3, points=16, size=8, seed=0, n_classes=3, with_images=True):
    rng = np.random.default_rng(seed)
    out = {
        "ids": [f"c{i % n_classes}/obj_{seed}_{i:03d}" for i in range(n)],
        "labels": rng.integers(0, n_classes, n),
        "points": rng.normal(size=(n, points, 3)).astype(np.float32),
        "point_labels": rng.integers(0, 5, (n, points)),
    }
    if with_images:
        out["images"] = rng.integers(0, 256, (n, views, size, size), dtype=np.uint8)
        out["cameras"] = rng.uniform(0, 360, (n, views, 2)).astype(np.float32)
    return out


@pytest.fixture
def arrays():
    return {"train": _split_arrays(7, seed=1), "test": _split_arrays(3, seed=2)}


@pytest.fixture
def store(tmp_path, arrays):
    return write_store(
        tmp_path / "ds",
        classes=["a", "b", "c"],
        splits=arrays,
        settings={"seed": 0},
        part_names=["p0", "p1", "p2", "p3", "p4"],
        chunk_size=3,
        source={"kind": "synthetic"},
    )


def test_round_trip_arrays_equal(store, arrays):
    assert store.classes == ["a", "b", "c"]
    assert store.counts == {"train": 7, "test": 3}
    assert (store.views, store.num_points, store.image_size) == (3, 16, 8)
    assert store.has_images and store.up_axis == "z" and store.part_names[4] == "p4"
    for name, a in arrays.items():
        sv = store.split(name)
        assert sv.n == len(a["ids"]) == len(sv)
        assert sv.ids == a["ids"]
        np.testing.assert_array_equal(sv.labels, a["labels"])
        assert sv.labels.dtype == np.int64
        np.testing.assert_array_equal(sv.all_points(), a["points"])
        for i in range(sv.n):
            np.testing.assert_array_equal(sv.points(i), a["points"][i])
            np.testing.assert_array_equal(sv.point_labels(i), a["point_labels"][i])
            np.testing.assert_array_equal(sv.cameras(i), a["cameras"][i])
            np.testing.assert_array_equal(sv.images(i), a["images"][i])
            for v in range(3):
                np.testing.assert_array_equal(sv.image(i, v), a["images"][i, v])
            assert sv.index_of(a["ids"][i]) == i
    # chunk_size=3 -> 3 + 1 shards, sizes in the manifest
    assert store.manifest["shards"]["train"] == [st.shard_relpath("train", c) for c in range(3)]
    assert store.manifest["shard_sizes"]["train"] == [3, 3, 1]


def test_manifest_has_contract_keys(store):
    man = json.loads((store.root / "manifest.json").read_text())
    for key in st._REQUIRED_KEYS:
        assert key in man
    assert man["format_version"] == FORMAT_VERSION
    assert man["settings"] == {"seed": 0}


def test_images_any_order_and_repeats(store, arrays):
    sv = store.split("train")
    ref = arrays["train"]["images"][4]
    for views in ([2, 0], [1, 1, 0], [2], [0, 1, 2], [-1, 0], []):
        got = sv.images(4, views)
        np.testing.assert_array_equal(got, ref[np.asarray(views, dtype=int)] if views else ref[:0])
    with pytest.raises(IndexError, match="3 views"):
        sv.images(0, [3])
    with pytest.raises(IndexError, match="out of range"):
        sv.points(7)
    np.testing.assert_array_equal(sv.points(-1), arrays["train"]["points"][-1])


def test_lazy_open_and_pickling(store, arrays):
    sv = store.split("train")
    assert sv._files == {}  # nothing opened yet by split()/labels from the manifest
    sv.points(4)  # row 1 of shard 1
    assert set(sv._files) == {1}
    clone = pickle.loads(pickle.dumps(store))
    cv = clone.split("train")
    assert cv._files == {}
    np.testing.assert_array_equal(cv.images(6, [1]), arrays["train"]["images"][6, [1]])
    view_clone = pickle.loads(pickle.dumps(sv))
    assert view_clone._files == {}
    np.testing.assert_array_equal(view_clone.all_points(), arrays["train"]["points"])


def test_reopen_after_pid_change(store, monkeypatch):
    sv = store.split("train")
    sv.points(0)
    old = sv._files[0]
    monkeypatch.setattr(sv, "_pid", -1)  # as if this view had been inherited through fork
    sv.points(0)
    assert sv._files[0] is not old and old.id.valid  # parent's handle left open, new one made


def test_points_only_store_and_empty_split(tmp_path):
    a = _split_arrays(4, with_images=False)
    del a["point_labels"]
    s = write_store(tmp_path / "p", classes=["a", "b", "c"], splits={"train": a, "test": _empty()})
    assert not s.has_images and s.views == 0
    sv = s.split("train")
    assert sv.point_labels(0) is None and sv.cameras(0) is None
    with pytest.raises(StoreError, match="no images"):
        sv.image(0, 0)
    te = s.split("test")
    assert te.n == 0 and te.all_points().shape == (0, 16, 3) and te.ids == []
    with pytest.raises(StoreError, match="no split .val."):
        s.split("val")


def _empty():
    return {"ids": [], "labels": np.zeros(0, np.int64), "points": np.zeros((0, 16, 3), np.float32)}


def test_shard_layout(tmp_path):
    a = _split_arrays(2, views=2, size=16)
    path = write_shard(tmp_path / "s.h5", a)
    with h5py.File(path, "r") as f:
        assert f["images"].chunks == (1, 1, 16, 16)
        assert f["images"].compression in ("gzip", "lzf")
        assert f["point_labels"].dtype == np.int16
        assert h5py.check_string_dtype(f["ids"].dtype) is not None
    back = read_shard(path)
    assert list(back["ids"]) == a["ids"]
    np.testing.assert_array_equal(back["images"], a["images"])


def test_write_shard_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "shards" / "train" / "00000.h5"
    a = _split_arrays(2)
    calls = {"n": 0}

    def failing(self, name, *args, **kw):
        calls["n"] += 1
        if name == "points":
            raise RuntimeError("disk on fire")
        return h5py.Group.create_dataset(self, name, *args, **kw)

    monkeypatch.setattr(h5py.File, "create_dataset", failing, raising=False)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shard(target, a)
    assert calls["n"] >= 2  # it did write something before failing
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary leftovers


def test_write_shard_rejects_bad_arrays(tmp_path):
    a = _split_arrays(2)
    with pytest.raises(ValueError, match="rows"):
        write_shard(tmp_path / "x.h5", {**a, "labels": [0]})
    with pytest.raises(ValueError, match="uint8"):
        write_shard(tmp_path / "x.h5", {**a, "images": a["images"].astype(np.float32)})
    with pytest.raises(ValueError, match="unknown"):
        write_shard(tmp_path / "x.h5", {**a, "normals": a["points"]})
    with pytest.raises(ValueError, match="labels must lie"):
        write_store(tmp_path / "y", classes=["a"], splits={"train": a})
    assert not (tmp_path / "x.h5").exists()


def test_missing_manifest_names_file(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShapeStore(tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShapeStore(tmp_path / "nope")


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "corrupt manifest"),
        ("[1, 2]", "JSON object"),
        (None, "unsupported format_version 99"),
        ("drop-keys", "lacks keys"),
    ],
)
def test_bad_manifest_clear_error(store, content, match):
    path = store.root / "manifest.json"
    if content is None:
        man = json.loads(path.read_text())
        man["format_version"] = 99
        content = json.dumps(man)
    elif content == "drop-keys":
        man = json.loads(path.read_text())
        del man["classes"], man["shards"]
        content = json.dumps(man)
    path.write_text(content)
    with pytest.raises(StoreError, match=match) as info:
        ShapeStore(store.root)
    assert str(path) in str(info.value)


def test_missing_shard_names_file(store):
    (store.root / st.shard_relpath("train", 1)).unlink()
    fresh = ShapeStore(store.root)
    sv = fresh.split("train")
    sv.points(0)  # shard 0 is fine
    with pytest.raises(StoreError, match="00001.h5.*missing"):
        sv.points(3)


def test_manifest_without_shard_sizes(store, arrays):
    path = store.root / "manifest.json"
    man = json.loads(path.read_text())
    del man["shard_sizes"]
    path.write_text(json.dumps(man))
    sv = ShapeStore(store.root).split("train")
    assert sv.n == 7
    np.testing.assert_array_equal(sv.points(5), arrays["train"]["points"][5])


def test_open_dataset_dispatch(store, tmp_path):
    assert isinstance(open_dataset(store.root), ShapeStore)
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a dataset"):
        open_dataset(tmp_path / "empty")


def _write_fake_h5_folder(root: Path, n=12, npts=32, classes=("cup", "desk", "lamp")):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    (root / "shape_names.txt").write_text("\n".join(classes) + "\n")
    files = []
    for k in range(2):
        pts = rng.normal(size=(n, npts, 3)).astype(np.float32)
        pts /= np.linalg.norm(pts, axis=2).max(axis=1)[:, None, None]
        lab = (np.arange(n) % len(classes)).astype(np.uint8)[:, None]
        name = f"ply_data_train{k}.h5"
        with h5py.File(root / name, "w") as f:
            f["data"] = pts
            f["label"] = lab
        ids = [f"{classes[int(l)]}/{classes[int(l)]}_{k}{i:03d}.off" for i, l in enumerate(lab[:, 0])]
        (root / f"ply_data_train_{k}_id2file.json").write_text(json.dumps(ids))
        files.append(f"{root.name}/{name}")
    (root / "train_files.txt").write_text("\n".join(files) + "\n")
    return root


def test_open_dataset_raw_h5_folder(tmp_path):
    import xmodal.data.sources  # noqa: F401  (fails, not skips, if broken)
    root = _write_fake_h5_folder(tmp_path / "mn")
    ds = open_dataset(root, seed=0, test_ratio=0.25)
    assert ds.root is None and not ds.has_images and ds.views == 0
    assert ds.classes == ["cup", "desk", "lamp"] and ds.up_axis == "y"
    assert set(ds.splits) == {"train", "test"}
    assert ds.counts["train"] + ds.counts["test"] == 24 and ds.counts["test"] > 0
    tr, te = ds.split("train"), ds.split("test")
    assert not set(tr.ids) & set(te.ids)
    pts = tr.all_points()
    assert pts.shape == (tr.n, 32, 3) and pts.dtype == np.float32
    np.testing.assert_array_equal(tr.points(2), pts[2])
    assert tr.labels.max() < 3
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.split("test").all_points(), te.all_points())


def test_open_dataset_real_modelnet_h5(modelnet_h5_dir):
    import xmodal.data.sources  # noqa: F401  (fails, not skips, if broken)
    ds = open_dataset(modelnet_h5_dir)
    assert len(ds.classes) == 40
    assert ds.counts["train"] + ds.counts.get("test", 0) == 9843
    p = ds.split("train").points(0)
    assert p.shape == (1024, 3) and np.linalg.norm(p, axis=1).max() <= 1.0 + 1e-4
