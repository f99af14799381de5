"""The Princeton Shape Benchmark: .cla parser, PsbSource on a fake tree, prepare, the real train half."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from xmodal.data.psb import PsbSource, cla_split, psb_mesh_path, read_cla
from xmodal.data.sources import open_source
from xmodal.data.types import Mesh
from xmodal.errors import DataError, MeshError

TETRA_OFF = "OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 {z}\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"
TETRA_PLY = (
    "ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\nproperty float z\n"
    "element face 4\nproperty list uchar int vertex_indices\nend_header\n"
    "0 0 0\n1 0 0\n0 1 0\n0 0 {z}\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"
)


def cla_text(classes, *, n_classes=None, n_models=None, header="PSB 1") -> str:
    """A .cla file: ``classes`` = [(name, parent, [ids])], blank lines as in the benchmark's files."""
    n_classes = len(classes) if n_classes is None else n_classes
    n_models = sum(len(ids) for *_, ids in classes) if n_models is None else n_models
    out = [header, f"{n_classes} {n_models}", ""]
    for name, parent, ids in classes:
        out += [f"{name} {parent} {len(ids)}", *map(str, ids), ""]
    return "\n".join(out) + "\n"


def _mesh(root: Path, mid: int, ext: str = ".off") -> None:
    path = psb_mesh_path(root, mid).with_suffix(ext)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((TETRA_OFF if ext == ".off" else TETRA_PLY).format(z=1.0 + mid / 100))


BASE_TRAIN = [("furniture", "0", []), ("chair", "furniture", [1, 2, 3]), ("table", "furniture", [4, 5]),
              ("animal", "0", []), ("dog", "animal", [6, 7, 105])]
BASE_TEST = [("chair", "0", [10, 11]), ("bird", "0", [112, 13])]
COARSE_TRAIN = [("furniture", "0", [1, 2, 3, 4, 5]), ("animal", "0", [6, 7, 105])]
COARSE_TEST = [("furniture", "0", [10, 11]), ("animal", "0", [112, 13])]


def fake_psb(root: Path) -> Path:
    """A tiny PSB tree: 10 models on disk (OFF and PLY), model 105 listed but missing."""
    cla = root / "classification" / "v1"
    for folder, name, classes in [("base", "train.cla", BASE_TRAIN), ("base", "test.cla", BASE_TEST),
                                  ("coarse1", "coarse1Train.cla", COARSE_TRAIN),
                                  ("coarse1", "coarse1Test.cla", COARSE_TEST)]:
        (cla / folder).mkdir(parents=True, exist_ok=True)
        (cla / folder / name).write_text(cla_text(classes))
    (cla / "base" / "base.cla").write_text("PSB 1\n")  # a whole-benchmark file: neither half, ignored
    for mid in (1, 2, 3, 5, 6, 7, 10, 11, 13):
        _mesh(root, mid)
    for mid in (4, 112):
        _mesh(root, mid, ".ply")
    return root


# --------------------------------------------------------------------------- read_cla


def test_read_cla_good_file(tmp_path):
    path = tmp_path / "train.cla"
    path.write_text(cla_text(BASE_TRAIN))
    cla = read_cla(path)
    assert cla.path == str(path) and cla.num_models == 8
    assert [(c.name, c.parent, c.models) for c in cla.classes] == [(n, p, tuple(i)) for n, p, i in BASE_TRAIN]
    assert cla.class_names() == ["chair", "table", "dog"]
    assert cla.class_of() == {1: "chair", 2: "chair", 3: "chair", 4: "table", 5: "table", 6: "dog", 7: "dog", 105: "dog"}
    assert [c.line for c in cla.classes[:2]] == [4, 6]  # 1-based line of each class header
    # windows line ends and extra blank lines are fine
    path.write_text("\r\n\r\n".join(cla_text(BASE_TRAIN).splitlines()))
    assert read_cla(path).class_of() == cla.class_of()


GOOD = cla_text([("a", "0", [1, 2]), ("b", "a", [3])])


