"""Labeled PSB: the labels-file parser, the source (categories, global part ids, splits), prepare
with a broken labels file, and the real data (every labels file covers every face exactly once;
prepared point labels are the labels of the faces the points lie on)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from xmodal.data.labeled_psb import LabeledPSBSource, is_labeled_mesh_folder, labels_path, read_face_labels
from xmodal.data.mesh_io import read_mesh_arrays
from xmodal.data.sources import MeshFolderSource, open_source
from xmodal.data.store import ShapeStore
from xmodal.errors import LabelsError, MeshError

# ----------------------------------------------------------------------------- parser


def _labels(tmp_path, text, name="m_labels.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _raises(path, num_faces, match):
    with pytest.raises(LabelsError, match=match) as info:
        read_face_labels(path, num_faces)
    assert str(path) in str(info.value)
    assert isinstance(info.value, MeshError)
    return info.value


def test_read_good_file(tmp_path):
    # a part spanning two lines, a name given twice, blank lines, trailing spaces
    p = _labels(tmp_path, "wing\n3 1 \n\nbody\n2 5\nwing\n6\n4 \n")
    labels, names = read_face_labels(p, 6)
    assert names == ["wing", "body"]
    np.testing.assert_array_equal(labels, [0, 1, 0, 0, 1, 0])
    assert labels.dtype == np.int64


def test_face_left_out(tmp_path):
    p = _labels(tmp_path, "a\n1 2\nb\n4\n")
    err = _raises(p, 5, "2 of 5 faces have no part label")
    assert "faces 3, 5" in str(err)


def test_face_listed_twice_in_two_parts(tmp_path):
    p = _labels(tmp_path, "a\n1 2 3\nb\n3 4\n")
    _raises(p, 4, r"face 3 is listed twice \(under 'a' and 'b', line 4\)")


def test_face_listed_twice_in_one_line(tmp_path):
    p = _labels(tmp_path, "a\n1 2 2\nb\n3\n")
    _raises(p, 3, "face 2 is listed twice")


@pytest.mark.parametrize("bad", ["0", "6", "-1"])
def test_face_out_of_range(tmp_path, bad):
    p = _labels(tmp_path, f"a\n1 2 3\nb\n4 5 {bad}\n")
    _raises(p, 5, rf"line 4: face {bad} is out of range 1\.\.5")


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope_labels.txt", 3, "labels file is missing")


@pytest.mark.parametrize(
    "text, match",
    [
        ("a\n1 2 x\n", r"line 2: 'x' is not a face index"),
        ("a\n1 2.5\n", r"line 2: '2\.5' is not a face index"),
        ("1 2 3\na\n", "line 1: face indices before any part name"),
        ("two words\n1 2 3\n", "line 1: expected a part name"),
        ("a\n1.0\n", "line 2: expected a part name"),
        ("\n\n", "no part labels"),
    ],
)
def test_garbage(tmp_path, text, match):
    _raises(_labels(tmp_path, text), 3, match)


def test_binary_garbage(tmp_path):
    p = tmp_path / "g_labels.txt"
    p.write_bytes(b"\x00\x01\x02abc")
    _raises(p, 3, "binary data")


# ----------------------------------------------------------------------------- source


def test_source_without_split_levels(tmp_path, labeled_tree):
    root = labeled_tree(tmp_path / "lpsb", per_category=5)
    (root / "Cup" / "notes.txt").write_text("not a mesh")
    assert is_labeled_mesh_folder(root)
    src = open_source(root, seed=3, test_ratio=0.4)
    assert isinstance(src, LabeledPSBSource) and src.kind == "mesh" and src.layout == "seeded-split"
    assert src.classes == ["Cup", "Table"]
    assert src.part_names == ["Cup/body", "Cup/handle", "Table/leg", "Table/top"]
    assert src.category_parts == {"Cup": ["body", "handle"], "Table": ["leg", "top"]}
    assert Counter((it.label, it.split) for it in src.items) == {
        ("Cup", "train"): 3, ("Cup", "test"): 2, ("Table", "train"): 3, ("Table", "test"): 2,
    }
    assert all(it.id == f"{it.label}/{it.split}/{Path(it.path).stem}" for it in src.items)
    # the seeded split is deterministic and depends on the seed
    splits = lambda s: {it.id.split("/")[-1]: it.split for it in s.items}  # noqa: E731
    assert splits(LabeledPSBSource(root, seed=3, test_ratio=0.4)) == splits(src)
    assert any(splits(LabeledPSBSource(root, seed=k, test_ratio=0.4)) != splits(src) for k in range(4, 10))
    # global part ids: Table's faces use ids 2 (leg) and 3 (top), following its labels file
    table = next(it for it in src.items if it.label == "Table")
    mesh = src.load(table)
    local, names = read_face_labels(labels_path(table.path), 24)
    expected = np.array([src.part_names.index(f"Table/{n}") for n in names])[local]
    np.testing.assert_array_equal(mesh.face_labels, expected)
    assert set(mesh.face_labels.tolist()) == {2, 3}


def test_source_with_split_levels(tmp_path, labeled_tree):
    root = labeled_tree(tmp_path / "lpsb", per_category=4, split_levels=True, test_per_category=1)
    src = open_source(root, seed=0, test_ratio=0.5)  # the folders decide, not the ratio
    assert isinstance(src, LabeledPSBSource) and src.layout == "split-folders"
    assert Counter((it.label, it.split) for it in src.items) == {
        ("Cup", "train"): 3, ("Cup", "test"): 1, ("Table", "train"): 3, ("Table", "test"): 1,
    }
    for it in src.items:
        assert f"/{it.label}/{it.split}/" in it.path.replace("\\", "/")
    assert src.part_names == ["Cup/body", "Cup/handle", "Table/leg", "Table/top"]


def test_part_table_is_the_union_over_a_category(tmp_path, labeled_tree):
    root = labeled_tree(tmp_path / "lpsb", per_category=2)
    lab = root / "Cup" / "1_labels.txt"
    lab.write_text(lab.read_text().replace("handle", "spout"))
    src = LabeledPSBSource(root)
    assert src.category_parts["Cup"] == ["body", "handle", "spout"]
    meshes = {it.id.split("/")[-1]: src.load(it) for it in src.items if it.label == "Cup"}
    assert set(meshes["0"].face_labels.tolist()) == {0, 1} and set(meshes["1"].face_labels.tolist()) == {0, 2}


def test_plain_mesh_folder_is_not_labeled(tmp_path, labeled_tree):
    root = labeled_tree(tmp_path / "lpsb", per_category=2)
    for p in root.rglob("*_labels.txt"):
        p.unlink()
    assert not is_labeled_mesh_folder(root)
    assert isinstance(open_source(root), MeshFolderSource)


def test_labels_for_a_few_meshes_do_not_make_a_labeled_psb_folder(tmp_path, labeled_tree, caplog):
    root = labeled_tree(tmp_path / "lpsb", per_category=2)
    labels = sorted(root.rglob("*_labels.txt"))
    for p in labels[1:]:  # one stray labels file among plain meshes
        p.unlink()
    with caplog.at_level("WARNING"):
        src = open_source(root)
    assert isinstance(src, MeshFolderSource) and len(src.items) == len(labels)
    assert f"1 of {len(labels)} meshes have a '<stem>_labels.txt'" in caplog.text
    # at least half labelled: Labeled PSB, and the meshes without labels fail there, one by one
    for p in sorted(root.rglob("*.off"))[: len(labels) // 2]:
        labels_path(p).write_text(labels[0].read_text())
    assert not isinstance(open_source(root), MeshFolderSource)


def test_meshes_neither_reader_takes_do_not_count(tmp_path, labeled_tree):
    # every mesh under train/ and test/ labelled; unlabelled copies beside those folders are read by
    # neither source, so the folder stays Labeled PSB
    root = labeled_tree(tmp_path / "lpsb", per_category=2, split_levels=True)
    for cat in [d for d in root.iterdir() if d.is_dir()]:
        some = next(cat.rglob("*.off"))
        for j in range(3):
            (cat / f"extra{j}.off").write_text(some.read_text())
    assert not isinstance(open_source(root), MeshFolderSource)


def test_meshes_deeper_down_count_against_a_few_labels(tmp_path, labeled_tree, caplog):
    # one labelled mesh per category beside many plain meshes one level down, which the mesh-folder
    # reader takes and Labeled PSB does not: a plain mesh collection
    root = labeled_tree(tmp_path / "lpsb", per_category=1)
    for cat in [d for d in root.iterdir() if d.is_dir()]:
        (cat / "more").mkdir()
        some = next(cat.glob("*.off"))
        for j in range(4):
            (cat / "more" / f"m{j}.off").write_text(some.read_text())
    with caplog.at_level("WARNING"):
        src = open_source(root)
    assert isinstance(src, MeshFolderSource) and len(src.items) == 5 * len(list(root.glob("*/*_labels.txt")))
    assert "fewer than half" in caplog.text


def test_upper_case_mesh_suffixes_are_recognised(tmp_path, labeled_tree):
    root = labeled_tree(tmp_path / "lpsb", per_category=2)
    for p in list(root.rglob("*.off")):
        p.rename(p.with_suffix(".OFF"))
    assert is_labeled_mesh_folder(root)
    src = open_source(root)
    assert not isinstance(src, MeshFolderSource) and src.items and src.part_names


def test_degenerate_face_dropped_with_its_label(tmp_path, labeled_tree):
    root = labeled_tree(tmp_path / "lpsb", per_category=1)
    off = root / "Cup" / "0.off"
    lines = off.read_text().splitlines()
    n_v, n_f, _ = map(int, lines[1].split())
    lines[1] = f"{n_v} {n_f + 1} 0"
    lines.append("3 0 0 1")  # a face repeating a vertex: face 25, labelled 'handle'
    off.write_text("\n".join(lines) + "\n")
    lab = root / "Cup" / "0_labels.txt"
    lab.write_text(lab.read_text().rstrip() + " 25\n")
    src = LabeledPSBSource(root)
    mesh = src.load(next(it for it in src.items if it.id.endswith("/0")))
    assert mesh.faces.shape == (24, 3) and mesh.face_labels.shape == (24,)
    assert Counter(mesh.face_labels.tolist()) == {0: 12, 1: 12}


def test_load_raises_for_a_broken_labels_file(tmp_path, labeled_tree):
    root = labeled_tree(tmp_path / "lpsb", per_category=2)
    (root / "Cup" / "0_labels.txt").unlink()
    src = LabeledPSBSource(root)  # a missing labels file does not stop the source
    item = next(it for it in src.items if it.id.endswith("/0"))
    with pytest.raises(LabelsError, match="labels file is missing") as info:
        src.load(item)
    assert str(root / "Cup" / "0_labels.txt") in str(info.value)


# ----------------------------------------------------------------------------- prepare


def test_prepare_skips_a_mesh_with_a_broken_labels_file(tmp_path, labeled_tree):
    from xmodal.data.prepare import PrepareConfig, prepare

    root = labeled_tree(tmp_path / "lpsb", per_category=3, split_levels=True, test_per_category=1)
    bad = root / "Table" / "train" / "4_labels.txt"
    lines = bad.read_text().splitlines()
    twice = lines[1].split()[0]  # a 'leg' face, listed under 'top' as well
    lines[3] = f"{twice} {lines[3]}"
    bad.write_text("\n".join(lines) + "\n")
    man = prepare(PrepareConfig(source=root, out=tmp_path / "ds", views=2, points=64, image_size=32, chunk_size=2),
                  progress=False)
    assert man["counts"] == {"train": 3, "test": 2}
    assert len(man["failed"]) == 1
    rec = man["failed"][0]
    assert rec["id"] == "Table/train/4" and rec["path"] == str(root / "Table" / "train" / "4.off")
    assert rec["reason"] == f"{bad}: face {twice} is listed twice (under 'leg' and 'top', line 4)"
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["part_names"] == [
        "Cup/body", "Cup/handle", "Table/leg", "Table/top"]
    store = ShapeStore(tmp_path / "ds")
    assert store.has_images and store.views == 2
    for split in ("train", "test"):
        sv = store.split(split)
        assert sv.has_point_labels
        for i in range(sv.n):
            pts, lab = sv.points(i), sv.point_labels(i).astype(np.int64)
            cat = sv.ids[i].split("/")[0]
            first = 0 if cat == "Cup" else 2
            assert set(lab.tolist()) == {first, first + 1}
            # part 0 is the box at low x, part 1 the box 0.5 further along x
            assert pts[lab == first, 0].max() < pts[lab == first + 1, 0].min()


def test_a_labels_file_written_after_prepare_gets_its_mesh_built_by_the_same_command(tmp_path, labeled_tree):
    from xmodal.data.prepare import PrepareConfig, prepare

    root = labeled_tree(tmp_path / "lpsb", per_category=3, split_levels=True, test_per_category=1)
    labels = root / "Table" / "train" / "4_labels.txt"
    text = labels.read_text()
    labels.unlink()
    cfg = PrepareConfig(source=root, out=tmp_path / "ds", views=0, points=64, chunk_size=2, workers=1)
    man = prepare(cfg, progress=False)
    assert [r["id"] for r in man["failed"]] == ["Table/train/4"] and "missing" in man["failed"][0]["reason"]
    assert prepare(cfg, progress=False) == man  # still missing: nothing to do
    labels.write_text(text)
    man = prepare(cfg, progress=False)
    assert man["failed"] == [] and man["counts"] == {"train": 4, "test": 2}


def test_partseg_data_from_a_raw_folder_skips_a_broken_labels_file(tmp_path, labeled_tree):
    """What `evaluate --partseg-data RAW_FOLDER` reads: the broken shape is skipped and listed."""
    from xmodal.data.shapenetpart import load_partseg

    root = labeled_tree(tmp_path / "lpsb", per_category=3, split_levels=True, test_per_category=1)
    bad = root / "Cup" / "train" / "1_labels.txt"
    bad.write_text("\n".join(bad.read_text().splitlines()[:2]) + "\n")  # the handle's faces left out
    data = load_partseg(root, num_points=32, seed=0)
    assert data.split("train").n == 3 and data.split("test").n == 2
    assert "Cup/train/1" not in data.split("train").ids
    assert [r["id"] for r in data.failed] == ["Cup/train/1"]
    assert data.failed[0]["reason"].startswith(f"{bad}: ") and "no part label" in data.failed[0]["reason"]


# ----------------------------------------------------------------------------- real data


def test_real_labels_cover_every_face_once(labeled_psb_dir):
    src = open_source(labeled_psb_dir)
    assert isinstance(src, LabeledPSBSource)
    assert len(src.items) == 114 and len(src.classes) == 19
    assert Counter(it.label for it in src.items) == {c: 6 for c in src.classes}
    assert src.category_parts["Cup"] == ["body", "handle"]
    assert set(src.category_parts["Airplane"]) >= {"body", "rudder", "stabilizer", "wing"}
    for it in src.items:
        _, faces = read_mesh_arrays(it.path)
        labels, names = read_face_labels(labels_path(it.path), len(faces))  # raises on any defect
        assert labels.shape == (len(faces),) and set(names) <= set(src.category_parts[it.label])


def _distances(p, tri, faces):
    """(n, k) distances of points p (n, 3) to the triangles ``tri[faces]`` (faces (n, k))."""
    k = faces.shape[1]
    pp = np.repeat(p, k, axis=0)
    cp = trimesh.triangles.closest_point(tri[faces.reshape(-1)], pp)
    return np.linalg.norm(cp - pp, axis=1).reshape(-1, k), cp.reshape(-1, k, 3)


def _fit_similarity(q, tri, tree, iters=12, k=128):
    """c, s with ``c + s q`` on the surface of triangles ``tri``: bounding boxes, then ICP with a
    common scale (point-to-point, then point-to-plane), closest faces searched among the ``k``
    of nearest centroid."""
    lo, hi = tri.reshape(-1, 3).min(0), tri.reshape(-1, 3).max(0)
    s = np.linalg.norm(hi - lo) / np.linalg.norm(np.ptp(q, axis=0))
    c = (lo + hi) / 2 - s * (q.min(0) + q.max(0)) / 2
    for it in range(iters):
        _, cand = tree.query(c + s * q, k=k)
        d, cp = _distances(c + s * q, tri, cand)
        j = d.argmin(1)
        y = cp[np.arange(len(q)), j]
        if it < 4:
            qm, ym = q.mean(0), y.mean(0)
            s = ((q - qm) * (y - ym)).sum() / ((q - qm) ** 2).sum()
            c = ym - s * qm
        else:
            f = cand[np.arange(len(q)), j]
            n = np.cross(tri[f, 1] - tri[f, 0], tri[f, 2] - tri[f, 0])
            n /= np.linalg.norm(n, axis=1, keepdims=True)
            sol = np.linalg.lstsq(np.column_stack([n, (n * q).sum(1)]), (n * y).sum(1), rcond=None)[0]
            c, s = sol[:3], sol[3]
    return c, s


def _on_a_face_labelled(p, lab, tri, face_labels, tree, tol, k=128):
    """(n,) bool: point ``p[j]`` lies within ``tol`` of some face labelled ``lab[j]``. Faces are
    searched among the ``k`` of nearest centroid, then among all faces for the points not settled."""
    _, cand = tree.query(p, k=k)
    d, _ = _distances(p, tri, cand)
    ok = ((d <= tol) & (face_labels[cand] == lab[:, None])).any(1)
    for j in np.flatnonzero(~ok):
        dj, _ = _distances(p[j : j + 1], tri, np.arange(len(tri))[None, :])
        ok[j] = ((dj[0] <= tol) & (face_labels == lab[j])).any()
    return ok


def test_real_prepared_point_labels_are_their_faces_labels(labeled_psb_dir, tmp_path):
    """Prepare three real meshes; map each stored (normalised) cloud back onto its mesh and check
    that every point lies on a face carrying the point's label."""
    from xmodal.data.prepare import PrepareConfig, prepare

    src = LabeledPSBSource(labeled_psb_dir)
    src.items = [next(it for it in src.items if it.label == c) for c in ("Airplane", "Bearing", "Human")]
    man = prepare(PrepareConfig(out=tmp_path / "ds", views=0, points=256, chunk_size=4), source=src, progress=False)
    assert man["failed"] == [] and sum(man["counts"].values()) == 3
    store = ShapeStore(tmp_path / "ds")
    by_id = {it.id: it for it in src.items}
    checked = 0
    for split in store.splits:
        sv = store.split(split)
        for i in range(sv.n):
            q, lab = sv.points(i).astype(np.float64), sv.point_labels(i).astype(np.int64)
            mesh = src.load(by_id[sv.ids[i]])
            tri = mesh.vertices[mesh.faces]
            tree = cKDTree(tri.mean(1))
            c, s = _fit_similarity(q, tri, tree)
            tol = 1e-5 * s  # float32 noise of the unit-sphere cloud is ~1e-7
            assert _on_a_face_labelled(c + s * q, lab, tri, mesh.face_labels, tree, tol).all()
            # the check has teeth: other labels for the same points fail it
            p16, wrong = (c + s * q)[:16], np.roll(lab, 7)[:16]
            assert not _on_a_face_labelled(p16, wrong, tri, mesh.face_labels, tree, tol).all()
            assert len(set(lab.tolist())) >= 3
            checked += 1
    assert checked == 3


def test_a_folder_read_by_another_reader_is_not_a_resume(tmp_path, labeled_tree):
    """Labels files removed after a Labeled PSB build: the same ids and labels, but the mesh-folder
    reader (z-up, no part labels) would write other shards into the same store."""
    from xmodal.data.prepare import PrepareConfig, prepare
    from xmodal.errors import OutputExistsError

    root = labeled_tree(tmp_path / "lpsb", per_category=2, split_levels=True)
    cfg = PrepareConfig(source=root, out=tmp_path / "ds", views=0, points=64, chunk_size=2, workers=1)
    prepare(cfg, progress=False)
    for p in root.rglob("*_labels.txt"):
        p.unlink()
    with pytest.raises(OutputExistsError, match=r"the source's up axis: 'y' -> 'z'"):
        prepare(cfg, progress=False)
