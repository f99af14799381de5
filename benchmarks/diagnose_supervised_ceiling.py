"""Diagnostic: what Fp's linear SVM reaches when the same network, from the same start, is trained
*with labels* for the same number of steps (docs/EXPERIMENTS.md, issue #11).

Issue #11 asks the `cpu` preset's self-supervised Fp for 3 SVM points over its random
initialisation. This script measures the room there is at that budget: it takes a run's point
encoder at random initialisation (the run's training seed and architecture: the weights its
pre-training started from), trains it with a linear classifier on the class labels of the run's
*training* objects (never its validation objects) for as many steps of as many clouds as the run,
and as the run's own Fp was trained (the run's optimizer, learning rate, weight decay and step schedule,
built by :func:`xmodal.train.model.build_optimizer`; the run's points per cloud, rotation about the
up axis and jitter; Fp's BatchNorm statistics frozen when the run froze them), and then scores the encoder as
``benchmarks/probe_val_svm.py`` does: a linear SVM fitted on the training objects' features, scored
on the validation objects, and leave-one-out retrieval among the validation objects. With
``--eval-every E`` the encoder is scored every E steps too.

``key=value`` overrides of the run's configuration (``xmodal pretrain``'s syntax and checks) change
what the reference is trained with, to see what limits the supervised encoder itself: the script
reads ``iterations``, ``batch_size``, ``optim.*``, ``aug.*`` and ``model.freeze_point_bn``
(``false``: ordinary BatchNorm, its statistics measured on the batches and the running ones
scored), e.g. ``optim.lr=0.02``.

The labels make this an upper reference, not a method: a self-supervised Fp that gains less than
the supervised one at the same budget leaves room a better signal could take; one that gains
about as much is at the budget's limit.

Usage::

    python benchmarks/diagnose_supervised_ceiling.py --data mn40 runs/ref-s0 --threads 1
    python benchmarks/diagnose_supervised_ceiling.py --data mn40 runs/ref-s0 optim.lr=0.02 model.freeze_point_bn=false
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from torch import nn

from probe_val_svm import PROBE_CS, score_encoder, score_line  # the sibling script (benchmarks/ is on sys.path)
from xmodal.api import load_run
from xmodal.cli import parse_args_with_overrides
from xmodal.config import apply_overrides
from xmodal.data.datasets import open_dataset
from xmodal.models.batchnorm import hold_batchnorm_stats
from xmodal.train.augment import augment_points, sample_point_params
from xmodal.train.model import build_optimizer
from xmodal.train.validation import holdout_split


def _train_mode(fp: nn.Module, frozen_bn: bool) -> None:
    fp.train()
    if frozen_bn:  # as `model.freeze_point_bn`: the statistics stay those of the start
        hold_batchnorm_stats(fp)


class _Classifier(nn.Module):
    """Fp and its linear head, with Fp where :func:`build_optimizer` looks for it."""

    def __init__(self, point_encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.point_encoder = point_encoder
        self.head = head


def _score(name: str, run, split, labels, train_idx, val_idx, points: int) -> None:
    """The probe's scoring (its default C grid and point subset), so the figures compare with its."""
    t0 = time.perf_counter()
    _, svm, ret = score_encoder(run, split, labels, train_idx, val_idx, points=points, cs=PROBE_CS)
    print(score_line(name, svm, ret, time.perf_counter() - t0), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run trained with the validation curve on (its start, split and schedule are used)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="overrides of the run's configuration for the reference's training (e.g. optim.lr=0.02)")
    ap.add_argument("--data", required=True, help="the store the run trained on")
    ap.add_argument("--eval-every", type=int, default=0, help="also score the encoder every this many steps")
    ap.add_argument("--no-random-init", action="store_true", help="do not score the start itself")
    ap.add_argument("--seed", type=int, default=0, help="seed of the batches and augmentation")
    ap.add_argument("--threads", type=int, default=None)
    args = parse_args_with_overrides(ap, argv)  # overrides may come after the options too
    if args.threads:
        torch.set_num_threads(args.threads)

    run = load_run(args.run)
    if not run.config.val.enabled:
        raise SystemExit(f"{args.run} trained without the validation curve (val.every = 0): no object was held out")
    cfg = apply_overrides(run.config, args.overrides)
    split = open_dataset(args.data).split("train")
    labels = np.asarray(split.labels)
    train_idx, val_idx = holdout_split(labels, run.config.val.fraction, seed=run.config.seed)
    frozen_bn = cfg.model.freeze_point_bn
    steps, batch = cfg.iterations, cfg.batch_size
    points = run.num_points
    start = run.at_random_init(run.config.seed)
    print(f"{len(train_idx)} training objects train and fit the SVM, {len(val_idx)} validation objects score it; "
          f"{steps} steps of {batch} clouds of {points} points, {cfg.optim.name} lr {cfg.optim.lr} (x{cfg.optim.gamma} every "
          f"{cfg.optim.step_size}), frozen BatchNorm statistics: {frozen_bn}, rotation about the up axis: {cfg.aug.rotate}",
          flush=True)
    if not args.no_random_init:
        _score("random init (the run's start)", start, split, labels, train_idx, val_idx, points)

    fp = start.point_encoder
    clouds = torch.from_numpy(np.ascontiguousarray(split.points_range(0, split.n)))  # (n, P, 3)
    target = torch.from_numpy(labels).long()
    with torch.no_grad():
        dim = int(fp(clouds[:2, :points]).shape[1])
    head = nn.Linear(dim, int(labels.max()) + 1)
    # the run's own optimizer and schedule, built as training builds them (Fp's group, optim.name)
    opt, sched = build_optimizer(cfg, _Classifier(fp, head))
    rng = np.random.default_rng(args.seed)
    _train_mode(fp, frozen_bn)
    t0, losses, correct = time.perf_counter(), [], []
    for step in range(1, steps + 1):
        idx = train_idx[rng.choice(len(train_idx), size=batch, replace=False)]
        pick = np.stack([rng.choice(clouds.shape[1], size=points, replace=False) for _ in idx])
        x = clouds[torch.from_numpy(idx)[:, None], torch.from_numpy(pick)]
        angles, noise = sample_point_params(batch, points, rotate=cfg.aug.rotate, jitter_sigma=cfg.aug.jitter_sigma,
                                            seed=rng)
        x = augment_points(x, angles, noise, up_axis=run.up_axis, sigma=cfg.aug.jitter_sigma, clip=cfg.aug.jitter_clip)
        logits = head(fp(x))
        loss = nn.functional.cross_entropy(logits, target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        correct.append(float((logits.argmax(1) == target[idx]).float().mean()))
        if step % 100 == 0:
            print(f"step {step}: cross-entropy {np.mean(losses[-100:]):.3f}, batch accuracy "
                  f"{100 * np.mean(correct[-100:]):.1f} %  [{time.perf_counter() - t0:.0f} s]", flush=True)
        if (args.eval_every and step % args.eval_every == 0) or step == steps:
            fp.eval()
            _score(f"supervised, step {step}", dataclasses.replace(start, point_encoder=fp, step=step),
                   split, labels, train_idx, val_idx, points)
            _train_mode(fp, frozen_bn)


if __name__ == "__main__":
    main()
