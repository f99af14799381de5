"""Pretext-task metrics (paper Table 1).

Sec. 4.1: "we randomly select 2D-2D and 2D-3D testing pairs from the test
split [...]. The amount of two types of pairs is ten times the test split
including half positive pairs and half negative pairs."

* **cross-modality accuracy** — 2D-3D pairs (one view of object ``a``, the
  point cloud of object ``b``); positive when ``a == b``. The pair classifier
  Ff predicts "same object" when its logit for class 1 is the larger; the
  accuracy over all pairs is reported (and over positives / negatives alone).
* **cross-view distances** — 2D-2D pairs of Fimg features; positive: two
  *different* views of one object, negative: one view each of two different
  objects. Mean and standard deviation of the Euclidean distance of each kind
  ("mPD" in the paper).

Views are drawn from each object's cached random view pool (the ``(n, P, D)``
features of :class:`xmodal.eval.features.FeatureCache`): the pool is a
uniformly random subset of the stored views, so a view drawn uniformly from it
is a uniformly random stored view, and features are not recomputed per pair.
The pair lists are seeded (``numpy.random.default_rng((seed, kind))``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from xmodal.eval.context import TEST
from xmodal.utils.device import module_device

__all__ = [
    "PAIR_FACTOR",
    "sample_pairs",
    "pair_logits",
    "cross_modal_accuracy",
    "pair_distance_stats",
    "pretext_metrics",
    "pretext_task",
]

#: pairs per test object, for each kind of pair (paper: "ten times the test split")
PAIR_FACTOR = 10


def sample_pairs(n: int, num_pairs: int, *, seed: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded object pairs, half positive and half negative.

    Returns ``(a (P,), b (P,), positive (P,) bool)`` with ``P = num_pairs``: the
    first ``P // 2`` pairs are positive (``a == b``, uniformly random objects),
    the rest negative (``a != b``, uniformly random among ordered pairs of
    distinct objects). ``seed``: anything ``numpy.random.default_rng`` accepts.
    """
    if n < 2:
        raise ValueError(f"pairs need at least 2 objects (negatives are pairs of different objects), got {n}")
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
    rng = np.random.default_rng(seed)
    n_pos = num_pairs // 2
    n_neg = num_pairs - n_pos
    pos = rng.integers(0, n, size=n_pos)
    neg_a = rng.integers(0, n, size=n_neg)
    neg_b = (neg_a + rng.integers(1, n, size=n_neg)) % n  # never equal to neg_a
    a = np.concatenate([pos, neg_a]).astype(np.int64)
    b = np.concatenate([pos, neg_b]).astype(np.int64)
    positive = np.zeros(num_pairs, dtype=bool)
    positive[:n_pos] = True
    return a, b, positive


def pair_logits(pair_classifier, img_feats, pts_feats, *, batch_size: int = 4096, device: Any = None) -> np.ndarray:
    """Logits of Ff on feature pairs: img_feats (P, D), pts_feats (P, D) -> (P, 2) float32."""
    import torch

    img_feats = np.asarray(img_feats, dtype=np.float32)
    pts_feats = np.asarray(pts_feats, dtype=np.float32)
    if img_feats.shape[0] != pts_feats.shape[0]:
        raise ValueError(f"{img_feats.shape[0]} image features but {pts_feats.shape[0]} point features")
    if device is None:
        device = module_device(pair_classifier)
    out = []
    with torch.no_grad():
        for s in range(0, img_feats.shape[0], batch_size):
            fi = torch.from_numpy(img_feats[s : s + batch_size]).to(device)
            fp = torch.from_numpy(pts_feats[s : s + batch_size]).to(device)
            out.append(pair_classifier(fi, fp).float().cpu().numpy())
    if not out:
        return np.zeros((0, 2), dtype=np.float32)
    return np.concatenate(out)


def cross_modal_accuracy(logits, positive) -> dict:
    """Accuracy of "same object" predictions: logits (P, 2), positive (P,) bool.

    Returns ``{"accuracy", "accuracy_pos", "accuracy_neg"}`` (fractions; the
    last two are NaN when there are no pairs of that kind).
    """
    logits = np.asarray(logits)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    if logits.ndim != 2 or logits.shape[1] != 2 or logits.shape[0] != positive.shape[0]:
        raise ValueError(f"logits must be (P, 2) with P = {positive.shape[0]}, got {logits.shape}")
    pred = logits[:, 1] > logits[:, 0]
    correct = pred == positive

    def _mean(x):
        return float(x.mean()) if x.size else float("nan")

    return {"accuracy": _mean(correct), "accuracy_pos": _mean(correct[positive]), "accuracy_neg": _mean(correct[~positive])}


