"""Probe: does a point-only contrastive signal with strong augmentations lift Fp's validation SVM
within a CPU budget? (docs/EXPERIMENTS.md, issue #11)

Fp alone (DGCNN with frozen BatchNorm statistics, as the ``cpu`` preset trains it) and a small
projection head are trained with InfoNCE (SimCLR's NT-Xent, temperature 0.1) between two views
of each cloud of a batch. A view: optionally (``--strong``) cut away the points nearest to a
random point of the cloud (up to a quarter of them), then a random subset of 512 points, a
rotation about the store's up axis, optionally (``--strong``) an anisotropic scale in [2/3, 3/2] per
axis and a translation in [-0.2, 0.2], then Gaussian jitter (σ 0.01). Adam, no images, no Ff.
Every ``--every`` steps the validation objects of the ``cpu`` preset's curve (10 % of each class
of the training split, never trained on) are scored as ``val.every`` does.

A diagnostic, not a training mode of the library: it answers whether the point-side signal is
worth building into the sampler.

Usage::

    python benchmarks/probe_point_contrastive.py --data mn40 --init kaiming --steps 600 --batch 16 --strong
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xmodal.data.datasets import open_dataset
from xmodal.models.batchnorm import hold_batchnorm_stats
from xmodal.models.dgcnn import DGCNN, POINT_INITS
from xmodal.train.augment import rotation_matrices
from xmodal.train.config import ValConfig
from xmodal.train.validation import Validator, holdout_split


class _PointsOnly(nn.Module):
    """The one attribute the validator reads (``point_encoder``), with views off."""

    def __init__(self, fp: nn.Module) -> None:
        super().__init__()
        self.point_encoder = fp


def _view(p: np.ndarray, rng: np.random.Generator, strong: bool, num_points: int, up_axis: str) -> np.ndarray:
    if strong:
        d = ((p - p[rng.integers(len(p))]) ** 2).sum(1)
        p = p[np.argsort(d)[int(rng.uniform(0, 0.25) * len(p)):]]
    p = p[rng.choice(len(p), num_points, replace=False)]
    rot = rotation_matrices(np.array([rng.uniform(0, 2 * np.pi)]), up_axis)[0].double().numpy()
    p = p @ rot.T
    if strong:
        p = p * rng.uniform(2 / 3, 3 / 2, size=3) + rng.uniform(-0.2, 0.2, size=3)
    return (p + rng.normal(0, 0.01, p.shape)).astype(np.float32)


def _nt_xent(z: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """z: (2B, D), rows i and i + B are two views of one cloud."""
    b = z.shape[0] // 2
    z = F.normalize(z, dim=1)
    sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset folder (xmodal prepare)")
    ap.add_argument("--init", choices=POINT_INITS, default="kaiming")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16, help="clouds per step (2 views each)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--strong", action="store_true", help="cut-out, anisotropic scale and translation")
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    store = open_dataset(args.data)
    split = store.split("train")
    train_idx, val_idx = holdout_split(split.labels, 0.1, seed=args.seed)
    validator = Validator(split, val_idx, ValConfig(every=1, views=0), num_points=512, seed=args.seed)
    fp = DGCNN(k=16, init=args.init)
    head = nn.Sequential(nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128))
    opt = torch.optim.Adam([*fp.parameters(), *head.parameters()], lr=args.lr, weight_decay=1e-6)
    net = _PointsOnly(fp)

    def score(step: int) -> None:
        s = validator(net, torch.device("cpu"), image_size=64)
        print(f"step {step}: val.svm3d {100 * s['val.svm3d']:.1f}  val.retrieval3d.top1 "
              f"{100 * s['val.retrieval3d.top1']:.1f}", flush=True)

    score(0)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        hold_batchnorm_stats(fp.train())  # frozen statistics, as model.freeze_point_bn
        clouds = [split.points(int(i)) for i in rng.choice(train_idx, args.batch, replace=False)]
        views = [_view(p, rng, args.strong, 512, store.up_axis) for _ in range(2) for p in clouds]
        loss = _nt_xent(head(fp(torch.from_numpy(np.stack(views)))))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f}  {(time.perf_counter() - t0) / step:.2f} s/step", flush=True)
        if step % args.every == 0:
            score(step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
