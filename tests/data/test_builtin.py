"""Tests of the procedural ``builtin:shapes`` families."""

from __future__ import annotations

import numpy as np
import pytest

from xmodal.data import builtin
from xmodal.data.builtin import (
    CLASSES,
    OPTIONAL_PARTS,
    PARTS,
    BuiltinSource,
    make_shape,
    part_ids,
    part_names,
)
from xmodal.data.types import Item, Mesh, MeshError, Source

N_SEEDS = 30


def _face_areas(m: Mesh) -> np.ndarray:
    tri = m.vertices[m.faces]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


def _signed_volume(m: Mesh) -> float:
    tri = m.vertices[m.faces]
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)


# --------------------------------------------------------------------------- names and ids


def test_classes_and_parts_tables():
    assert len(CLASSES) >= 12
    assert CLASSES == sorted(CLASSES) == sorted(PARTS)
    for cls, opt in OPTIONAL_PARTS.items():
        assert opt <= set(PARTS[cls]), cls
        assert set(PARTS[cls]) - opt, f"{cls} has no mandatory part"


def test_part_names_and_ids_are_global_and_consistent():
    names = part_names()
    assert len(names) == len(set(names)) == sum(len(p) for p in PARTS.values())
    seen = []
    for cls in CLASSES:
        ids = part_ids(cls)
        assert [names[i] for i in ids] == [f"{cls}/{p}" for p in PARTS[cls]]
        seen += ids
    assert sorted(seen) == list(range(len(names)))
    with pytest.raises(ValueError, match="unknown built-in shape class 'teapot'"):
        part_ids("teapot")


# --------------------------------------------------------------------------- make_shape


def test_make_shape_is_deterministic():
    for cls in ("chair", "mug", "airplane"):
        a, b, c = make_shape(cls, 7), make_shape(cls, 7), make_shape(cls, 8)
        np.testing.assert_array_equal(a.vertices, b.vertices)
        np.testing.assert_array_equal(a.faces, b.faces)
        np.testing.assert_array_equal(a.face_labels, b.face_labels)
        assert a.vertices.shape != c.vertices.shape or not np.allclose(a.vertices, c.vertices)
    # the class enters the generator: same seed, different class -> different stream
    chair, stool = make_shape("chair", 3), make_shape("stool", 3)
    assert chair.vertices.shape != stool.vertices.shape or not np.allclose(chair.vertices, stool.vertices)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_make_shape_rejects_bad_seed(bad):
    with pytest.raises(ValueError, match="seed"):
        make_shape("chair", bad)


def test_make_shape_rejects_unknown_class():
    with pytest.raises(ValueError, match="unknown built-in shape class"):
        make_shape("teapot", 0)


@pytest.mark.parametrize("cls", CLASSES)
def test_every_class_builds_valid_labelled_meshes(cls):
    ids = set(part_ids(cls))
    names = PARTS[cls]
    present = {p: 0 for p in names}
    for seed in range(N_SEEDS):
        m = make_shape(cls, seed)
        v, f, lab = m.vertices, m.faces, m.face_labels
        assert v.dtype == np.float64 and v.ndim == 2 and v.shape[1] == 3
        assert f.dtype == np.int64 and f.ndim == 2 and f.shape[1] == 3
        assert lab is not None and lab.dtype == np.int64 and lab.shape == (len(f),)
        assert 500 <= len(f) <= 10_000, (cls, seed, len(f))
        assert np.isfinite(v).all()
        assert f.min() >= 0 and f.max() < len(v)
        assert set(np.unique(lab).tolist()) <= ids
        areas = _face_areas(m)
        assert areas.sum() > 0 and (areas > 0).all(), (cls, seed)
        # centred on its bounding box, size independent of the class
        lo, hi = v.min(axis=0), v.max(axis=0)
        np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-9)
        assert 0.5 - 1e-9 <= np.linalg.norm(hi - lo) <= 2.0 + 1e-9
        for i in np.unique(lab):
            present[names[int(i) - min(ids)]] += 1
    optional = OPTIONAL_PARTS.get(cls, frozenset())
    for p, n in present.items():
        if p in optional:
            assert 0.15 * N_SEEDS <= n < N_SEEDS, f"optional {cls}/{p} in {n}/{N_SEEDS} objects"
        else:
            assert n == N_SEEDS, f"{cls}/{p} missing from {N_SEEDS - n}/{N_SEEDS} objects"


@pytest.mark.parametrize("cls", ["bed", "bookshelf", "car", "chair", "stool", "table"])
def test_closed_part_classes_are_wound_outwards(cls):
    # these classes are unions of closed primitives, so the signed volume is the
    # sum of the part volumes: positive only if every part keeps outward winding
    for seed in range(5):
        m = make_shape(cls, seed)
        assert _signed_volume(m) > 0


def test_subdivision_keeps_part_labels_and_areas():
    b = builtin._Builder("table")
    b.box("top", (2.0, 1.0, 0.1), (0, 0, 1.0), subdiv=0)
    b.cylinder("leg", (0, 0, 0), (0, 0, 1.0), 0.05, sections=8)
    v, f, lab = b.build()
    v2, f2, lab2 = builtin._subdivide_labelled(v, f, lab)
    assert len(f2) == 4 * len(f)
    a1 = _face_areas(Mesh(v, f, lab))
    a2 = _face_areas(Mesh(v2, f2, lab2))
    for pid in np.unique(lab):
        np.testing.assert_allclose(a2[lab2 == pid].sum(), a1[lab == pid].sum(), rtol=1e-12)


