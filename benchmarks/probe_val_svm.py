"""Probe: compare the point encoders of runs that share a validation split, with the SVM fitted on
the runs' *training* objects and scored on their validation objects (docs/EXPERIMENTS.md, issue #11).

The learning curve (``val.every``) scores the validation objects alone: a 3-fold cross-validated
SVM on 785 ModelNet40 objects, about 520 to fit per fold. This probe fits the linear SVM of
:mod:`xmodal.eval.svm` on the features of the ~7,000 objects the runs trained on (C chosen by
3-fold cross-validation among them) and scores it once on the validation objects, as the held-out
evaluation does with its own test split. The runs must share ``seed`` and ``val.fraction``
(checked): the validation objects are those their curves held out, never trained on.

Printed per run, then for the first run's networks at random initialisation: the validation
accuracy of that SVM, its C and cross-validation score on the training objects, and leave-one-out
retrieval top-1 / mAP among the validation objects. Each cloud is a seeded random subset of
``--points`` of its stored points (``--subsample-seed``), through
:func:`xmodal.eval.features.point_features`, as the evaluation takes it.

Usage::

    python benchmarks/probe_val_svm.py --data mn40 runs/mn40-kai-4k runs/mn40-norot
"""

from __future__ import annotations

import argparse
import time

import torch

from xmodal.api import load_run
from xmodal.data.datasets import open_dataset
from xmodal.eval.features import point_features
from xmodal.eval.retrieval import retrieval_metrics
from xmodal.eval.svm import linear_svm_eval
from xmodal.train.validation import holdout_split


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders trained with the validation curve on")
    ap.add_argument("--data", required=True, help="the store the runs trained on")
    ap.add_argument("--points", type=int, default=None, help="points per cloud (default: the first run's)")
    ap.add_argument("--subsample-seed", type=int, default=0)
    ap.add_argument("--cs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2], help="C grid of the SVM")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = [(r, load_run(r)) for r in args.runs]
    first = runs[0][1].config
    for name, r in runs[1:]:
        if (r.config.seed, r.config.val.fraction) != (first.seed, first.val.fraction):
            raise SystemExit(f"{name}: seed / val.fraction differ from {args.runs[0]}'s: not the same validation split")
    if not first.val.fraction > 0:
        raise SystemExit(f"{args.runs[0]} has no validation split (val.fraction = {first.val.fraction})")
    split = open_dataset(args.data).split("train")
    labels = split.labels
    train_idx, val_idx = holdout_split(labels, first.val.fraction, seed=first.seed)
    points = args.points or runs[0][1].num_points
    print(f"{len(train_idx)} training objects fit the SVM, {len(val_idx)} validation objects score it; {points} points")

    runs.append(("random init (first run's networks)", runs[0][1].at_random_init(0)))
    for name, run in runs:
        t0 = time.perf_counter()
        f = point_features(run, split, batch_size=64, num_points=points, seed=args.subsample_seed)
        svm = linear_svm_eval(f[train_idx], labels[train_idx], f[val_idx], labels[val_idx], Cs=args.cs, folds=3)
        ret = retrieval_metrics(f[val_idx], labels[val_idx], ks=(1,))
        print(f"{name}: SVM {100 * svm['accuracy']:.2f} % (C {svm['C']:g}, CV on the training objects "
              f"{100 * svm['cv_score']:.2f} %), retrieval top-1 {100 * ret['top1']:.2f} / mAP {100 * ret['map']:.2f}"
              f"  [{time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
