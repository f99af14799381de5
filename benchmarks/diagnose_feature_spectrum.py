"""Diagnose: how spread out are a run's point features? (docs/EXPERIMENTS.md, issue #11)

For the point encoders of runs trained with the validation curve on (``val.every`` > 0), and for the
first run's networks at random initialisation, on the first run's validation objects plus a seeded
sample of its training objects (never a test split), this prints:

* the effective rank (``exp`` of the entropy of the normalised eigenvalues of the covariance) of
  the 512-d global features, raw and standardised per channel (as the linear SVM sees them);
* the share of the variance in the first and the first ten principal directions, and how many
  directions hold 90 % of it;
* the ratio of between-class to within-class variance of the standardised features (a crude
  linear separability);
* the mean squared correlation between different channels (:func:`xmodal.losses.channel_decorrelation`)
  of Fp's per-point features before its max-pool, over ``--clouds`` clouds, and of the global
  features over the same clouds: what ``loss.point_decorrelation`` lowers.

Each cloud is a seeded random subset of the run's number of points, as the evaluation takes it.

Usage::

    python benchmarks/diagnose_feature_spectrum.py --data mn40 runs/ref-s0 runs/dec-s0 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from xmodal.api import load_run
from xmodal.data.datasets import open_dataset
from xmodal.eval.features import point_features
from xmodal.losses import channel_decorrelation
from xmodal.train.validation import holdout_split


def effective_rank(eigenvalues: np.ndarray) -> float:
    """``exp(H(p))`` with ``p`` the non-negative eigenvalues normalised to sum 1 (Roy & Vetterli 2007)."""
    ev = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    p = ev / ev.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def spectrum_figures(f: np.ndarray, labels: np.ndarray) -> dict:
    """Effective ranks, variance shares and the between/within-class ratio of features ``f`` (n, D)."""
    f = np.asarray(f, dtype=np.float64)
    sd = f.std(axis=0)
    ev = np.linalg.eigvalsh(np.cov(f.T))[::-1].clip(0)
    z = (f - f.mean(axis=0)) / np.where(sd < 1e-12, 1.0, sd)
    evz = np.linalg.eigvalsh(np.cov(z.T))[::-1].clip(0)
    classes = np.unique(labels)
    means = np.stack([z[labels == c].mean(axis=0) for c in classes])
    within = np.mean([z[labels == c].var(axis=0).mean() for c in classes])
    share = ev / ev.sum()
    return {
        "erank": effective_rank(ev), "erank_std": effective_rank(evz), "first": float(share[0]),
        "top10": float(share[:10].sum()), "dims90": int(np.searchsorted(np.cumsum(share), 0.9)) + 1,
        "between_within": float(means.var(axis=0).mean() / within), "dead": int((sd < 1e-12).sum()),
    }


def correlation_figures(point_encoder, clouds: torch.Tensor) -> tuple[float, float]:
    """Mean squared channel correlation of Fp's per-point features and of its global features."""
    with torch.no_grad():
        out = point_encoder.eval().forward_features(clouds)
    per_point = out["point"].transpose(1, 2).reshape(-1, out["point"].shape[1])
    return channel_decorrelation(per_point).item(), channel_decorrelation(out["global"]).item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders trained with the validation curve on")
    ap.add_argument("--data", required=True, help="the store the runs trained on")
    ap.add_argument("--train-sample", type=int, default=2000, help="training objects added to the validation ones")
    ap.add_argument("--clouds", type=int, default=64, help="clouds for the correlation figures")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    first = load_run(args.runs[0])
    if not first.config.val.enabled:
        raise SystemExit(f"{args.runs[0]} trained without the validation curve: no object was held out")
    split = open_dataset(args.data).split("train")
    labels = split.labels
    train_idx, val_idx = holdout_split(labels, first.config.val.fraction, seed=first.config.seed)
    rng = np.random.default_rng(args.seed)
    rows = np.sort(np.concatenate([val_idx, rng.choice(train_idx, min(args.train_sample, len(train_idx)),
                                                        replace=False)]))
    n_points = first.num_points
    pick = np.sort(rng.choice(rows, min(args.clouds, len(rows)), replace=False))
    clouds = torch.from_numpy(np.stack([split.points(int(i))[rng.permutation(split.points(int(i)).shape[0])[:n_points]]
                                        for i in pick])).float()
    print(f"{len(rows)} objects ({len(val_idx)} validation + training sample), {n_points} points; "
          f"correlations over {len(pick)} clouds")
    encoders = [(r, load_run(r)) for r in args.runs]
    encoders.append(("random init (first run's networks)", first.at_random_init(first.config.seed)))
    for name, run in encoders:
        t0 = time.perf_counter()
        f = point_features(run, split, batch_size=64, num_points=n_points, seed=0)[rows]
        s = spectrum_figures(f, labels[rows])
        per_point, glob = correlation_figures(run.point_encoder, clouds)
        print(f"{name}: effective rank {s['erank']:.1f} (standardised {s['erank_std']:.1f}), variance in the "
              f"first direction {s['first']:.3f}, first ten {s['top10']:.3f}, 90 % in {s['dims90']} directions, "
              f"between/within-class {s['between_within']:.3f}, dead channels {s['dead']}; channel correlation "
              f"(mean square) per point {per_point:.4f}, global {glob:.4f}  [{time.perf_counter() - t0:.0f} s]",
              flush=True)


if __name__ == "__main__":
    main()