def pair_distance_stats(fa, fb, positive) -> dict:
    """Euclidean distance statistics of feature pairs fa (P, D), fb (P, D).

    Returns ``{"pos_mean", "pos_std", "neg_mean", "neg_std"}`` (population std).
    """
    fa = np.asarray(fa, dtype=np.float64)
    fb = np.asarray(fb, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    if fa.shape != fb.shape or fa.shape[0] != positive.shape[0]:
        raise ValueError(f"pair features {fa.shape} / {fb.shape} do not match {positive.shape[0]} pairs")
    d = np.linalg.norm(fa - fb, axis=1)

    def _stats(x):
        return (float(x.mean()), float(x.std())) if x.size else (float("nan"), float("nan"))

    pm, ps = _stats(d[positive])
    nm, ns = _stats(d[~positive])
    return {"pos_mean": pm, "pos_std": ps, "neg_mean": nm, "neg_std": ns}


def pretext_metrics(
    pair_classifier,
    view_feats,
    point_feats,
    *,
    seed: int = 0,
    pair_factor: int = PAIR_FACTOR,
    num_pairs: Optional[int] = None,
    device: Any = None,
) -> dict:
    """Table 1 metrics from test-split features.

    pair_classifier: Ff (``forward(f_img (B, D), f_pts (B, D)) -> (B, 2)``);
    view_feats: (n, P, D) Fimg features of P random views per object;
    point_feats: (n, D) Fp features. ``num_pairs`` (default ``pair_factor * n``)
    pairs of each kind are drawn. Cross-view metrics need ``P >= 2`` and are
    NaN otherwise. Returns ``cm_accuracy``, ``cm_accuracy_pos``,
    ``cm_accuracy_neg``, ``cv_pos_mean``, ``cv_pos_std``, ``cv_neg_mean``,
    ``cv_neg_std``, ``num_pairs``, ``view_pool``.
    """
    view_feats = np.asarray(view_feats)
    point_feats = np.asarray(point_feats)
    if view_feats.ndim != 3:
        raise ValueError(f"view features must be (n, P, D), got {view_feats.shape}")
    n, pool, _ = view_feats.shape
    if point_feats.shape[0] != n:
        raise ValueError(f"{n} objects with view features but {point_feats.shape[0]} with point features")
    p = int(num_pairs) if num_pairs is not None else int(pair_factor) * n

    # 2D-3D pairs: one random view of a, point cloud of b
    a, b, pos = sample_pairs(n, p, seed=(seed, 0))
    rng = np.random.default_rng((seed, 1))
    va = rng.integers(0, pool, size=p)
    logits = pair_logits(pair_classifier, view_feats[a, va], point_feats[b], device=device)
    cm = cross_modal_accuracy(logits, pos)
    out = {
        "cm_accuracy": cm["accuracy"],
        "cm_accuracy_pos": cm["accuracy_pos"],
        "cm_accuracy_neg": cm["accuracy_neg"],
        "num_pairs": p,
        "view_pool": pool,
    }

    # 2D-2D pairs: two different views of one object / one view each of two objects
    if pool >= 2:
        a, b, pos = sample_pairs(n, p, seed=(seed, 2))
        rng = np.random.default_rng((seed, 3))
        va = rng.integers(0, pool, size=p)
        vb = rng.integers(0, pool, size=p)
        # positives: a second view different from the first
        vb[pos] = (va[pos] + rng.integers(1, pool, size=int(pos.sum()))) % pool
        cv = pair_distance_stats(view_feats[a, va], view_feats[b, vb], pos)
    else:
        cv = dict.fromkeys(("pos_mean", "pos_std", "neg_mean", "neg_std"), float("nan"))
    out.update({f"cv_{k}": v for k, v in cv.items()})
    return out


def pretext_task(ctx) -> None:
    """The ``pretext`` task (Table 1) on one network: :func:`pretext_metrics` on the test split,
    views drawn from each object's pool of ``max(ctx.views)`` cached views."""
    if ctx.store.split(TEST).n < 2:
        ctx.skip("pretext", "the test split has fewer than 2 objects")
        return
    pool = max(ctx.views)
    res = pretext_metrics(
        ctx.loaded.pair_classifier,
        ctx.cache.views(TEST, pool),
        ctx.cache.points(TEST),
        seed=ctx.seed,
        device=ctx.device,
    )
    for k, v in res.items():
        ctx.put(f"pretext.{k}", v)
    if pool < 2:
        ctx.skip("pretext.cross_view", "cross-view pairs need at least 2 stored views per object")
