"""Why ordinary-BatchNorm pre-training starts below the random-init baseline (docs/EXPERIMENTS.md).

For the random-initialised Fp of a pre-training preset (default ``cpu-fp32``: the
default-initialised network of the figures in docs/EXPERIMENTS.md), on the held-out validation
objects of a dataset's training split (the objects ``val.fraction`` sets aside):

1. the validation SVM / retrieval with BatchNorm at its initial statistics (mean 0, variance 1:
   the identity) — how a random-init network is evaluated — and with the statistics measured on
   training clouds (the same weights; only the running statistics change);
2. per BatchNorm layer, the share of channels whose LeakyReLU input keeps one sign for at least
   90 % of the values ("near-linear" channels), in both cases.

Usage::

    python benchmarks/diagnose_batchnorm.py --data mn40 [--preset cpu-fp32] [--batches 40]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from xmodal.config import resolve
from xmodal.data.datasets import open_dataset
from xmodal.eval.features import subsample_points
from xmodal.models.dgcnn import DGCNN
from xmodal.train.config import PretrainConfig
from xmodal.train.distributed import DistContext
from xmodal.train.model import build_training_model
from xmodal.train.validation import Validator, holdout_split


def _batchnorms(module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _measure_statistics(fp, split, indices, num_points: int, batches: int, seed: int) -> None:
    """Replace Fp's running statistics by their cumulative average over ``batches`` batches of 16 clouds."""
    for _, m in _batchnorms(fp):
        m.reset_running_stats()
        m.momentum = None
    rng = np.random.default_rng(seed)
    fp.train()
    with torch.no_grad():
        for s in range(batches):
            idx = rng.choice(indices, 16, replace=False)
            pts = np.stack([split.points(int(i)) for i in idx]).astype(np.float32)
            fp(torch.from_numpy(subsample_points(pts, num_points, seed=s)))
    fp.eval()


def _near_linear(fp_weights: dict, k: int, clouds: torch.Tensor) -> dict:
    """Share of near-linear channels per BatchNorm layer (reference EdgeConv, to see its inputs)."""
    net = DGCNN(k=k, fast=False)
    net.load_state_dict(fp_weights)
    shares = {}

    def hook(name):
        def record(mod, inp, out):
            x = out.detach().transpose(0, 1).reshape(out.shape[1], -1)
            pos = (x > 0).float().mean(1)
            shares[name] = float(((pos >= 0.9) | (pos <= 0.1)).float().mean())
        return record

    for name, m in _batchnorms(net):
        m.register_forward_hook(hook(name))
    net.eval()
    with torch.no_grad():
        net(clouds)
    return shares


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset folder (xmodal prepare)")
    ap.add_argument("--preset", default="cpu-fp32")
    ap.add_argument("--batches", type=int, default=40, help="training batches of 16 clouds to measure statistics on")
    args = ap.parse_args(argv)
    cfg = resolve(PretrainConfig, args.preset, ["val.every=1", "val.views=0", "model.freeze_point_bn=false",
                                                "device=cpu"], group="pretrain")
    split = open_dataset(args.data).split("train")
    train_idx, val_idx = holdout_split(split.labels, cfg.val.fraction, seed=cfg.seed)
    net = build_training_model(cfg, DistContext())
    validator = Validator(split, val_idx, cfg.val, num_points=cfg.data.num_points, seed=cfg.seed)
    clouds = torch.from_numpy(validator.points[:64])
    results = {}
    for tag in ("identity BatchNorm", "measured statistics"):
        if tag == "measured statistics":
            _measure_statistics(net.point_encoder, split, train_idx, cfg.data.num_points, args.batches, cfg.seed)
        scores = validator(net, torch.device("cpu"), image_size=cfg.data.image_size)
        lin = _near_linear(net.point_encoder.state_dict(), cfg.model.k, clouds)
        results[tag] = (scores, lin)
    for tag, (scores, _) in results.items():
        print(f"{tag:22s} val.svm3d {scores['val.svm3d']:.4f}  val.retrieval3d.top1 {scores['val.retrieval3d.top1']:.4f}")
    print(f"{'near-linear channels':22s} " + "  ".join(results))
    for layer in results["identity BatchNorm"][1]:
        print(f"  {layer:20s} " + "  ".join(f"{lin[layer]:>18.2f}" for _, lin in results.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
