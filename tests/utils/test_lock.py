"""One writer per output folder (xmodal.utils.lock)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from xmodal.errors import OutputLockedError
from xmodal.utils.lock import LOCK_NAME, output_lock

_HOLD = """
import sys, time
from xmodal.utils.lock import output_lock
with output_lock(sys.argv[1], "pretrain"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "out")
    try:
        with pytest.raises(OutputLockedError, match=rf"out: is being written by xmodal pretrain \(pid {proc.pid} on "):
            with output_lock(tmp_path / "out", "evaluate"):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_never_blocks(tmp_path):
    proc = _holder(tmp_path / "out")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "out" / LOCK_NAME).exists()  # the file stays, the lock does not
    with output_lock(tmp_path / "out", "pretrain") as path:
        assert str(os.getpid()) in path.read_text()


def test_lock_is_released_after_the_block(tmp_path):
    with output_lock(tmp_path, "prepare"):
        pass
    t0 = time.perf_counter()
    with output_lock(tmp_path, "prepare"):
        pass
    assert time.perf_counter() - t0 < 1.0


def test_folder_created_by_a_job_that_wrote_nothing_is_removed(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with output_lock(out, "prepare"):
            assert (out / LOCK_NAME).is_file()
            raise RuntimeError("bad input")
    assert not out.exists()


def test_a_folder_with_output_or_that_existed_before_stays(tmp_path):
    out = tmp_path / "new"
    with output_lock(out, "prepare"):
        (out / "plan.json").write_text("{}")
    assert (out / "plan.json").is_file()
    before = tmp_path / "before"
    before.mkdir()
    with output_lock(before, "prepare"):
        pass
    assert before.is_dir() and [p.name for p in before.iterdir()] == [LOCK_NAME]


def test_cli_with_a_missing_source_leaves_no_output_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xmodal", "prepare", "--source", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "ds")], capture_output=True, text=True)
    assert proc.returncode != 0 and "nothing" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ds").exists()