@pytest.mark.parametrize(
    "text, match",
    [
        ("", r"line 1: .*'PSB 1', the file is empty"),
        (GOOD.replace("PSB 1", "PSB 2"), r"line 1: expected the header 'PSB 1', got 'PSB 2'"),
        (GOOD.replace("2 3\n", "2\n"), r"line 2: expected '<numClasses> <numModels>'"),
        ("PSB 1\n", r"line 1: the file ends after the header"),
        (GOOD.replace("2 3\n", "3 3\n"), r"line 2: declares 3 classes but the file defines 2"),
        (GOOD.replace("2 3\n", "2 4\n"), r"line 2: declares 4 models but the classes list 3"),
        (GOOD.replace("a 0 2\n", "a 0 3\n"), r"line 4: class 'a' lists 3 models but line 8 is not a model id after 2"),
        (GOOD.replace("b a 1\n3\n", "b a 2\n3\n"), r"line 8: class 'b' lists 2 models but the file ends after 1"),
        (GOOD.replace("a 0 2\n", "a 0 1\n"), r"line 6: expected a class line .* got '2' \(more model ids"),
        (GOOD.replace("\n2\n", "\n2x\n"), r"line 6: model id '2x' of class 'a' is not an integer"),
        (GOOD.replace("\n2\n", "\n2_0\n"), r"line 6: model id '2_0' of class 'a' is not an integer"),
        (GOOD.replace("\n3\n", "\n1\n"), r"line 9: model 1 is listed in class 'a' and again in 'b'"),
        (GOOD.replace("b a 1", "a 0 1"), r"line 8: class 'a' is already defined on line 4"),
        (GOOD.replace("b a 1", "b c 1"), r"line 8: parent 'c' of class 'b' is not a class defined above"),
        (GOOD.replace("a 0 2", "a 0 -2"), r"line 4: expected a class line"),
        (GOOD.replace("a 0 2", "a 0 two"), r"line 4: expected a class line"),
    ],
)
def test_read_cla_broken_files_name_the_file_and_line(tmp_path, text, match):
    path = tmp_path / "coarse1Train.cla"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as info:
        read_cla(path)
    assert str(info.value).startswith(f"{path}: ")


def test_read_cla_unreadable(tmp_path):
    path = tmp_path / "train.cla"
    path.write_bytes(b"PSB 1\n\xff\xfe\x00")
    with pytest.raises(DataError, match="not a text file"):
        read_cla(path)
    with pytest.raises(DataError, match="cannot be read"):
        read_cla(tmp_path / "absent.cla")


def test_cla_split_from_the_file_name():
    assert [cla_split(n) for n in ("train.cla", "test.cla", "coarse2Train.cla", "coarse1Test.cla", "base.cla")] == [
        "train", "test", "train", "test", None]


# --------------------------------------------------------------------------- the source


def test_source_on_a_fake_tree(tmp_path):
    root = fake_psb(tmp_path / "psb")
    src = open_source(root)
    assert isinstance(src, PsbSource)
    assert (src.kind, src.up_axis, src.classification) == ("mesh", "y", "base")
    assert src.classes == ["bird", "chair", "dog", "table"]  # hierarchy-only nodes are not classes
    by_id = {it.id: it for it in src.items}
    assert len(by_id) == 12 and [it.id for it in src.items] == sorted(by_id)
    assert {(it.label, it.split) for it in src.items} == {
        ("chair", "train"), ("table", "train"), ("dog", "train"), ("chair", "test"), ("bird", "test")}
    assert by_id["chair/train/m1"].path == str(root / "db" / "0" / "m1" / "m1.off")
    assert by_id["bird/test/m112"].path == str(root / "db" / "1" / "m112" / "m112.ply")
    assert src.cla_files == {"train": "classification/v1/base/train.cla", "test": "classification/v1/base/test.cla"}
    assert src.missing == ["dog/train/m105"] and "1 missing" in src.description
    for key in ("chair/train/m1", "table/train/m4", "bird/test/m112"):  # OFF and PLY
        mesh = src.load(by_id[key])
        assert isinstance(mesh, Mesh) and mesh.faces.shape == (4, 3)
    with pytest.raises(MeshError, match=r"m105\.off: listed in classification/v1/base/train\.cla but missing"):
        src.load(by_id["dog/train/m105"])
    again = pickle.loads(pickle.dumps(src))  # goes to prepare's worker processes
    assert again.items == src.items and isinstance(again.load(by_id["chair/test/m10"]), Mesh)
    assert src.describe()["classification"] == "base" and src.describe()["missing"] == ["dog/train/m105"]


def test_granularity_option(tmp_path):
    root = fake_psb(tmp_path / "psb")
    src = open_source(f"{root}?classification=coarse1")
    assert src.classification == "coarse1" and src.classes == ["animal", "furniture"]
    assert {it.id for it in src.items} >= {"furniture/train/m4", "animal/test/m112", "animal/train/m105"}
    assert src.cla_files["train"] == "classification/v1/coarse1/coarse1Train.cla"
    with pytest.raises(DataError, match=r"no classification 'coarse9' \(choose from: base, coarse1\)"):
        open_source(f"{root}?classification=coarse9")
    with pytest.raises(DataError, match="unknown parameter 'granularity'.*valid parameters: classification"):
        open_source(f"{root}?granularity=coarse1")
    with pytest.raises(DataError, match="given 2 times"):
        open_source(f"{root}?classification=base&classification=coarse1")
    with pytest.raises(DataError, match="no classification '..'"):
        open_source(f"{root}?classification=..")
    (tmp_path / "meshes" / "cup").mkdir(parents=True)
    _mesh(tmp_path / "meshes" / "cup", 1)
    with pytest.raises(DataError, match="only understood for builtin:shapes and Princeton Shape Benchmark"):
        open_source(f"{tmp_path / 'meshes'}?classification=base")


