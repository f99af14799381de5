"""A learning curve on held-out training objects (``val.*`` settings, off by default).

:func:`holdout_split` sets aside a seeded, class-stratified fraction of the training split;
pre-training never samples those objects. Every ``val.every`` steps :class:`Validator`
embeds them with the frozen encoders (eval mode) and scores the features with the labels
that the evaluation would use, without touching the test split:

* ``val.svm3d`` – k-fold cross-validated accuracy of the linear SVM of
  :mod:`xmodal.eval.svm` (the same classifier and C grid; C chosen per fold split by
  the grid search, its best mean accuracy reported), on the point features;
* ``val.retrieval3d.{top1,top5,map}`` – leave-one-out retrieval among the held-out objects;
* ``val.svm2d`` and ``val.retrieval2d.*`` – the same for image features max-pooled over
  ``val.views`` seeded views per object.

Classes with fewer than 2 held-out objects are left out of the SVM score (cross-validation
needs two). Nothing here chooses a checkpoint or changes training.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import numpy as np
import torch

from xmodal.api import extract_image_features, extract_point_features
from xmodal.data.sources import stratified_holdout
from xmodal.eval.features import subsample_points, view_indices
from xmodal.eval.retrieval import retrieval_metrics
from xmodal.eval.svm import cv_rows, select_C
from xmodal.train.config import ValConfig

__all__ = ["holdout_split", "cv_svm_accuracy", "Validator"]

log = logging.getLogger(__name__)

#: retrieval statistics recorded on the curve
CURVE_KS = (1, 5)


def holdout_split(labels: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_indices, val_indices)`` of a seeded class-stratified holdout: (n_train,), (n_val,) int64.

    Each class with ``n >= 2`` objects gives ``round(n * fraction)`` (at least 1, at most
    ``n - 1``) to validation (:func:`xmodal.data.sources.stratified_holdout`).
    """
    is_val = stratified_holdout(np.asarray(labels), float(fraction), seed=int(seed))
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def cv_svm_accuracy(feats: np.ndarray, labels: np.ndarray, *, folds: int = 3, seed: int = 0,
                    Cs: Sequence[float] = (0.001, 0.01, 0.1)) -> Optional[float]:
    """Cross-validated linear-SVM accuracy of ``feats (n, D)`` with ``labels (n,)``; None if impossible.

    Classes with a single member are dropped; ``folds`` is reduced to the smallest remaining
    class size. C is chosen among ``Cs`` on the folds (:func:`xmodal.eval.svm.select_C`) and the
    mean accuracy of the best C is returned.
    """
    labels = np.asarray(labels)
    keep = cv_rows(labels)
    if len(np.unique(labels[keep])) < 2:
        return None
    search = select_C(feats[keep], labels[keep], Cs=Cs, folds=folds, seed=seed)
    return float(search.best_score_)


def _warn_small(labels: np.ndarray, n_split: int) -> None:
    """Warn when the held-out objects are too few per class for the curve to mean much: with one
    per class the cross-validated SVM and leave-one-out retrieval cannot be computed at all."""
    if len(labels) == 0:
        return
    per_class = np.unique(labels, return_counts=True)[1]
    share = f"{len(labels)} of the {n_split} training objects ({100 * len(labels) / max(n_split, 1):.0f} %)"
    if per_class.max() < 2:
        log.warning("the learning curve holds out %s, one per class (each class gives at least one): its SVM "
                    "cannot be cross-validated and its retrieval has no same-class match, so the curve will show "
                    "no SVM and zero retrieval; it needs classes of many more objects", share)
    elif np.median(per_class) < 5:
        log.warning("the learning curve holds out %s, a median of %d per class: its figures will move by "
                    "several points from noise alone; val.fraction or more objects per class make it steadier",
                    share, int(np.median(per_class)))


class Validator:
    """The held-out objects of a run, loaded once, and their scoring.

    Args:
        split: the training :class:`xmodal.data.store.SplitView`.
        indices: (n_val,) object indices of the held-out part.
        cfg: the ``val`` settings; num_points: points per cloud fed to Fp (a seeded subset
            of the stored ones); seed: the run's seed (views and point subsets).
    """

    def __init__(self, split, indices: np.ndarray, cfg: ValConfig, *, num_points: int, seed: int) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = split.labels[self.indices]
        _warn_small(self.labels, len(split.labels))
        pts = np.stack([np.asarray(split.points(int(i)), dtype=np.float32) for i in self.indices])
        self.points = subsample_points(pts, int(num_points), seed=self.seed)
        self.images = None
        if cfg.views > 0 and split.has_images:
            stored = int(split.images(int(self.indices[0])).shape[0])
            v = min(cfg.views, stored)
            idx = view_indices(len(self.indices), stored, v, seed=self.seed)
            self.images = np.stack([split.images(int(i), idx[r]) for r, i in enumerate(self.indices)])

    def _score(self, feats: np.ndarray, dim: str) -> dict:
        out = {}
        acc = cv_svm_accuracy(feats, self.labels, folds=self.cfg.folds, seed=self.seed, Cs=self.cfg.Cs)
        if acc is not None:
            out[f"val.svm{dim}"] = acc
        for k, v in retrieval_metrics(feats, self.labels, ks=CURVE_KS).items():
            out[f"val.retrieval{dim}.{k}"] = v
        return out

    def __call__(self, net, device: torch.device, *, image_size: int, batch_size: int = 64) -> dict:
        """Score the encoders of ``net`` (an :class:`XModalNet`); returns ``{"val.*": value, "val_seconds"}``.

        ``net`` is put in eval mode for the scoring and back in its mode after (through
        ``net.train``, so frozen BatchNorm layers stay frozen).
        """
        t0 = time.perf_counter()
        was_training = net.training
        net.eval()
        try:
            f3d = extract_point_features(net.point_encoder, self.points, batch_size=batch_size, device=device)
            out = self._score(f3d, "3d")
            if self.images is not None:
                n, v = self.images.shape[:2]
                flat = self.images.reshape((n * v,) + self.images.shape[2:])
                f2d = extract_image_features(
                    net.image_encoder, flat, batch_size=batch_size, device=device, image_size=image_size
                )
                out.update(self._score(f2d.reshape(n, v, -1).max(axis=1), "2d"))
        finally:
            net.train(was_training)
        out["val_seconds"] = round(time.perf_counter() - t0, 3)
        return out
