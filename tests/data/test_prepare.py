"""Tests of the ``prepare`` job: outputs, determinism, resumption, failures, sources."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest


from xmodal.data.prepare import PrepareConfig, PrepareError, object_seeds, prepare  # noqa: E402
from xmodal.errors import OutputExistsError
from xmodal.data.store import ShapeStore, read_shard, shard_relpath  # noqa: E402

SPEC = "builtin:shapes?train=2&test=1"
TINY = dict(views=4, points=256, image_size=32, chunk_size=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny prepared built-in store, shared read-only by the tests of this module."""
    out = tmp_path_factory.mktemp("prep") / "shapes"
    prepare(PrepareConfig(source=SPEC, out=out, **TINY), progress=False)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _all_arrays(root: Path) -> dict:
    store = ShapeStore(root)
    out = {}
    for split in store.splits:
        sv = store.split(split)
        out[split] = {
            "ids": sv.ids,
            "labels": sv.labels,
            "points": sv.all_points(),
            "images": np.stack([sv.images(i) for i in range(sv.n)]) if store.has_images and sv.n else None,
            "point_labels": np.stack([sv.point_labels(i) for i in range(sv.n)]) if sv.has_point_labels else None,
        }
    return out


def _assert_same_store(a: Path, b: Path) -> None:
    x, y = _all_arrays(a), _all_arrays(b)
    assert x.keys() == y.keys()
    for split in x:
        assert x[split]["ids"] == y[split]["ids"]
        for key in ("labels", "points", "images", "point_labels"):
            if x[split][key] is None:
                assert y[split][key] is None
            else:
                np.testing.assert_array_equal(x[split][key], y[split][key], err_msg=f"{split}/{key}")


# --------------------------------------------------------------------------- builtin shapes


