"""An object that kills the process preparing it is reported and skipped (xmodal.data.crash)."""

from __future__ import annotations

import json
import os
import signal

import pytest

import xmodal.data.prepare as prepare_mod
from xmodal.data import crash
from xmodal.data.builtin import BuiltinSource
from xmodal.data.prepare import PrepareConfig, prepare
from xmodal.data.store import ShapeStore, shard_relpath
from xmodal.data.types import Item
from xmodal.errors import PrepareError

KW = dict(views=2, points=64, image_size=32, chunk_size=5)
VICTIM = "chair/train/chair_0000"


class _Killer(BuiltinSource):
    """The built-in shapes, one of which kills any process that loads it but the test's own
    (``pool_only``: only a pool worker, not a process preparing it alone)."""

    def __init__(self, *args, pool_only: bool = False, victims=(VICTIM,), test_pid=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool_only, self.victims = pool_only, tuple(victims)
        self.test_pid = os.getpid() if test_pid is None else test_pid

    def load(self, item):
        if item.id in self.victims and os.getpid() != self.test_pid:
            import xmodal.data.prepare as prepare_mod

            if not self.pool_only or prepare_mod._WORKER:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().load(item)


def _total(man) -> int:
    return sum(man["counts"].values()) + len(man["failed"])


def test_a_worker_killed_by_one_object_costs_that_object_only(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    cfg = PrepareConfig(out=out, workers=2, **KW)
    man = prepare(cfg, source=_Killer(1, 1), progress=False)
    (rec,) = man["failed"]
    assert rec["id"] == VICTIM and "was killed by SIGKILL" in rec["reason"] and "also when prepared alone" in rec["reason"]
    assert sum(man["counts"].values()) == _total(man) - 1
    assert VICTIM not in ShapeStore(out).split("train").ids
    assert not list((out / "failed").glob(".inflight-*"))  # no marker left behind
    # the same command again: nothing to do, nothing probed, nothing rebuilt
    shards = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.h5")}
    probes = []
    monkeypatch.setattr(prepare_mod, "_probe", lambda *a, **k: probes.append(a) or 0)
    assert prepare(cfg, source=_Killer(1, 1), progress=False) == man
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.h5")} == shards and probes == []


def test_two_killers_in_one_chunk_cost_two_objects(tmp_path):
    """Two objects of one chunk that kill their process: both recorded, the job finishes."""
    src = _Killer(1, 1)
    train = [it.id for it in src.items if it.split == "train"]
    start = train.index(VICTIM) // KW["chunk_size"] * KW["chunk_size"]
    victims = train[start : start + 2]
    man = prepare(PrepareConfig(out=tmp_path / "ds", workers=2, **KW), source=_Killer(1, 1, victims=victims),
                  progress=False)
    assert sorted(r["id"] for r in man["failed"]) == sorted(victims)
    assert all("also when prepared alone" in r["reason"] for r in man["failed"])


def test_after_a_death_even_a_single_chunk_runs_in_a_worker(tmp_path):
    """One pending chunk normally runs in the main process; after a worker's death (``isolate``) it
    runs in a worker, so a second object that kills its process does not take the job down."""
    killer = _Killer(1, 0)
    task = [("train", 0, [it for it in killer.items if it.split == "train"][:3])]
    killer.victims = (task[0][2][1].id,)
    out = tmp_path / "ds"
    out.mkdir()
    settings = prepare_mod._settings(PrepareConfig(out=out, workers=2, **KW), killer)
    run = dict(workers=2, progress=False, should_stop=lambda: False)
    with pytest.raises(prepare_mod._PoolBroken):
        prepare_mod._execute(task, killer, settings, out, killer.classes, False, isolate=True, **run)
    # not isolated: the chunk runs in this process, where the object harms nothing
    assert prepare_mod._execute(task, killer, settings, out, killer.classes, False, **run) == 1


def test_objects_in_flight_when_the_job_died_are_tried_alone_first(tmp_path):
    """With one worker the job itself dies; its marker names the object on the next run."""
    out = tmp_path / "ds"
    cfg = PrepareConfig(out=out, workers=1, **KW)
    src = _Killer(1, 1)
    prepare(cfg, source=src, progress=False)  # in this process the victim is harmless: all prepared
    chunk = [it.id for it in src.items if it.split == "train"].index(VICTIM) // KW["chunk_size"]
    (out / shard_relpath("train", chunk)).unlink()  # as if the job had died in that chunk
    (out / "manifest.json").unlink()
    innocent = next(it for it in src.items if it.split == "train" and it.id != VICTIM)
    assert not (out / "failed").exists()  # nothing failed: no empty folder left behind
    (out / "failed").mkdir()
    for pid, item_id in ((999_999_001, VICTIM), (999_999_002, innocent.id)):
        (out / "failed" / f".inflight-{pid}.json").write_text(
            json.dumps({"split": "train", "chunk": chunk, "id": item_id, "path": None}))
    man = prepare(cfg, source=src, progress=False)
    assert [r["id"] for r in man["failed"]] == [VICTIM] and "killed by SIGKILL" in man["failed"][0]["reason"]
    assert innocent.id in ShapeStore(out).split("train").ids
    assert sum(man["counts"].values()) == _total(man) - 1


def _prepare_in_this_process(out: str, test_pid: int) -> None:
    prepare(PrepareConfig(out=out, workers=1, **KW), source=_Killer(1, 1, test_pid=test_pid), progress=False)


def test_a_one_worker_job_killed_by_an_object_skips_it_on_the_next_run(tmp_path):
    """With one worker the object kills the job itself (a real SIGKILL, no marker written by hand);
    the same command again probes the object it left in flight, records it and finishes."""
    import multiprocessing as mp

    out = tmp_path / "ds"
    job = mp.get_context("spawn").Process(target=_prepare_in_this_process, args=(str(out), os.getpid()))
    job.start()
    job.join(120)
    if job.is_alive():  # not killed in time: do not leave it running
        job.kill()
        job.join()
    assert job.exitcode == -signal.SIGKILL
    (marker,) = (out / "failed").glob(".inflight-*.json")
    assert json.loads(marker.read_text())["id"] == VICTIM
    assert not (out / "manifest.json").exists()
    man = prepare(PrepareConfig(out=out, workers=1, **KW), source=_Killer(1, 1), progress=False)
    assert [r["id"] for r in man["failed"]] == [VICTIM] and "killed by SIGKILL" in man["failed"][0]["reason"]
    assert sum(man["counts"].values()) == _total(man) - 1
    assert not list((out / "failed").glob(".inflight-*"))


def test_a_worker_death_no_object_explains_stops_the_job(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(PrepareError, match="a worker process died .* none died") as err:
        prepare(PrepareConfig(out=out, workers=2, **KW), source=_Killer(1, 1, pool_only=True), progress=False)
    assert "fewer --workers" in err.value.hint
    assert crash.read_crashes(out) == {}
    # one worker: the object is prepared (in this process, where it harms nothing)
    man = prepare(PrepareConfig(out=out, workers=1, **KW), source=_Killer(1, 1, pool_only=True), progress=False)
    assert man["failed"] == []


def test_crash_record_holds_until_the_file_changes(tmp_path):
    mesh = tmp_path / "m.off"
    mesh.write_text("OFF\n")
    out = tmp_path / "ds"
    (out / "failed").mkdir(parents=True)
    with crash.InFlight(out) as mark:
        mark("train", 3, Item(id="a/train/m", label="a", split="train", path=str(mesh)))
        assert mark.path.is_file()
    assert not mark.path.exists()  # gone with the block
    (out / "failed" / ".inflight-1.json").write_text('{"split": "train", "chunk": 3, "id": "a/train/m", "path": "%s"}'
                                                     % mesh)
    (out / "failed" / ".inflight-2.json").write_text("{cut sho")  # a marker cut short by the death
    (suspect,) = crash.find_suspects(out)
    assert suspect["id"] == "a/train/m" and [p.name for p in (out / "failed").glob(".inflight-*")] == [
        ".inflight-1.json"]  # the unreadable one is gone; the other stays until its object is settled
    crash.drop_markers(suspect)
    assert not list((out / "failed").glob(".inflight-*"))
    item = Item(id="a/train/m", label="a", split="train", path=str(mesh))
    rec = crash.record_crash(out, item, -signal.SIGSEGV)
    assert "killed by SIGSEGV" in rec["reason"]
    assert crash.crash_reason(crash.read_crashes(out), item) == rec["reason"]
    mesh.write_text("OFF\n3 1 0\n")  # fixed (or replaced): tried again
    assert crash.crash_reason(crash.read_crashes(out), item) is None
    assert crash.describe_exit(3) == "exited with code 3 before finishing it"
