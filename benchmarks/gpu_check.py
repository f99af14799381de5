"""One GPU self-check of the whole xmodal stack, printed as a table (exit 1 on any failure).

On a CUDA machine, in a few minutes:

* ``render``     – renders a built-in mesh with the default EGL context (the GPU driver on an
                   NVIDIA machine), renders it again in a subprocess forced onto Mesa's software
                   EGL (llvmpipe), and compares the two images (mean absolute difference and the
                   fraction of pixels that differ by more than 8 grey levels);
* ``train-fp32`` – steps of the ``paper`` preset at full size (batch 32, 2,048 points, 224 px)
                   on synthetic data through the real training step: s/step, images/s, clouds/s,
                   peak GPU memory;
* ``train-amp``  – the same with ``paper-stable``'s mixed precision (bf16 where supported);
* ``ddp``        – one 2-process NCCL step when 2 GPUs are visible (gloo on the CPU);
* ``features``   – frozen-encoder feature extraction for evaluation (objects/s).

On a machine without CUDA every check that needs the GPU says ``skipped`` with the reason and
the rest runs at a small size, so the script itself stays tested (``tests/test_gpu_check.py``).

Usage::

    python benchmarks/gpu_check.py                 # everything this machine can do
    python benchmarks/gpu_check.py --steps 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from xmodal.api import extract_image_features, extract_point_features
from xmodal.config import resolve
from xmodal.data.builtin import CLASSES, make_shape
from xmodal.data.render import Renderer, sample_view_angles
from xmodal.data.datasets import open_dataset
from xmodal.data.store import write_store
from xmodal.train.config import PretrainConfig
from xmodal.train.distributed import DistContext
from xmodal.train.model import autocast_dtype, build_optimizer, build_training_model
from xmodal.train.sampler import BatchSpec, PretrainBatches
from xmodal.train.step import Stepper

MESA_EGL = "/usr/share/glvnd/egl_vendor.d/50_mesa.json"
#: full size = the paper's; small = what runs in seconds on a CPU
SIZES = {"full": dict(batch=32, points=2048, image=224), "small": dict(batch=4, points=256, image=32)}


class Skipped(Exception):
    """A check that cannot run on this machine (the message says why)."""


# --------------------------------------------------------------------------- render
def _render(size: int) -> tuple[np.ndarray, str]:
    mesh = make_shape(CLASSES[0], 0)
    with Renderer(size) as r:
        img = r.render_mesh(mesh, sample_view_angles(2, seed=0))
        return img, r.gl_renderer


def _render_in_subprocess(size: int, env: dict) -> tuple[np.ndarray, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "img.npy"
        code = (
            "import sys, numpy as np; sys.path.insert(0, %r); from gpu_check import _render; "
            "img, name = _render(%d); np.save(%r, img); print(name)" % (str(Path(__file__).parent), size, str(out))
        )
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"software render failed: {proc.stderr[-500:]}")
        return np.load(out), proc.stdout.strip().splitlines()[-1]


def check_render(args) -> str:
    img, name = _render(224)
    if img.shape != (2, 224, 224) or img.max() == 0:
        raise RuntimeError(f"render gave shape {img.shape}, max {img.max()}")
    if not torch.cuda.is_available():
        raise Skipped(f"rendered with {name}; no CUDA, so no GPU-vs-software comparison")
    if not os.path.exists(MESA_EGL):
        raise Skipped(f"rendered with {name}; Mesa's EGL ({MESA_EGL}) is absent, so no software reference")
    ref, ref_name = _render_in_subprocess(224, dict(os.environ, __EGL_VENDOR_LIBRARY_FILENAMES=MESA_EGL))
    diff = np.abs(img.astype(np.int16) - ref.astype(np.int16))
    mad, far = float(diff.mean()), float((diff > 8).mean())
    if mad > 2.0 or far > 0.02:
        raise RuntimeError(f"{name} vs {ref_name}: mean |diff| {mad:.2f}, {far:.1%} pixels off by > 8")
    return f"{name} vs {ref_name}: mean |diff| {mad:.3f} grey levels, {far:.2%} pixels off by > 8"


# --------------------------------------------------------------------------- training
def _synthetic_store(root: Path, n: int, points: int, image: int, views: int = 4) -> Path:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(n, points, 3)).astype(np.float32)
    pts /= np.linalg.norm(pts, axis=2).max(axis=1)[:, None, None]
    imgs = rng.integers(0, 256, size=(n, views, image, image), dtype=np.uint8)
    split = {"ids": [f"o{i}" for i in range(n)], "labels": np.arange(n) % 2, "points": pts, "images": imgs}
    write_store(root, classes=["a", "b"], splits={"train": split}, up_axis="z")
    return root


def _train_steps(preset: str, size: dict, steps: int, device: torch.device) -> str:
    cfg = resolve(PretrainConfig, preset, [
        f"batch_size={size['batch']}", f"data.num_points={size['points']}", f"data.image_size={size['image']}",
        "data.workers=0", f"device={device.type}",
    ], group="pretrain")
    ctx = DistContext(device=device)
    with tempfile.TemporaryDirectory() as tmp:
        store = _synthetic_store(Path(tmp), 2 * size["batch"], size["points"], size["image"])
        ds = PretrainBatches(open_dataset(store).split("train"), BatchSpec.from_config(cfg), stop=steps + 1)
        net = build_training_model(cfg, ctx)
        opt, sched = build_optimizer(cfg, net)
        amp = autocast_dtype(cfg.amp, device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16) if device.type == "cuda" else None
        stepper = Stepper(net, cfg, ctx, opt, sched, amp, scaler)
        batches = [ds.batch(s) for s in range(steps + 1)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stepper(batches[0], 1)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for s, b in enumerate(batches[1:], start=2):
            parts = stepper(b, s)
        _sync(device)
    dt = (time.perf_counter() - t0) / steps
    mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
    amp_name = str(amp).replace("torch.", "") if amp else "float32"
    return (f"{preset} {size['batch']}x({size['points']} pts, 3x{size['image']} px) {amp_name}: {dt:.3f} s/step, "
            f"{3 * size['batch'] / dt:.0f} images/s, {size['batch'] / dt:.1f} clouds/s{mem}, loss {parts[0]:.3f}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_and_size(args) -> tuple[torch.device, dict, str]:
    if torch.cuda.is_available():
        return torch.device("cuda"), SIZES["full"], ""
    return torch.device("cpu"), SIZES["small"], " (no CUDA: small size on the CPU; the full-size GPU run was skipped)"


def check_train_fp32(args) -> str:
    device, size, note = _device_and_size(args)
    return _train_steps("paper", size, args.steps, device) + note


def check_train_amp(args) -> str:
    device, size, note = _device_and_size(args)
    if device.type == "cpu":
        return _train_steps("paper-stable", size, args.steps, device).replace("float32", "float32 (amp auto = off on CPU)") + note
    return _train_steps("paper-stable", size, args.steps, device)


# --------------------------------------------------------------------------- DDP
def check_ddp(args) -> str:
    if torch.cuda.device_count() < 2:
        raise Skipped(f"{torch.cuda.device_count()} CUDA device(s): the 2-process NCCL step needs 2 "
                      "(the gloo/CPU path is covered by tests/train/test_distributed.py)")
    with tempfile.TemporaryDirectory() as tmp:
        data = _synthetic_store(Path(tmp) / "data", 16, 512, 64)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "xmodal", "--quiet", "pretrain", "--data", str(data), "--out", str(Path(tmp) / "run"),
               "--preset", "smoke", "device=cuda", "batch_size=8", "data.num_points=512", "data.image_size=64"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed: {proc.stderr[-800:]}")
        info = json.loads((Path(tmp) / "run" / "run.json").read_text())
    return f"2 x NCCL, smoke preset: ok in {time.perf_counter() - t0:.1f} s; run.json world_size {info['world_size']}"


# --------------------------------------------------------------------------- features
def check_features(args) -> str:
    device, size, note = _device_and_size(args)
    cfg = resolve(PretrainConfig, "paper", [f"device={device.type}"], group="pretrain")
    net = build_training_model(cfg, DistContext(device=device)).eval()
    n = 256 if device.type == "cuda" else 16
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(n, size["points"], 3)).astype(np.float32)
    imgs = rng.integers(0, 256, size=(n, size["image"], size["image"]), dtype=np.uint8)
    t0 = time.perf_counter()
    f3 = extract_point_features(net.point_encoder, pts, batch_size=32, device=device)
    t1 = time.perf_counter()
    f2 = extract_image_features(net.image_encoder, imgs, batch_size=64, device=device)
    t2 = time.perf_counter()
    if f3.shape != (n, 512) or f2.shape != (n, 512) or not (np.isfinite(f3).all() and np.isfinite(f2).all()):
        raise RuntimeError(f"features of shapes {f3.shape}, {f2.shape} or not finite")
    return f"{n / (t1 - t0):.0f} clouds/s ({size['points']} pts), {n / (t2 - t1):.0f} images/s ({size['image']} px){note}"


CHECKS = {
    "render": check_render,
    "train-fp32": check_train_fp32,
    "train-amp": check_train_amp,
    "ddp": check_ddp,
    "features": check_features,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed training steps per check (default 5)")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"xmodal GPU self-check: torch {torch.__version__}, CUDA device: {cuda}")
    rows, failed = [], 0
    for name in args.only or list(CHECKS):
        t0 = time.perf_counter()
        try:
            status, detail = "ok", CHECKS[name](args)
        except Skipped as exc:
            status, detail = "skipped", str(exc)
        except Exception as exc:  # a failed check is reported, the others still run
            status, detail, failed = "FAILED", f"{type(exc).__name__}: {exc}", failed + 1
            traceback.print_exc(file=sys.stderr)
        rows.append({"check": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "detail": detail})
    width = max(len(r["check"]) for r in rows)
    print(f"{'check':<{width}}  status   time    detail")
    for r in rows:
        print(f"{r['check']:<{width}}  {r['status']:<7}  {r['seconds']:5.1f}s  {r['detail']}")
    if args.json:
        args.json.write_text(json.dumps({"cuda": cuda, "checks": rows}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
