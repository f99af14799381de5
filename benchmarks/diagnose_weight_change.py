"""How far pre-training moved each encoder from the weights it started from (docs/EXPERIMENTS.md, issue #11).

For every run given, the networks are compared with the same networks at random initialisation
under the run's own training seed (:meth:`xmodal.api.LoadedRun.at_random_init`, the weights
training starts from). Printed per encoder: the relative change ``|W - W0| / |W0|`` over all its
weight tensors (matrices and convolution kernels; biases and BatchNorm affine parameters left
out), the norm ratio ``|W| / |W0|`` over the same tensors, and the smallest / median / largest
change of one tensor; with ``--per-tensor``, every tensor of Fp. A relative change well below 1
means the encoder is still mostly its random initialisation. Read the image encoder's figure with
its BatchNorm in mind: a convolution followed by ordinary BatchNorm computes the same function at
any scale of its weights, so part of its change can be a change of norm alone (the norm ratio
shows how much); Fp's BatchNorm statistics are frozen in the `cpu` presets, so its weights' scale
is not free in the same way.

Usage::

    python benchmarks/diagnose_weight_change.py runs/mn40-cpu3000-s0 runs/mn40-kai-4k [--per-tensor]
"""

from __future__ import annotations

import argparse

import torch

from xmodal.api import load_run


def _weight_pairs(trained: torch.nn.Module, start: torch.nn.Module):
    """``(name, W, W0)`` for every parameter of ``trained`` with 2 or more dimensions (matrices and
    convolution kernels); ``start`` must have the same parameter names and shapes."""
    before = dict(start.named_parameters())
    for name, w in trained.named_parameters():
        if w.dim() >= 2:
            yield name, w.detach(), before[name].detach()


def weight_changes(trained: torch.nn.Module, start: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """``{name: (|W - W0| / |W0|, |W| / |W0|)}`` per weight tensor (a tensor that starts at zero has
    no relative change and is left out)."""
    out = {}
    for name, w, w0 in _weight_pairs(trained, start):
        n0 = float(w0.norm())
        if n0 > 0:
            out[name] = (float((w - w0).norm()) / n0, float(w.norm()) / n0)
    return out


def overall_change(trained: torch.nn.Module, start: torch.nn.Module) -> tuple[float, float]:
    """``(|W - W0| / |W0|, |W| / |W0|)`` over all weight tensors together."""
    diff = now = den = 0.0
    for _, w, w0 in _weight_pairs(trained, start):
        diff += float(((w - w0) ** 2).sum())
        now += float((w ** 2).sum())
        den += float((w0 ** 2).sum())
    return ((diff / den) ** 0.5, (now / den) ** 0.5) if den > 0 else (0.0, 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders")
    ap.add_argument("--per-tensor", action="store_true", help="also print every weight tensor of Fp")
    args = ap.parse_args(argv)
    for path in args.runs:
        run = load_run(path)
        start = run.at_random_init(run.config.seed)
        o = run.config.optim
        print(f"{path} (step {run.step}, seed {run.config.seed}, lr {o.lr:g}, point_lr_scale {o.point_lr_scale:g})")
        for enc in ("image_encoder", "point_encoder"):
            per_tensor = weight_changes(getattr(run, enc), getattr(start, enc))
            rel = sorted(r for r, _ in per_tensor.values())
            change, norm = overall_change(getattr(run, enc), getattr(start, enc))
            print(f"  {enc}: relative change {change:.3f}, |W|/|W0| {norm:.3f} "
                  f"(one tensor: min {rel[0]:.3f}, median {rel[len(rel) // 2]:.3f}, max {rel[-1]:.3f})")
            if args.per_tensor and enc == "point_encoder":
                for name, (r, ratio) in per_tensor.items():
                    print(f"    {name:32s} change {r:.3f}  |W|/|W0| {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