def test_inconsistent_trees(tmp_path):
    root = fake_psb(tmp_path / "psb")
    test_cla = root / "classification" / "v1" / "base" / "test.cla"
    test_cla.write_text(cla_text([("chair", "0", [10, 1])]))  # model 1 is also in train.cla
    with pytest.raises(DataError, match="model 1 is listed in both classification/v1/base/train.cla and "
                                        "classification/v1/base/test.cla"):
        PsbSource(root)
    (root / "classification" / "v1" / "base" / "smallTrain.cla").write_text(cla_text([("a", "0", [1])]))
    with pytest.raises(DataError, match=r"2 train classifications \(smallTrain.cla, train.cla\)"):
        PsbSource(root)
    for p in (root / "classification" / "v1" / "coarse1").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="coarse1: no train.cla"):
        PsbSource(root, classification="coarse1")
    (root / "classification" / "v1" / "base" / "smallTrain.cla").unlink()
    test_cla.write_text(cla_text([("chair", "0", [10, 11])], n_models=3))
    with pytest.raises(DataError, match=r"test\.cla: line 2: declares 3 models"):
        open_source(root)


def test_prepare_records_the_missing_model_and_goes_on(tmp_path):
    import xmodal.data.render  # noqa: F401  (fails, not skips, if broken)
    from xmodal.data.prepare import PrepareConfig, prepare
    from xmodal.data.store import ShapeStore

    root = fake_psb(tmp_path / "psb")
    man = prepare(PrepareConfig(source=root, out=tmp_path / "ds", views=2, points=64, image_size=32, chunk_size=4),
                  progress=False)
    assert man["classes"] == ["bird", "chair", "dog", "table"] and man["up_axis"] == "y"
    assert man["counts"] == {"train": 7, "test": 4}
    assert len(man["failed"]) == 1
    rec = man["failed"][0]
    assert rec["id"] == "dog/train/m105" and rec["path"] == str(psb_mesh_path(root, 105))
    assert rec["reason"].startswith("listed in classification/v1/base/train.cla but missing")
    assert man["source"]["classification"] == "base" and man["source"]["spec"] == str(root)
    store = ShapeStore(tmp_path / "ds")
    assert store.split("test").ids == ["bird/test/m112", "bird/test/m13", "chair/test/m10", "chair/test/m11"]
    assert store.split("test").labels.tolist() == [0, 0, 1, 1]


# --------------------------------------------------------------------------- the real train half


@pytest.fixture(scope="module")
def psb_dir(shared_data) -> Path:
    d = shared_data / "psb"
    if not d.is_dir():
        pytest.skip("../shared/data/psb is not present")
    return d


def test_real_psb_train_half(psb_dir):
    src = open_source(psb_dir, test_ratio=0)
    assert len(src.items) == 907 and {it.split for it in src.items} == {"train"}
    assert len(src.classes) == 90
    assert src.missing == ["biplane/train/m1120", "snowman/train/m1755", "sports_car/train/m1541"]
    loaded, failed = 0, []
    for it in src.items:
        try:
            src.load(it)
            loaded += 1
        except MeshError as exc:
            failed.append((it.id, exc.reason))
    assert loaded == 904
    assert [i for i, _ in failed] == src.missing
    assert all(r.startswith("listed in classification/v1/base/train.cla but missing") for _, r in failed)
    counts = {g: len(open_source(f"{psb_dir}?classification={g}").classes) for g in ("coarse1", "coarse2", "coarse3")}
    assert counts == {"coarse1": 42, "coarse2": 7, "coarse3": 2}


def test_real_psb_train_half_holds_out_whole_classes(psb_dir):
    """Only the train half: a seeded fifth of the classes becomes the test split, whole classes at a time."""
    src = open_source(psb_dir, test_ratio=0.2, seed=0)
    test_classes = {it.label for it in src.items if it.split == "test"}
    train_classes = {it.label for it in src.items if it.split == "train"}
    assert len(test_classes) == 18 and not test_classes & train_classes
    assert sorted(test_classes) == src.held_out_classes
    assert len(src.items) == 907 and "held out" in src.description
    assert {it.id.split("/")[1] for it in src.items if it.label in test_classes} == {"test"}
    again = open_source(psb_dir, test_ratio=0.2, seed=0)
    assert again.held_out_classes == src.held_out_classes
    assert open_source(psb_dir, test_ratio=0.2, seed=1).held_out_classes != src.held_out_classes
    # a missing model of a held-out class still fails with its .cla named
    for it in src.items:
        if it.id.endswith("/m1120"):
            with pytest.raises(MeshError, match="listed in classification/v1/base/train.cla"):
                src.load(it)
