"""Hard stops of `xmodal pretrain`: real signals to a real subprocess, a second writer, then resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from xmodal.data.store import write_store
from xmodal.train.checkpoint import load_checkpoint
from xmodal.utils.io import read_jsonl

ITERS = 24


def _store(root, n=8, views=2, size=16, points=64):
    rng = np.random.default_rng(0)
    split = {"ids": [f"o{i}" for i in range(n)], "labels": np.arange(n) % 2,
             "points": rng.normal(size=(n, points, 3)).astype(np.float32),
             "images": rng.integers(0, 256, size=(n, views, size, size), dtype=np.uint8)}
    write_store(root, classes=["a", "b"], splits={"train": split}, up_axis="z")
    return root


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "xmodal", "--quiet", "pretrain", "--data", str(data), "--out", str(out),
            "--preset", "smoke", f"iterations={ITERS}", "checkpoint_every=12", "data.image_size=16",
            "data.num_points=64", "model.k=4", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _start_and_wait(cmd, out, min_records=3):
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and len(read_jsonl(log)) >= min_records:
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"pretrain ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("pretrain did not start logging in time")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("intr") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(data, out), env=_env(), check=True, capture_output=True, timeout=300)
    return load_file(str(out / "encoders.safetensors"))


def _stop(data, out, sig):
    """Start a run, send ``sig`` once it logs, return (exit code, stderr, the step it stopped after)."""
    proc = _start_and_wait(_cmd(data, out), out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert "error:" not in err and "Traceback" not in err, err  # a stop asked for is not an error
    assert f"xmodal pretrain: {out}: stopped by {signal.Signals(sig).name} after step" in err and "--resume" in err
    stopped = int(err.split("after step ")[1].split()[0])
    assert 3 <= stopped < ITERS
    assert load_checkpoint(out).step == stopped and not (out / "encoders.safetensors").exists()
    return proc.returncode, err, stopped


def test_sigterm_saves_a_checkpoint_and_resume_is_bit_identical(data, reference, tmp_path):
    out = tmp_path / "run"
    code, _, _ = _stop(data, out, signal.SIGTERM)
    assert code == 143
    done = subprocess.run(_cmd(data, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = load_file(str(out / "encoders.safetensors"))
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert np.array_equal(resumed[k], reference[k]), k
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == ITERS


def test_sigint_stops_with_130_and_a_checkpoint(data, tmp_path):
    code, _, _ = _stop(data, tmp_path / "run", signal.SIGINT)
    assert code == 130


def test_second_writer_refused_while_first_runs(data, tmp_path):
    out = tmp_path / "run"
    first = _start_and_wait(_cmd(data, out), out, min_records=1)
    try:
        second = subprocess.run(_cmd(data, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is being written by xmodal pretrain (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    # it may have finished while the second one started; a SIGTERM after its job is done (the
    # handler is gone) ends it with the default action
    finished = (out / "encoders.json").is_file()
    assert first.returncode in (0, 143) or (finished and first.returncode == -signal.SIGTERM)
