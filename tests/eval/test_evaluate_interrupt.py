"""Stopping `xmodal evaluate`: real signals to a real subprocess, a second writer, then the same command again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xmodal.data.store import write_store

SCRIPT = Path(__file__).with_name("slow_evaluate_cli.py")
# on a points-only store without part labels: retrieval and fewshot in 3D, partseg skipped (with its reason)
TASKS = ("retrieval", "fewshot", "partseg")


def _split(n_per: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per)
    pts = rng.normal(size=(y.size, 48, 3)) * (0.3 + 0.2 * y)[:, None, None]
    return {"ids": [f"o{seed}_{i}" for i in range(y.size)], "labels": y, "points": pts.astype(np.float32)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsig") / "data"
    write_store(root, classes=["a", "b", "c"], splits={"train": _split(5, 0), "test": _split(3, 1)})
    return root


def _cmd(data: Path, out: Path) -> list[str]:
    tasks = [a for t in TASKS for a in ("--task", t)]
    return [sys.executable, str(SCRIPT), "-q", "evaluate", "--run", str(out.parent / "run"), "--data", str(data),
            "--out", str(out), *tasks, "--device", "cpu", "fewshot.settings=[[2,2]]",
            "fewshot.episodes=2", "fewshot.query=2"]


def _env(slow: float = 0.0, forbid: str = "", hold: str = "") -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", XMODAL_TEST_SLOW=str(slow), XMODAL_TEST_FORBID=forbid,
                XMODAL_TEST_HOLD=hold)


def _done(out: Path) -> list[str]:
    try:
        return list(json.loads((out / "metrics.json").read_text()).get("meta.tasks_done", {}))
    except (OSError, ValueError):
        return []


def _start(data: Path, out: Path, *, until_done: int, slow: float = 0.5, hold: str = "") -> subprocess.Popen:
    """Start an evaluation whose tasks each wait ``slow`` seconds first (and then while the file
    ``hold`` exists); return once ``until_done`` tasks are in metrics.json."""
    proc = subprocess.Popen(_cmd(data, out), env=_env(slow=slow, hold=hold), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len(_done(out)) >= until_done and (out / ".xmodal.lock").exists():
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"evaluate ended early: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("evaluate did not get going in time")


def test_sigterm_keeps_the_finished_tasks_and_the_same_command_does_the_rest(data, tmp_path):
    out = tmp_path / "report"
    proc = _start(data, out, until_done=1)  # retrieval done; fewshot runs now
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "error:" not in err and "Traceback" not in err, err  # a stop asked for is not an error
    assert (f"xmodal evaluate: {out}: stopped by SIGTERM: 2 of 3 task evaluations finished "
            "(run: retrieval, run: fewshot); metrics in") in err
    assert "hint: run the same command again to evaluate the rest" in err
    stopped = json.loads((out / "metrics.json").read_text())
    assert list(stopped["meta.tasks_done"]) == ["retrieval", "fewshot"] and "fewshot3d.2w2s.mean" in stopped
    assert "partseg" not in stopped["meta.tasks_skipped"] and (out / "report.md").is_file()
    again = subprocess.run(_cmd(data, out), env=_env(forbid="retrieval,fewshot"), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    final = json.loads((out / "metrics.json").read_text())
    assert list(final["meta.tasks_done"]) == list(TASKS) and final["meta.tasks_run"] == list(TASKS)
    assert {k: v for k, v in final.items() if k in stopped and not k.startswith("meta.")} == {
        k: v for k, v in stopped.items() if not k.startswith("meta.")}
    assert "part labels" in final["meta.tasks_skipped"]["partseg"]


def test_ctrl_c_stops_with_130_and_a_second_writer_is_refused(data, tmp_path):
    out = tmp_path / "report"
    hold = tmp_path / "hold"
    hold.touch()  # the first job's task waits while this exists: on a loaded machine it must not finish early
    first = _start(data, out, until_done=0, slow=0.5, hold=str(hold))
    try:
        second = subprocess.run([sys.executable, "-m", "xmodal", *_cmd(data, out)[2:]], env=_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"{out}: is being written by xmodal evaluate (pid {first.pid} " in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGINT)
        hold.unlink()  # the job notes the signal, then goes on to the point where it stops
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "stopped by SIGINT" in err and "Traceback" not in err
