"""Probe: compare the point encoders of runs that share a validation split, with the SVM fitted on
the runs' *training* objects and scored on their validation objects (docs/EXPERIMENTS.md, issue #11).

The learning curve (``val.every``) scores the validation objects alone: a 3-fold cross-validated
SVM on 785 ModelNet40 objects, about 520 to fit per fold. This probe fits the linear SVM of
:mod:`xmodal.eval.svm` on the features of the ~7,000 objects the runs trained on (C chosen by
3-fold cross-validation among them) and scores it once on the validation objects, as the held-out
evaluation does with its own test split. The runs must have trained with the curve on and share
``seed`` and ``val.fraction`` (checked): the validation objects are those their curves held out,
never trained on.

Printed per run, then (unless ``--no-random-init``) for the first run's networks at random
initialisation: the validation accuracy of that SVM, its C and cross-validation score on the
training objects, and leave-one-out retrieval top-1 / mAP among the validation objects. Each cloud
is a seeded random subset of ``--points`` of its stored points (``--subsample-seed``), through
:func:`xmodal.eval.features.point_features`, as the evaluation takes it.

With ``--point-subsets 1 2`` each encoder is also scored with its features averaged over 2 point
subsets, consecutive blocks of one permutation of each stored cloud (``xmodal evaluate
--point-subsets 2``; at 512 of 1,024 points they hold every point once), and the
difference each averaging makes is printed per encoder.

With ``--fold-seeds N`` and ``--sample-seeds N`` it also measures how much the curve's SVM moves
by chance on the same features, for two ways of computing a curve point:

* the curve as built (``val.svm3d``): cross-validation on the validation objects alone
  (:func:`xmodal.train.validation.cv_svm_accuracy` with the run's ``val.folds`` and ``val.Cs``),
  once per fold assignment seed;
* an SVM fitted on a seeded class-stratified sample of ``--train-sample`` training objects (C by
  3-fold cross-validation on the sample, the run's ``val.Cs``), scored on the validation
  objects, once per sample seed: what a curve fitted on training objects would cost and give.

Each prints, per seed, every encoder's accuracy and the differences the curve is read for (each
run against random initialisation, the second run against the first).

Usage::

    python benchmarks/probe_val_svm.py --data mn40 runs/mn40-kai-4k runs/mn40-norot
    python benchmarks/probe_val_svm.py --data mn40 runs/mn40-kai-4k runs/mn40-norot --fold-seeds 5 \
        --sample-seeds 4 --train-sample 2000
    python benchmarks/probe_val_svm.py --data mn40 runs/mn40-kai-4k --point-subsets 1 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from xmodal.api import load_run
from xmodal.data.datasets import open_dataset
from xmodal.data.sources import stratified_holdout
from xmodal.eval.features import point_features
from xmodal.eval.retrieval import retrieval_metrics
from xmodal.eval.svm import linear_svm_eval
from xmodal.train.validation import cv_svm_accuracy, holdout_split


def _spread(name: str, rows: list[dict], names: list[str]) -> None:
    """Print per-seed accuracies (%) of every encoder, the differences the curve is read for, and
    the mean and range of each over the seeds."""
    diffs = {f"{n} - random init": (n, names[-1]) for n in names[:-1]}
    if len(names) > 2:
        diffs[f"{names[1]} - {names[0]}"] = (names[1], names[0])
    print(f"\n{name}")
    cols = {n: [r[n] for r in rows] for n in names}
    cols.update({d: [r[a] - r[b] for r in rows] for d, (a, b) in diffs.items()})
    for label, vals in cols.items():
        v = np.asarray(vals)
        print(f"  {label}: " + " ".join(f"{x:6.2f}" for x in v)
              + f"   mean {v.mean():6.2f}, range {v.max() - v.min():.2f}")


#: the probe's default C grid
PROBE_CS = (1e-4, 1e-3, 1e-2)


def score_encoder(run, split, labels, train_idx, val_idx, *, points: int, cs, subsets: int = 1, seed: int = 0):
    """``(features, svm, retrieval)`` of ``run``'s point encoder: the linear SVM fitted on the
    training objects' features (C by 3-fold CV among them) and scored on the validation objects,
    and leave-one-out retrieval among the validation objects."""
    f = point_features(run, split, batch_size=64, num_points=points, seed=seed, subsets=subsets)
    svm = linear_svm_eval(f[train_idx], labels[train_idx], f[val_idx], labels[val_idx], Cs=cs, folds=3)
    return f, svm, retrieval_metrics(f[val_idx], labels[val_idx], ks=(1,))


def score_line(name: str, svm: dict, ret: dict, seconds: float) -> str:
    """One printed result of :func:`score_encoder`."""
    return (f"{name}: SVM {100 * svm['accuracy']:.2f} % (C {svm['C']:g}, CV on the training objects "
            f"{100 * svm['cv_score']:.2f} %), retrieval top-1 {100 * ret['top1']:.2f} / mAP "
            f"{100 * ret['map']:.2f}  [{seconds:.0f} s]")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders trained with the validation curve on")
    ap.add_argument("--data", required=True, help="the store the runs trained on")
    ap.add_argument("--points", type=int, default=None, help="points per cloud (default: the first run's)")
    ap.add_argument("--subsample-seed", type=int, default=0)
    ap.add_argument("--point-subsets", type=int, nargs="+", default=[1],
                    help="point subsets averaged per cloud, one or more settings (the chance measurements "
                    "below use the first)")
    ap.add_argument("--cs", type=float, nargs="+", default=list(PROBE_CS), help="C grid of the SVM")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-random-init", action="store_true",
                    help="skip the first run's networks at random initialisation (their figures do not "
                         "depend on the runs' training, only on the first run's seed and architecture)")
    ap.add_argument("--fold-seeds", type=int, default=0,
                    help="score the curve's estimator (CV on the validation objects) with this many fold seeds")
    ap.add_argument("--sample-seeds", type=int, default=0,
                    help="score an SVM fitted on --train-sample training objects with this many sample seeds")
    ap.add_argument("--train-sample", type=int, default=2000, help="training objects in each sample")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = [(r, load_run(r)) for r in args.runs]
    first = runs[0][1].config
    for name, r in runs:
        if not r.config.val.enabled:
            raise SystemExit(f"{name} trained without the validation curve (val.every = 0): no object was held out")
        if (r.config.seed, r.config.val.fraction) != (first.seed, first.val.fraction):
            raise SystemExit(f"{name}: seed / val.fraction differ from {args.runs[0]}'s: not the same validation split")
    split = open_dataset(args.data).split("train")
    labels = split.labels
    train_idx, val_idx = holdout_split(labels, first.val.fraction, seed=first.seed)
    points = args.points or runs[0][1].num_points
    print(f"{len(train_idx)} training objects fit the SVM, {len(val_idx)} validation objects score it; {points} points")

    # the first run's start: its networks at random initialisation under its own training seed
    if not args.no_random_init:
        runs.append(("random init (first run's networks)", runs[0][1].at_random_init(first.seed)))
    elif args.point_subsets[1:] or args.fold_seeds or args.sample_seeds:
        raise SystemExit("--no-random-init: the point-subset and seed comparisons are read against random init")
    if min(args.point_subsets) < 1:
        raise SystemExit("--point-subsets: every setting must be >= 1")
    feats, scores = {}, {}
    for name, run in runs:
        for k in args.point_subsets:
            t0 = time.perf_counter()
            f, svm, ret = score_encoder(run, split, labels, train_idx, val_idx, points=points, cs=args.cs,
                                        subsets=k, seed=args.subsample_seed)
            if k == args.point_subsets[0]:
                feats[name] = f
            scores[name, k] = (100 * svm["accuracy"], 100 * ret["top1"])
            tag = f" [{k} point subsets]" if len(args.point_subsets) > 1 else ""
            print(score_line(f"{name}{tag}", svm, ret, time.perf_counter() - t0), flush=True)
    if len(args.point_subsets) > 1:
        k0 = args.point_subsets[0]
        print(f"\npoint subsets against {k0} (SVM / retrieval top-1 points):")
        for name, _ in runs:
            for k in args.point_subsets[1:]:
                (s0, r0), (s1, r1) = scores[name, k0], scores[name, k]
                print(f"  {name}, {k} subsets: {s1 - s0:+.2f} / {r1 - r0:+.2f}")
        base = runs[-1][0]
        for name, _ in runs[:-1]:
            for k in args.point_subsets:
                print(f"  {name} - random init at {k} subsets: SVM {scores[name, k][0] - scores[base, k][0]:+.2f}, "
                      f"top-1 {scores[name, k][1] - scores[base, k][1]:+.2f}")

    names = [name for name, _ in runs]
    val = first.val
    if args.fold_seeds > 0:
        t0 = time.perf_counter()
        rows = [{n: 100 * cv_svm_accuracy(f[val_idx], labels[val_idx], folds=val.folds, seed=s, Cs=val.Cs)
                 for n, f in feats.items()} for s in range(args.fold_seeds)]
        _spread(f"the curve's SVM ({val.folds}-fold CV on the {len(val_idx)} validation objects, C in "
                f"{list(val.Cs)}), fold seeds 0..{args.fold_seeds - 1}  [{time.perf_counter() - t0:.0f} s]",
                rows, names)
    if args.sample_seeds > 0:
        t0 = time.perf_counter()
        frac = min(args.train_sample / len(train_idx), 0.99)
        rows, sizes = [], set()
        for s in range(args.sample_seeds):
            pick = train_idx[stratified_holdout(labels[train_idx], frac, seed=1000 + s)]
            sizes.add(len(pick))
            rows.append({n: 100 * linear_svm_eval(f[pick], labels[pick], f[val_idx], labels[val_idx],
                                                  Cs=val.Cs, folds=3)["accuracy"] for n, f in feats.items()})
        _spread(f"an SVM fitted on {sorted(sizes)} sampled training objects (C in {list(val.Cs)} by 3-fold CV "
                f"on the sample), scored on the validation objects, sample seeds 0..{args.sample_seeds - 1}  "
                f"[{time.perf_counter() - t0:.0f} s]", rows, names)


if __name__ == "__main__":
    main()
