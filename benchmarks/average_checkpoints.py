"""Pilot for weight averaging (issue #11): a run folder whose networks are an average of saved
checkpoints of one run, for :mod:`benchmarks.probe_val_svm` to score (docs/EXPERIMENTS.md).

A run keeps only its last checkpoint; copies of ``RUN/checkpoints/last.safetensors`` taken while it
trains (one per ``checkpoint_every`` steps) are the input. The output folder is a copy of ``RUN``
without ``encoders.*``, whose ``checkpoints/last.safetensors`` holds the mean of the given
checkpoints' floating-point network tensors: what ``optim.average_from`` exports when it samples
those steps.

Integer buffers (BatchNorm's batch counters) and the optimiser's state come from the last
checkpoint. ``load_run`` reads the folder as an unfinished run (its last checkpoint).

Usage::

    python benchmarks/average_checkpoints.py runs/ref-s0 --out runs/ref-s0-swa1000 \\
        runs/ref-s0-snaps/step_{1000,1200,1400,1600,1800,2000,2200,2400,2600,2800,3000}.safetensors
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from xmodal.train.checkpoint import checkpoint_paths, write_safetensors


def _read(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return int(meta["step"]), load_file(str(path)), meta


def average(paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[int]]:
    """The averaged tensors (network tensors under ``model/``), the last checkpoint's metadata and the steps used."""
    snaps = sorted((_read(p) for p in paths), key=lambda s: s[0])
    steps = [s for s, _, _ in snaps]
    last = dict(snaps[-1][1])
    keys = [k for k, v in last.items() if k.startswith("model/") and v.is_floating_point()]
    acc = {k: snaps[0][1][k].double() for k in keys}
    for i, (_, tensors, _) in enumerate(snaps[1:], start=2):
        for k in keys:
            acc[k] += (tensors[k].double() - acc[k]) / i  # running mean
    for k in keys:
        last[k] = acc[k].to(last[k].dtype)
    return last, snaps[-1][2], steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="the run the checkpoints come from (config and run files are copied)")
    ap.add_argument("checkpoints", type=Path, nargs="+", help="copies of its checkpoints/last.safetensors")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists")
    tensors, meta, steps = average(args.checkpoints)
    shutil.copytree(args.run, args.out, ignore=shutil.ignore_patterns("encoders.*", "tb", "events.*"))
    wpath, jpath = checkpoint_paths(args.out)
    write_safetensors(tensors, wpath, meta)
    jpath.write_text(meta["xmodal_state"])  # the state of the last checkpoint averaged
    print(f"{args.out}: uniform average of steps {steps}")


if __name__ == "__main__":
    main()
