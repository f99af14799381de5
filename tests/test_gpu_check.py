"""The GPU self-check script runs on a CPU machine, skipping (and saying so) what needs CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of the script is checked here")
def test_gpu_check_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["check"]: r for r in json.loads(out.read_text())["checks"]}
    assert set(rows) == {"render", "train-fp32", "train-amp", "ddp", "features"}
    assert rows["render"]["status"] == "skipped" and "no CUDA" in rows["render"]["detail"]
    assert rows["ddp"]["status"] == "skipped" and "CUDA device" in rows["ddp"]["detail"]
    for name in ("train-fp32", "train-amp", "features"):
        assert rows[name]["status"] == "ok" and "full-size GPU run was skipped" in rows[name]["detail"], rows[name]
    assert "s/step" in rows["train-fp32"]["detail"] and "images/s" in rows["train-fp32"]["detail"]
    assert "skipped" in proc.stdout and "FAILED" not in proc.stdout


def _module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu_check


def test_gpu_check_exits_1_when_a_check_fails(monkeypatch, capsys):
    gpu_check = _module()

    def broken(args):
        raise RuntimeError("simulated failure")

    monkeypatch.setitem(gpu_check.CHECKS, "features", broken)
    assert gpu_check.main(["--only", "features", "ddp"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "simulated failure" in out and "skipped" in out


def test_software_render_reference_matches_in_process_render():
    """The reference render of the GPU comparison runs in a subprocess; on one machine both agree exactly."""
    gpu_check = _module()
    img, _ = gpu_check._render(64)
    env = dict(os.environ)
    if os.path.exists(gpu_check.MESA_EGL) and not torch.cuda.is_available():
        env["__EGL_VENDOR_LIBRARY_FILENAMES"] = gpu_check.MESA_EGL
    ref, name = gpu_check._render_in_subprocess(64, env)
    assert np.array_equal(img, ref) and name