def test_tiny_builtin_store(tiny):
    man = json.loads((tiny / "manifest.json").read_text())
    store = ShapeStore(tiny)
    n_cls = len(store.classes)
    assert n_cls >= 10 and store.classes == sorted(store.classes)
    assert man["counts"] == {"train": 2 * n_cls, "test": n_cls}
    assert man["failed"] == []
    assert (man["views"], man["points"], man["image_size"], man["up_axis"]) == (4, 256, 32, "z")
    assert man["settings"]["seed"] == 0 and man["settings"]["oversample"] == 8 and man["settings"]["chunk_size"] == 4
    assert man["source"]["spec"] == SPEC
    assert len(man["shards"]["train"]) == -(-2 * n_cls // 4)
    assert (tiny / "plan.json").is_file()
    assert store.part_names and all("/" in p for p in store.part_names)
    for split in ("train", "test"):
        sv = store.split(split)
        assert len(set(sv.ids)) == sv.n
        assert np.bincount(sv.labels, minlength=n_cls).tolist() == [2 if split == "train" else 1] * n_cls
        for i in range(sv.n):
            assert store.classes[sv.labels[i]] == sv.ids[i].split("/")[0]
            ims = sv.images(i)
            assert ims.shape == (4, 32, 32) and ims.dtype == np.uint8
            for im in ims:  # every view shows something, and is not a white-out
                fg = im > 0
                assert fg.sum() >= 5 and fg.mean() < 0.9, (sv.ids[i], fg.mean())
                assert im.max() > 60, (sv.ids[i], im.max())  # lit, not black on black
                assert (im == 255).mean() < 0.2
            pts = sv.points(i)
            assert pts.shape == (256, 3) and np.linalg.norm(pts, axis=1).max() <= 1.0 + 1e-5
            assert np.linalg.norm(pts, axis=1).max() > 0.99  # normalised, not merely inside
            pl = sv.point_labels(i)
            assert pl.shape == (256,) and pl.min() >= 0 and pl.max() < len(store.part_names)
            assert all(store.part_names[p].startswith(sv.ids[i].split("/")[0] + "/") for p in np.unique(pl))
            cams = sv.cameras(i)
            assert cams.shape == (4, 2)
            assert ((cams[:, 0] >= 10) & (cams[:, 0] <= 340)).all() and ((cams[:, 1] >= 10) & (cams[:, 1] <= 165)).all()


def test_object_seeds_stable():
    # pinned values: a change of the derivation (e.g. to Python's salted hash()) would change
    # every prepared dataset, and must fail here rather than pass in one process
    assert object_seeds(0, "a/train/x") == (126423688, 2442410646)
    assert object_seeds(0, "a/train/x") != object_seeds(1, "a/train/x")
    assert object_seeds(0, "a/train/x") != object_seeds(0, "a/train/y")


def test_rerun_same_settings_is_noop(tiny, tmp_path):
    out = _copy(tiny, tmp_path / "ds")
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.h5")}
    man = prepare(PrepareConfig(source=SPEC, out=out, **TINY), progress=False)
    assert man == json.loads((tiny / "manifest.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.h5")} == before


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_shard_is_built_again(tiny, tmp_path, damage):
    """A shard cut short (a copy interrupted, a disk error) or overwritten is unreadable: the same
    command builds it again and leaves the others alone."""
    out = _copy(tiny, tmp_path / "ds")
    victim = out / shard_relpath("train", 1)
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.h5") if p != victim}
    time.sleep(0.01)
    prepare(PrepareConfig(source=SPEC, out=out, **TINY), progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # untouched
    _assert_same_store(out, tiny)


def test_resume_after_deleting_a_shard(tiny, tmp_path):
    out = _copy(tiny, tmp_path / "ds")
    victim = out / shard_relpath("train", 2)
    victim.unlink()
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShapeStore(out)
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.h5")}
    time.sleep(0.01)
    man = prepare(PrepareConfig(source=SPEC, out=out, **TINY), progress=False)
    after = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.h5")}
    assert set(after) == set(before) | {victim}
    assert all(after[p] == t for p, t in before.items())  # untouched
    assert man["counts"] == json.loads((tiny / "manifest.json").read_text())["counts"]
    _assert_same_store(out, tiny)  # the rewritten shard equals the original, no duplicates


def test_kill_mid_run_then_resume(tiny, tmp_path):
    out = tmp_path / "ds"
    script = textwrap.dedent(
        f"""
        import time, xmodal.data.prepare as P
        orig = P._process_object
        def slow(ctx, item):
            time.sleep(0.15)
            return orig(ctx, item)
        P._process_object = slow
        P.prepare(P.PrepareConfig(source={SPEC!r}, out={str(out)!r}, **{TINY!r}), progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / shard_relpath("train", 0)
    try:
        deadline = time.monotonic() + 60
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.skip(f"prepare finished or failed before it could be killed: {proc.stderr.read()[-500:]!r}")
        assert first.exists(), "no shard appeared within 60 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert not (out / "manifest.json").exists()
    assert (out / "plan.json").is_file()
    done = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.h5")}
    assert 0 < len(done) < 11
    for p in done:  # every shard on disk is complete
        assert len(read_shard(p)["ids"]) == 4
    prepare(PrepareConfig(source=SPEC, out=out, **TINY), progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    assert not [p for p in (out / "shards").rglob(".*") if p.is_file()]  # no stale temporaries
    _assert_same_store(out, tiny)


def test_a_test_ratio_counts_only_where_it_moves_objects(tmp_path):
    """--test-ratio decides which objects are test objects: a source that takes its split from its
    folders ignores it, so another value resumes the same dataset; where it moves objects, the
    object list differs and the dataset is refused."""
    root = tmp_path / "mn"
    for split, n in (("train", 3), ("test", 1)):
        (root / "box" / split).mkdir(parents=True)
        for i in range(n):
            (root / "box" / split / f"box_{split}{i}.off").write_text(_cube_off())
    cfg = PrepareConfig(source=root, out=tmp_path / "ds", views=2, points=64, image_size=32, chunk_size=2, workers=1)
    prepare(cfg, progress=False)
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "ds" / "shards").rglob("*.h5")}
    manifest = (tmp_path / "ds" / "manifest.json").read_bytes()
    prepare(replace(cfg, test_ratio=0.5), progress=False)  # the ModelNet layout's split is its folders'
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ds" / "shards").rglob("*.h5")} == shards
    # the store's record is unchanged (its digest identifies it to evaluations)
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == manifest
    plain = tmp_path / "plain"
    for i in range(6):
        (plain / "box").mkdir(parents=True, exist_ok=True)
        (plain / "box" / f"b{i}.off").write_text(_cube_off())
    cfg2 = replace(cfg, source=plain, out=tmp_path / "ds2")
    prepare(cfg2, progress=False)
    with pytest.raises(OutputExistsError, match="object list"):
        prepare(replace(cfg2, test_ratio=0.5), progress=False)


def test_different_settings_refused_unless_overwrite(tiny, tmp_path):
    out = _copy(tiny, tmp_path / "ds")
    with pytest.raises(OutputExistsError, match=r"ds: holds a dataset prepared with other settings \(.*points: 256 -> 128"):
        prepare(PrepareConfig(source=SPEC, out=out, **{**TINY, "points": 128}), progress=False)
    with pytest.raises(OutputExistsError, match="object list"):
        prepare(PrepareConfig(source="builtin:shapes?train=1&test=1", out=out, **TINY), progress=False)
    # the same ids and labels drawn by another generator seed are other shapes: not a resume
    with pytest.raises(OutputExistsError, match=r"the source's seed: 0 -> 5"):
        prepare(PrepareConfig(source=SPEC + "&seed=5", out=out, **TINY), progress=False)
    assert ShapeStore(out).num_points == 256  # untouched
    again = {**TINY, "points": 128, "views": 2, "overwrite": True}
    man = prepare(PrepareConfig(source="builtin:shapes?train=1&test=0", out=out, **again), progress=False)
    store = ShapeStore(out)
    assert store.num_points == 128 and store.views == 2 and man["counts"]["train"] == len(store.classes)
    assert "test" not in man["counts"]
    assert sorted(p.name for p in (out / "shards" / "train").glob("*.h5")) == [
        f"{c:05d}.h5" for c in range(len(man["shards"]["train"]))
    ]


def test_parallel_equals_serial(tmp_path, monkeypatch):
    import xmodal.data.prepare as P

    calls = []
    real_pool = P._execute_pool
    monkeypatch.setattr(P, "_execute_pool", lambda *a: calls.append(a[6]) or real_pool(*a))  # a[6]: workers
    kw = dict(views=2, points=128, image_size=32, chunk_size=4)
    spec = "builtin:shapes?train=1&test=0"
    serial = prepare(PrepareConfig(source=spec, out=tmp_path / "serial", workers=1, **kw), progress=False)
    assert calls == []
    parallel = prepare(PrepareConfig(source=spec, out=tmp_path / "parallel", workers=2, **kw), progress=False)
    assert calls == [2]  # ran in a pool of 2 spawned processes
    assert serial["counts"] == parallel["counts"]
    _assert_same_store(tmp_path / "serial", tmp_path / "parallel")


def test_colour_images(tmp_path):
    from xmodal.data.show import show

    man = prepare(PrepareConfig(source="builtin:shapes?train=1&test=0", out=tmp_path / "ds", views=2, points=64,
                                image_size=32, chunk_size=16, grayscale=False), progress=False)
    assert man["grayscale"] is False
    sv = ShapeStore(tmp_path / "ds").split("train")
    ims = sv.images(0, [1, 0])
    assert ims.shape == (2, 32, 32, 3) and ims.dtype == np.uint8 and ims.max() > 60
    np.testing.assert_array_equal(ims[0], sv.image(0, 1))
    assert show(tmp_path / "ds", 0, tmp_path / "sheet.png").stat().st_size > 1000


def test_unpicklable_source_with_workers(tmp_path):
    from xmodal.data.builtin import BuiltinSource

    src = BuiltinSource(1, 0)
    src.hook = lambda: None  # a lambda cannot cross to spawned processes
    src.items = src.items[:4]
    src.classes = sorted({it.label for it in src.items})
    with pytest.raises(PrepareError, match="workers=1"):
        prepare(PrepareConfig(out=tmp_path / "ds", workers=2, **{**TINY, "chunk_size": 2}), source=src, progress=False)
    # serial needs no pickling
    man = prepare(PrepareConfig(out=tmp_path / "ds", workers=1, **{**TINY, "chunk_size": 2}), source=src, progress=False)
    assert sum(man["counts"].values()) == 4


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"views": -1}, "views must be >= 0"),
        ({"points": 0}, "points must be > 0"),
        ({"image_size": 8}, "image_size"),
        ({"workers": 0}, "workers"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"test_ratio": 1.0}, "test_ratio"),
        ({"points": 2.5}, "integer"),
    ],
)
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        prepare(PrepareConfig(source=SPEC, out=tmp_path / "x", **{**TINY, **kw}), progress=False)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- mesh folders

CUBE_V = [(x, y, z) for x in (0, 1) for y in (0, 1) for z in (0, 1)]
CUBE_F = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1),
          (2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3)]


def _cube_off(glued: bool = False, scale: float = 1.0) -> str:
    head = "OFF8 12 0\n" if glued else "OFF\n8 12 0\n"
    verts = "".join(f"{x * scale} {y * scale} {z * 2 * scale}\n" for x, y, z in CUBE_V)
    faces = "".join(f"3 {a} {b} {c}\n" for a, b, c in CUBE_F)
    return head + verts + faces


def test_corrupt_mesh_is_recorded_and_skipped(tmp_path, caplog):
    root = tmp_path / "mn"
    (root / "box" / "train").mkdir(parents=True)
    (root / "box" / "test").mkdir(parents=True)
    (root / "box" / "train" / "box_0001.off").write_text(_cube_off())
    (root / "box" / "train" / "box_0002.off").write_text(_cube_off(glued=True, scale=30.0))
    (root / "box" / "test" / "box_0003.off").write_text(_cube_off(scale=0.01))
    bad = root / "box" / "train" / "box_0004.off"
    bad.write_text("OFF\n8 12 0\n0 0 0\n1 1\n")  # truncated
    with caplog.at_level("WARNING"):
        man = prepare(PrepareConfig(source=root, out=tmp_path / "ds", views=2, points=64, image_size=32, chunk_size=2),
                      progress=False)
    assert man["counts"] == {"train": 2, "test": 1}
    assert len(man["failed"]) == 1
    rec = man["failed"][0]
    assert rec["path"] == str(bad) and rec["id"] == "box/train/box_0004" and rec["reason"]
    assert "box_0004" in caplog.text
    store = ShapeStore(tmp_path / "ds")
    assert store.split("train").ids == ["box/train/box_0001", "box/train/box_0002"]
    assert store.part_names is None and not store.split("train").has_point_labels
    assert (tmp_path / "ds" / "failed" / "train-00001.json").is_file()
    for i in range(2):
        pts = store.split("train").points(i)
        # a 1 x 1 x 2 box whatever its scale: normalised into the unit sphere, shape kept
        ext = np.ptp(pts, axis=0)
        assert 1.8 < ext[2] / ext[0] < 2.2
        assert 0.9 < ext[1] / ext[0] < 1.1
        assert abs(np.linalg.norm(pts, axis=1).max() - 1) < 1e-5
        assert (store.split("train").images(i) > 0).mean() > 0.02


def test_a_class_whose_every_object_failed_is_named(tmp_path, caplog):
    root = tmp_path / "mn"
    for cls, body in (("good", _cube_off()), ("allbad", "OFF\n8 12 0\n0 0 0\n1 1\n")):
        (root / cls / "train").mkdir(parents=True)
        (root / cls / "test").mkdir(parents=True)
        for i in (1, 2):
            (root / cls / "train" / f"{cls}_{i}.off").write_text(body)
        (root / cls / "test" / f"{cls}_9.off").write_text(_cube_off())
    with caplog.at_level("WARNING", logger="xmodal.data.prepare"):
        man = prepare(PrepareConfig(source=root, out=tmp_path / "ds", views=2, points=64, image_size=32,
                                    chunk_size=1, workers=1), progress=False)
    assert man["classes"] == ["allbad", "good"] and man["counts"] == {"train": 2, "test": 2}
    assert "no object of class(es) ['allbad'] could be prepared for split 'train' (all 2 failed" in caplog.text
    assert "for split 'test'" not in caplog.text


def test_a_failed_mesh_fixed_since_is_built_by_the_same_command(tmp_path, caplog):
    root = tmp_path / "mn"
    (root / "box" / "train").mkdir(parents=True)
    (root / "box" / "test").mkdir(parents=True)
    for i in (1, 2, 3):
        (root / "box" / "train" / f"box_000{i}.off").write_text(_cube_off())
    (root / "box" / "test" / "box_0005.off").write_text(_cube_off())
    bad = root / "box" / "train" / "box_0004.off"
    bad.write_text("OFF\n8 12 0\n0 0 0\n1 1\n")  # truncated
    cfg = PrepareConfig(source=root, out=tmp_path / "ds", views=2, points=64, image_size=32, chunk_size=2, workers=1)
    man = prepare(cfg, progress=False)
    assert man["counts"] == {"train": 3, "test": 1} and [r["id"] for r in man["failed"]] == ["box/train/box_0004"]
    clean = tmp_path / "ds" / shard_relpath("train", 0)
    before = clean.stat().st_mtime_ns
    assert set(man["failed"][0]) == {"path", "id", "reason"}  # what a retry depends on stays in failed/
    failed_chunk = tmp_path / "ds" / shard_relpath("train", 1)
    failed_before = failed_chunk.stat().st_mtime_ns
    # run again unchanged: a broken file stays broken, so nothing is built again
    with caplog.at_level("INFO", logger="xmodal.data.prepare"):
        again = prepare(cfg, progress=False)
    assert "failed before" not in caplog.text
    assert again == man and failed_chunk.stat().st_mtime_ns == failed_before
    # fixed: the same command builds its chunk again, and only that one
    bad.write_text(_cube_off())
    with caplog.at_level("INFO", logger="xmodal.data.prepare"):
        fixed = prepare(cfg, progress=False)
    assert "1 chunk(s) hold objects that failed before" in caplog.text
    assert clean.stat().st_mtime_ns == before
    assert fixed["counts"] == {"train": 4, "test": 1} and fixed["failed"] == []
    assert not (tmp_path / "ds" / "failed" / "train-00001.json").exists()
    assert ShapeStore(tmp_path / "ds").split("train").ids == [f"box/train/box_000{i}" for i in (1, 2, 3, 4)]


def test_a_job_resumed_from_another_working_folder_finds_its_failed_files(tmp_path, monkeypatch, caplog):
    """Failed objects' records name their files; a relative --source given from another folder
    names the same files, so their chunks are not built again (they were: the recorded relative
    paths no longer opened, which counts as a changed file)."""
    root = tmp_path / "work" / "mn"
    for i in (1, 2):
        (root / "box" / "train").mkdir(parents=True, exist_ok=True)
        (root / "box" / "train" / f"box_000{i}.off").write_text(_cube_off())
    (root / "box" / "train" / "box_0003.off").write_text("OFF\n8 12 0\n0 0 0\n1 1\n")  # truncated
    monkeypatch.chdir(tmp_path / "work")
    man = prepare(PrepareConfig(source="mn", out="ds", views=2, points=64, image_size=32, chunk_size=2,
                                test_ratio=0.0, workers=1), progress=False)
    assert [r["path"] for r in man["failed"]] == [str(root / "box" / "train" / "box_0003.off")]
    failed_chunk = tmp_path / "work" / "ds" / shard_relpath("train", 1)
    before = failed_chunk.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="xmodal.data.prepare"):
        again = prepare(PrepareConfig(source="work/mn", out="work/ds", views=2, points=64, image_size=32,
                                      chunk_size=2, test_ratio=0.0, workers=1), progress=False)
    assert "failed before" not in caplog.text and failed_chunk.stat().st_mtime_ns == before
    assert again["failed"] == man["failed"]


def test_objects_that_failed_for_the_job_not_the_file_are_tried_again(tmp_path, monkeypatch):
    import xmodal.data.prepare as prepare_mod

    root = tmp_path / "mn"
    for i in (1, 2):
        (root / "box" / "train").mkdir(parents=True, exist_ok=True)
        (root / "box" / "train" / f"box_000{i}.off").write_text(_cube_off())
    cfg = PrepareConfig(source=root, out=tmp_path / "ds", views=0, points=64, chunk_size=1, workers=1)
    real = prepare_mod._process_object

    def flaky(ctx, item):  # a passing fault of the job on the first object (memory, a network file system)
        if item.id.endswith("0001"):
            raise MemoryError("cannot allocate")
        return real(ctx, item)

    monkeypatch.setattr(prepare_mod, "_process_object", flaky)
    man = prepare(cfg, progress=False)
    assert [r["id"] for r in man["failed"]] == ["box/train/box_0001"] and "MemoryError" in man["failed"][0]["reason"]
    monkeypatch.setattr(prepare_mod, "_process_object", real)
    again = prepare(cfg, progress=False)
    assert again["failed"] == [] and again["counts"]["train"] == 2


def test_a_mesh_over_the_size_limit_is_tried_again_only_under_a_looser_limit(tmp_path, caplog):
    root = tmp_path / "mn"
    (root / "box" / "train").mkdir(parents=True)
    for i in (1, 2):
        (root / "box" / "train" / f"box_000{i}.off").write_text(_cube_off())
    cfg = PrepareConfig(source=root, out=tmp_path / "ds", views=0, points=64, chunk_size=1, workers=1, max_faces=4)
    with pytest.raises(PrepareError, match="none of the 2 objects .*max_faces=4"):
        prepare(cfg, progress=False)
    shard = tmp_path / "ds" / shard_relpath("train", 0)
    before = shard.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="xmodal.data.prepare"):
        with pytest.raises(PrepareError, match="none of the 2 objects"):
            prepare(cfg, progress=False)  # the same limit: nothing is built again
    assert "failed before" not in caplog.text and shard.stat().st_mtime_ns == before
    man = prepare(replace(cfg, max_faces=100), progress=False)  # a looser limit: both are built
    assert man["failed"] == [] and man["counts"]["train"] == 2


def test_a_renderer_that_cannot_start_stops_prepare_instead_of_failing_every_mesh(tmp_path, monkeypatch):
    import xmodal.data.render as render_mod

    def no_gl(*args, **kwargs):
        raise RuntimeError("cannot open EGL display")

    monkeypatch.setattr(render_mod, "Renderer", no_gl)
    root = tmp_path / "mn"
    (root / "box" / "train").mkdir(parents=True)
    (root / "box" / "train" / "box_0001.off").write_text(_cube_off())
    (root / "box" / "train" / "box_0002.off").write_text(_cube_off())
    cfg = PrepareConfig(source=root, out=tmp_path / "ds", views=2, points=64, image_size=32, workers=1)
    with pytest.raises(PrepareError, match="cannot create the renderer .*EGL display") as err:
        prepare(cfg, progress=False)
    assert "views=0" in err.value.hint
    # nothing recorded as a mesh failure, no shard: the same command builds everything once rendering works
    assert not (tmp_path / "ds" / "failed").exists() or not any((tmp_path / "ds" / "failed").iterdir())
    assert not any((tmp_path / "ds" / "shards").glob("*.h5"))


def test_real_modelnet_meshes(modelnet_off_dir, tmp_path):
    man = prepare(PrepareConfig(source=modelnet_off_dir, out=tmp_path / "ds", views=2, points=128, image_size=32,
                                chunk_size=8), progress=False)
    assert man["failed"] == [] and man["counts"]["train"] == 6
    assert man["classes"] == ["bathtub", "bed"]


# --------------------------------------------------------------------------- HDF5 points


def _fake_h5(root: Path, n=6, npts=32, classes=("cup", "desk")) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    (root / "shape_names.txt").write_text("\n".join(classes) + "\n")
    pts = rng.normal(size=(n, npts, 3)).astype(np.float32)
    pts /= np.linalg.norm(pts, axis=2).max(axis=1)[:, None, None]
    with h5py.File(root / "ply_data_train0.h5", "w") as f:
        f["data"] = pts
        f["label"] = (np.arange(n) % len(classes)).astype(np.uint8)[:, None]
    return root


@pytest.mark.parametrize("views", [0, 2])
def test_points_source(tmp_path, views):
    src = _fake_h5(tmp_path / "h5")
    man = prepare(PrepareConfig(source=src, out=tmp_path / "ds", views=views, points=16, image_size=32, chunk_size=2,
                                test_ratio=0.34), progress=False)
    assert man["counts"]["train"] + man["counts"]["test"] == 6 and man["counts"]["test"] == 2
    assert man["up_axis"] == "y" and man["views"] == views and man["failed"] == []
    assert "held" in json.dumps(man["source"])
    store = ShapeStore(tmp_path / "ds")
    sv = store.split("train")
    pts = sv.all_points()
    assert pts.shape == (sv.n, 16, 3)
    np.testing.assert_allclose(np.linalg.norm(pts, axis=2).max(axis=1), 1.0, atol=1e-5)
    # FPS picks a subset of the (re-normalised) source points: pairwise distances stay spread
    d = np.linalg.norm(pts[0][:, None] - pts[0][None], axis=2) + np.eye(16) * 9
    assert d.min() > 0.05
    if views:
        ims = sv.images(0)
        assert ims.shape == (2, 32, 32) and (ims > 0).mean() > 0.01
    else:
        assert not store.has_images


def test_points_source_too_few_points_fails_objects(tmp_path):
    src = _fake_h5(tmp_path / "h5")
    cfg = PrepareConfig(source=src, out=tmp_path / "ds", views=0, points=64, image_size=32, chunk_size=4)
    with pytest.raises(PrepareError, match="none of the 6 objects could be prepared") as err:
        prepare(cfg, progress=False)
    assert str(src) in str(err.value) and "fewer" in str(err.value)
    # the manifest, written before the error, lists every failure; the same command says the same
    man = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert sum(man["counts"].values()) == 0 and len(man["failed"]) == 6
    with pytest.raises(PrepareError, match="none of the 6"):
        prepare(cfg, progress=False)
    assert all("fewer" in r["reason"] for r in man["failed"])
    store = ShapeStore(tmp_path / "ds")
    assert store.split("train").all_points().shape == (0, 64, 3)
