"""``prepare`` lists a mesh too large to hold under ``failed`` (with its size and the limit) and goes on."""

from __future__ import annotations

import json

import pytest
import trimesh


from xmodal.data import mesh_limit  # noqa: E402
from xmodal.data.prepare import PrepareConfig, prepare  # noqa: E402
from xmodal.data.store import ShapeStore  # noqa: E402
from xmodal.errors import ConfigError  # noqa: E402

SMALL = dict(views=2, points=32, image_size=32, test_ratio=0.0)


@pytest.fixture
def meshes(tmp_path):
    """class ``ball``: a 320-face icosphere (OFF) and a 1,280-face one (PLY)."""
    root = tmp_path / "src"
    (root / "ball").mkdir(parents=True)
    small, big = trimesh.creation.icosphere(subdivisions=2), trimesh.creation.icosphere(subdivisions=3)
    small.export(root / "ball" / "small.off")
    big.export(root / "ball" / "big.ply")
    return root


def test_max_faces_fails_the_big_mesh_only(tmp_path, meshes):
    man = prepare(PrepareConfig(source=meshes, out=tmp_path / "ds", max_faces=1000, **SMALL), progress=False)
    assert ShapeStore(tmp_path / "ds").split("train").ids == ["ball/train/small"]
    (rec,) = man["failed"]
    assert rec["id"] == "ball/train/big" and rec["path"] == str(meshes / "ball" / "big.ply")
    assert rec["reason"].startswith("1,280 faces, more than max_faces=1,000")


def test_max_faces_is_not_a_dataset_setting(tmp_path, meshes):
    prepare(PrepareConfig(source=meshes, out=tmp_path / "ds", **SMALL), progress=False)
    # same dataset, another limit: a resume (nothing left to do), not "different settings"
    man = prepare(PrepareConfig(source=meshes, out=tmp_path / "ds", max_faces=1000, **SMALL), progress=False)
    assert man["counts"] == {"train": 2} and man["failed"] == []
    assert "max_faces" not in man["settings"] and "mesh_limit" not in man["settings"]


def test_memory_share_fails_a_mesh_before_reading_it(tmp_path, meshes, monkeypatch):
    # 0.5 MB for a worker: the 1,280-face mesh needs ~0.6 MB (binary PLY), the OFF one ~0.2 MB
    monkeypatch.setattr(mesh_limit, "available_memory", lambda: mesh_limit.PROCESS_BYTES + 500_000)
    reads = []
    real = trimesh.load
    monkeypatch.setattr(trimesh, "load", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    man = prepare(PrepareConfig(source=meshes, out=tmp_path / "ds", **SMALL), progress=False)
    (rec,) = man["failed"]
    assert rec["id"] == "ball/train/big" and "1,280 faces and 642 vertices need about" in rec["reason"]
    assert "one worker may use" in rec["reason"]
    assert reads == []  # the PLY was refused from its header, never read
    assert ShapeStore(tmp_path / "ds").counts == {"train": 1}


def test_a_mesh_over_the_memory_share_is_tried_again_once_memory_would_hold_it(tmp_path, meshes, monkeypatch):
    out = tmp_path / "ds"
    monkeypatch.setattr(mesh_limit, "available_memory", lambda: mesh_limit.PROCESS_BYTES + 500_000)
    cfg = PrepareConfig(source=meshes, out=out, **SMALL)
    man = prepare(cfg, progress=False)
    assert [r["id"] for r in man["failed"]] == ["ball/train/big"]
    (rec,) = json.loads(next((out / "failed").glob("*.json")).read_text())
    need = rec["retry"]["need"]
    assert rec["retry"]["kind"] == "size" and 500_000 < need < 2_000_000
    shard = next((out / "shards").rglob("*.h5"))
    built = shard.stat().st_mtime_ns
    # more memory than before, one byte short of the need: nothing is built again
    monkeypatch.setattr(mesh_limit, "available_memory", lambda: mesh_limit.PROCESS_BYTES + need - 1)
    assert prepare(cfg, progress=False) == man and shard.stat().st_mtime_ns == built
    # enough memory now: the chunk is built again and the mesh prepared
    monkeypatch.setattr(mesh_limit, "available_memory", lambda: mesh_limit.PROCESS_BYTES + need)
    man = prepare(cfg, progress=False)
    assert man["failed"] == [] and man["counts"] == {"train": 2}


def test_negative_max_faces_is_a_config_error():
    with pytest.raises(ConfigError, match="max_faces"):
        PrepareConfig(source="x", out="y", max_faces=-1).validate()


def test_the_retry_check_and_the_run_share_one_reading_of_free_memory(tmp_path, meshes, monkeypatch):
    # a mesh judged to fit on the retry check is prepared under that same share, even when free
    # memory read again at once would be lower: it is not rebuilt only to fail again
    out = tmp_path / "ds"
    monkeypatch.setattr(mesh_limit, "available_memory", lambda: mesh_limit.PROCESS_BYTES + 500_000)
    cfg = PrepareConfig(source=meshes, out=out, **SMALL)
    prepare(cfg, progress=False)
    (rec,) = json.loads(next((out / "failed").glob("*.json")).read_text())
    need = rec["retry"]["need"]
    readings = iter([need, need - 1, need - 1])
    monkeypatch.setattr(mesh_limit, "available_memory", lambda: mesh_limit.PROCESS_BYTES + next(readings))
    man = prepare(cfg, progress=False)
    assert man["failed"] == [] and man["counts"] == {"train": 2}
    assert list(readings) == [need - 1, need - 1]  # free memory was read once: two readings are left