def test_part_placement_matches_requested_geometry():
    b = builtin._Builder("table")
    b.box("top", (2.0, 1.0, 0.1), (0.5, 0, 1.0))
    b.cylinder("leg", (0, 0, 0), (0.3, 0.4, 0.0), 0.05, sections=12)
    v, f, lab = b.build()
    top = v[np.unique(f[lab == part_ids("table")[0]])]
    np.testing.assert_allclose(top.min(axis=0), [-0.5, -0.5, 0.95])
    np.testing.assert_allclose(top.max(axis=0), [1.5, 0.5, 1.05])
    leg = v[np.unique(f[lab == part_ids("table")[1]])]
    axis = np.array([0.3, 0.4, 0.0]) / 0.5
    t = leg @ axis
    np.testing.assert_allclose([t.min(), t.max()], [0.0, 0.5], atol=1e-12)
    radial = np.linalg.norm(leg - np.outer(t, axis), axis=1)
    assert radial.max() == pytest.approx(0.05)


# --------------------------------------------------------------------------- the source


def test_builtin_source_items():
    src = BuiltinSource(train_per_class=3, test_per_class=2, seed=5)
    assert isinstance(src, Source)
    assert src.kind == "mesh" and src.up_axis == "z"
    assert src.classes == sorted(CLASSES)
    assert src.part_names == part_names()
    assert "builtin" in src.description
    assert len(src.items) == 5 * len(CLASSES)
    ids = [it.id for it in src.items]
    assert len(set(ids)) == len(ids)
    assert len({it.index for it in src.items}) == len(src.items)
    for it in src.items:
        assert it.path is None and it.index >= 0
        cls, split, name = it.id.split("/")
        assert cls == it.label and split == it.split
        assert name.startswith(f"{cls}_") and len(name) == len(cls) + 5
    for cls in CLASSES:
        assert sum(it.label == cls and it.split == "train" for it in src.items) == 3
        assert sum(it.label == cls and it.split == "test" for it in src.items) == 2
    it = src.items[0]
    m = src.load(it)
    np.testing.assert_array_equal(m.vertices, make_shape(it.label, it.index).vertices)


def test_builtin_source_seeds_are_stable_and_seed_dependent():
    small = {it.id: it.index for it in BuiltinSource(2, 1, seed=0).items}
    big = {it.id: it.index for it in BuiltinSource(4, 3, seed=0).items}
    other = {it.id: it.index for it in BuiltinSource(2, 1, seed=1).items}
    assert all(big[k] == v for k, v in small.items())  # growing a split keeps its objects
    assert all(other[k] != v for k, v in small.items())
    assert {it.id: it.index for it in BuiltinSource(2, 1, seed=0).items} == small


def test_builtin_source_rejects_bad_arguments_and_foreign_items():
    with pytest.raises(ValueError, match="train_per_class"):
        BuiltinSource(train_per_class=-1)
    with pytest.raises(ValueError, match="seed"):
        BuiltinSource(seed=-3)
    with pytest.raises(ValueError, match="unknown built-in shape class"):
        BuiltinSource(classes=["teapot"])
    src = BuiltinSource(1, 0, classes=["mug", "chair"])
    assert src.classes == ["chair", "mug"] and len(src.items) == 2
    with pytest.raises(MeshError, match="not a builtin:shapes item"):
        src.load(Item(id="x/train/x_0000", label="teapot", split="train", index=3))


# --------------------------------------------------------------------------- non-separability


def _point_features(m: Mesh, seed: int) -> np.ndarray:
    """Shape features from a surface sample: normalised extents, D2 histogram, occupancy."""
    import trimesh

    tm = trimesh.Trimesh(m.vertices, m.faces, process=False)
    p, _ = trimesh.sample.sample_surface(tm, 512, seed=seed)
    ext = p.max(axis=0) - p.min(axis=0)
    occ = np.histogramdd((p - p.min(axis=0)) / ext, bins=3, range=[(0, 1)] * 3)[0].ravel() / len(p)
    c = p - p.mean(axis=0)
    c /= np.linalg.norm(c, axis=1).max()
    pairs = np.random.default_rng(seed).integers(0, len(c), size=(2000, 2))
    d2 = np.histogram(np.linalg.norm(c[pairs[:, 0]] - c[pairs[:, 1]], axis=1), bins=12, range=(0, 2))[0]
    return np.concatenate([ext / ext.max(), d2 / len(pairs), occ])


def test_bounding_box_alone_does_not_separate_classes():
    """Raw bounding-box extents must be a much weaker cue than the surface geometry."""
    from sklearn.ensemble import RandomForestClassifier

    n_train, n_test = 14, 6
    xb, xp, y, train = [], [], [], []
    for ci, cls in enumerate(CLASSES):
        for k in range(n_train + n_test):
            m = make_shape(cls, 1000 + k)
            xb.append(m.vertices.max(axis=0) - m.vertices.min(axis=0))
            xp.append(_point_features(m, seed=k))
            y.append(ci)
            train.append(k < n_train)
    xb, xp, y, train = map(np.asarray, (xb, xp, y, train))

    def accuracy(x):
        clf = RandomForestClassifier(n_estimators=200, random_state=0, n_jobs=1).fit(x[train], y[train])
        return clf.score(x[~train], y[~train])

    acc_bbox, acc_points = accuracy(xb), accuracy(xp)
    # measured: bbox 0.36, points 0.90 (14 classes, chance 0.07)
    assert acc_bbox < 0.6, acc_bbox
    assert acc_points > 0.75, acc_points
    assert acc_points - acc_bbox >= 0.15, (acc_bbox, acc_points)
