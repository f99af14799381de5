"""Stopping `xmodal prepare`: real signals to a real subprocess, a second writer, then the same command again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


from xmodal.data.prepare import PrepareConfig, prepare  # noqa: E402
from xmodal.data.store import ShapeStore, read_shard  # noqa: E402

SCRIPT = Path(__file__).with_name("slow_prepare_cli.py")
SPEC = "builtin:shapes?train=1&test=1"  # 28 objects in 14 chunks of 2
KW = dict(views=2, points=64, image_size=32, chunk_size=2)
SLOW = 0.25  # seconds per object while a test signals the job


def _cmd(out: Path, *extra: str) -> list[str]:
    flags = ["--views", "2", "--points", "64", "--image-size", "32", "--chunk-size", "2"]
    return [sys.executable, str(SCRIPT), "-q", "prepare", "--source", SPEC, "--out", str(out), *flags, *extra]


def _env(slow: float) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", XMODAL_TEST_SLOW=str(slow))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ds"
    prepare(PrepareConfig(source=SPEC, out=out, **KW), progress=False)
    return out


def _shards(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.h5")}


def _start(out: Path, *extra: str, wait_for: str = "shard") -> subprocess.Popen:
    """Start a slowed-down prepare in its own process group; return once it wrote a shard (or its plan)."""
    proc = subprocess.Popen(_cmd(out, *extra), env=_env(SLOW), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready = ((out / "shards").is_dir() and _shards(out)) if wait_for == "shard" else (out / "plan.json").is_file()
        if ready:
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"prepare ended early: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("prepare wrote nothing in time")


def _group_gone(pgid: int) -> bool:
    """True once no process of the group (the job and its workers) is left."""
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _check_stopped(proc: subprocess.Popen, out: Path, sig: signal.Signals) -> dict:
    """The job exited with 128 + sig and one line (+ hint), leaving only complete shards; returns them."""
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "error:" not in err and "Traceback" not in err, err  # a stop asked for is not an error
    line = next(x for x in err.splitlines() if "stopped by" in x and x.startswith("xmodal prepare:"))
    assert line.startswith(f"xmodal prepare: {out}: stopped by {sig.name}: ") and "of the 14 shards" in line
    assert "hint: run the same command again to finish" in err
    assert _group_gone(proc.pid), "a worker process outlived the job"
    shards = _shards(out)
    assert 0 < len(shards) < 14 and f"{len(shards)} of the 14 shards" in line
    assert all(len(read_shard(p)["ids"]) == 2 for p in shards)  # each shard complete
    assert not [p for p in out.rglob(".*.tmp")] and not (out / "manifest.json").exists()
    return shards


def _finish_and_compare(out: Path, reference: Path, done: dict, *extra: str) -> None:
    """The same command again writes only the missing shards; the result equals an uninterrupted build."""
    again = subprocess.run(_cmd(out, *extra), env=_env(0), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished shards were not rebuilt
    a, b = ShapeStore(out), ShapeStore(reference)
    assert a.manifest == b.manifest
    for split in b.splits:
        assert a.split(split).ids == b.split(split).ids
        np.testing.assert_array_equal(a.split(split).all_points(), b.split(split).all_points())
        np.testing.assert_array_equal(a.split(split).images(3), b.split(split).images(3))


def test_ctrl_c_to_the_process_group_stops_the_pool_cleanly(reference, tmp_path):
    out = tmp_path / "ds"
    proc = _start(out, "--workers", "2")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the job and its workers get SIGINT
    done = _check_stopped(proc, out, signal.SIGINT)
    _finish_and_compare(out, reference, done, "--workers", "2")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with their parent through Linux prctl")
def test_kill_9_of_the_main_process_takes_its_workers_along(reference, tmp_path):
    """``kill -9`` reaches only the main process: its idle workers must not live on."""
    out = tmp_path / "ds"
    proc = _start(out, "--workers", "2")
    proc.kill()
    proc.communicate(timeout=60)
    assert _group_gone(proc.pid), "a worker process outlived its killed parent"
    done = {p: t for p, t in _shards(out).items() if len(read_shard(p)["ids"]) == 2}
    _finish_and_compare(out, reference, done, "--workers", "2")


def test_sigterm_stops_a_serial_prepare_with_143(reference, tmp_path):
    out = tmp_path / "ds"
    proc = _start(out)
    proc.send_signal(signal.SIGTERM)
    done = _check_stopped(proc, out, signal.SIGTERM)
    _finish_and_compare(out, reference, done)


def test_second_prepare_into_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "ds"
    first = _start(out, wait_for="plan")
    try:
        second = subprocess.run([sys.executable, "-m", "xmodal", *_cmd(out)[2:]], env=_env(0), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert f"{out}: is being written by xmodal prepare (pid {first.pid} " in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode in (0, 143)
