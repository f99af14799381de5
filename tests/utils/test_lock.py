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
