"""How Fp's weight initialisation shapes a network whose BatchNorm statistics are frozen (docs/EXPERIMENTS.md).

With ``model.freeze_point_bn`` every BatchNorm layer of Fp is the identity at initialisation,
so nothing rescales the activations between layers. For each ``model.point_init`` this script
reports, for the random-initialised Fp of a preset (default ``cpu``):

1. the mean |activation| of each EdgeConv block's output and of the global feature, on
   held-out validation clouds;
2. per convolution, the relative gradient ``|dL/dW| / |W|`` for ``L = <g, Fp(x)>`` with a fixed
   random ``g`` (Fp in training mode with frozen statistics, as in pre-training): how fast each
   layer can move under SGD;
3. the validation SVM / retrieval of the random-initialised features (the random baseline).

Usage::

    python benchmarks/diagnose_point_init.py --data mn40 [--preset cpu]
"""

from __future__ import annotations

import argparse

import torch

from xmodal.config import resolve
from xmodal.data.datasets import open_dataset
from xmodal.models.batchnorm import hold_batchnorm_stats
from xmodal.models.dgcnn import POINT_INITS
from xmodal.train.config import PretrainConfig
from xmodal.train.distributed import DistContext
from xmodal.train.model import build_training_model
from xmodal.train.validation import Validator, holdout_split


def _scales_and_gradients(fp, clouds: torch.Tensor) -> tuple[list[float], dict[str, float]]:
    hold_batchnorm_stats(fp.train())  # frozen statistics, as model.freeze_point_bn trains
    fp.zero_grad()
    feats = fp.forward_features(clouds)
    scales = [b.abs().mean().item() for b in feats["blocks"]] + [feats["global"].abs().mean().item()]
    g = torch.randn(feats["global"].shape, generator=torch.Generator().manual_seed(0))
    (feats["global"] * g).sum().backward()
    ratios = {n: (p.grad.norm() / p.norm()).item() for n, p in fp.named_parameters()
              if n.endswith("weight") and p.ndim > 1 and p.grad is not None}
    fp.zero_grad()
    fp.eval()
    return scales, ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset folder (xmodal prepare)")
    ap.add_argument("--preset", default="cpu")
    args = ap.parse_args(argv)
    split = open_dataset(args.data).split("train")
    rows = {}
    for init in POINT_INITS:
        cfg = resolve(PretrainConfig, args.preset, ["val.every=1", "val.views=0", "device=cpu",
                                                    f"model.point_init={init}"], group="pretrain")
        _, val_idx = holdout_split(split.labels, cfg.val.fraction, seed=cfg.seed)
        validator = Validator(split, val_idx, cfg.val, num_points=cfg.data.num_points, seed=cfg.seed)
        net = build_training_model(cfg, DistContext())
        scales, ratios = _scales_and_gradients(net.point_encoder, torch.from_numpy(validator.points[:16]))
        scores = validator(net.eval(), torch.device("cpu"), image_size=cfg.data.image_size)
        rows[init] = (scales, ratios, scores)
    names = list(POINT_INITS)
    print("mean |activation|" + " " * 11 + "".join(f"{n:>12s}" for n in names))
    for i, label in enumerate(["block 1", "block 2", "block 3", "block 4", "global feature"]):
        print(f"  {label:26s}" + "".join(f"{rows[n][0][i]:12.2e}" for n in names))
    print("relative gradient |dW|/|W|")
    for layer in rows[names[0]][1]:
        print(f"  {layer:26s}" + "".join(f"{rows[n][1][layer]:12.2e}" for n in names))
    for key in ("val.svm3d", "val.retrieval3d.top1"):
        print(f"{key:28s}" + "".join(f"{rows[n][2][key]:12.4f}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
