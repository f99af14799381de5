"""Cross-modal retrieval with the pair classifier Ff (beyond the paper).

On the test split, image -> shape: each object's image (one seeded random
view) is a query and the point clouds of the test objects are the gallery;
shape -> image swaps the roles. Gallery items are ranked by Ff's "same object"
probability ``softmax(Ff(f_img, f_pts))[:, 1]`` for every (image, cloud) pair,
so ``n`` objects cost ``n**2`` classifier evaluations (batched).

* top-K accuracy: a query scores at K when an item of its class is among its
  K best-ranked gallery items (the query's own counterpart is in the gallery);
* exact-object hit rate at 1 (``exact1``): the best-ranked item is the
  query's own counterpart.

For large test splits the query set and gallery (the same objects) are capped
at ``max_gallery`` objects by a seeded, class-stratified subsample (numbers on
a subsample are comparable across runs evaluated with the same seed and cap;
the report states the gallery size).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from xmodal.eval.context import TEST
from xmodal.utils.device import module_device

__all__ = [
    "DEFAULT_KS",
    "MAX_GALLERY",
    "pair_score_matrix",
    "select_gallery",
    "rank_retrieval",
    "crossmodal_metrics",
    "crossmodal_task",
]

DEFAULT_KS = (1, 5, 10)
#: default cap on the objects used as queries and gallery
MAX_GALLERY = 1000


def pair_score_matrix(
    pair_classifier, img_feats, pts_feats, *, batch_size: int = 65536, device: Any = None
) -> np.ndarray:
    """"Same object" probabilities of every (image, cloud) pair.

    img_feats: (n, D), pts_feats: (m, D) -> (n, m) float32 with entry ``[i, j]``
    the softmax probability of class 1 of ``Ff(img_feats[i], pts_feats[j])``.
    About ``batch_size`` pairs go through Ff at once.
    """
    import torch

    img = torch.as_tensor(np.asarray(img_feats, dtype=np.float32))
    pts = torch.as_tensor(np.asarray(pts_feats, dtype=np.float32))
    if img.ndim != 2 or pts.ndim != 2:
        raise ValueError(f"features must be (n, D) and (m, D), got {tuple(img.shape)} and {tuple(pts.shape)}")
    if device is None:
        device = module_device(pair_classifier)
    n, m = img.shape[0], pts.shape[0]
    out = np.empty((n, m), dtype=np.float32)
    rows = max(1, int(batch_size) // max(m, 1))
    pts_d = pts.to(device)
    with torch.no_grad():
        for s in range(0, n, rows):
            fi = img[s : s + rows].to(device)
            r = fi.shape[0]
            logits = pair_classifier(
                fi[:, None, :].expand(r, m, fi.shape[1]).reshape(r * m, -1),
                pts_d[None, :, :].expand(r, m, pts_d.shape[1]).reshape(r * m, -1),
            )
            out[s : s + r] = torch.softmax(logits.float(), dim=1)[:, 1].reshape(r, m).cpu().numpy()
    return out


def select_gallery(labels, max_items: Optional[int], *, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of at most ``max_items`` objects, stratified by class.

    All objects when ``max_items`` is None or not smaller than ``n``; otherwise
    each class keeps about its share (at least one object) of a seeded subsample.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    if max_items is None or n <= max_items:
        return np.arange(n)
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(labels, return_counts=True)
    idx = np.arange(n)
    if classes.size <= max_items and counts.min() >= 2 and n - max_items >= classes.size:
        keep, _ = train_test_split(idx, train_size=int(max_items), stratify=labels, random_state=seed)
    else:  # too many classes for a stratified cut: plain seeded subsample
        keep = np.random.default_rng(seed).choice(n, size=int(max_items), replace=False)
    return np.sort(np.asarray(keep, dtype=np.int64))


def rank_retrieval(scores, query_labels, gallery_labels, *, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Retrieval metrics of a score matrix (higher = better match).

    scores: (n, m); query ``i``'s own counterpart is gallery item ``i``
    (requires ``n == m`` for ``exact1``). Ties are broken by gallery index.
    Returns ``{"top<K>": float, "exact1": float}`` (fractions).
    """
    scores = np.asarray(scores)
    ql = np.asarray(query_labels).reshape(-1)
    gl = np.asarray(gallery_labels).reshape(-1)
    if scores.shape != (ql.shape[0], gl.shape[0]):
        raise ValueError(f"scores {scores.shape} do not match {ql.shape[0]} queries x {gl.shape[0]} gallery items")
    order = np.argsort(-scores, axis=1, kind="stable")
    rel = gl[order] == ql[:, None]
    first = np.where(rel.any(axis=1), rel.argmax(axis=1), gl.shape[0])
    out = {f"top{int(k)}": float(np.mean(first < int(k))) for k in ks}
    if scores.shape[0] == scores.shape[1]:
        out["exact1"] = float(np.mean(order[:, 0] == np.arange(scores.shape[0])))
    return out


def crossmodal_metrics(
    pair_classifier,
    img_feats,
    pts_feats,
    labels,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    max_gallery: Optional[int] = MAX_GALLERY,
    seed: int = 0,
    device: Any = None,
) -> dict:
    """Image -> shape and shape -> image retrieval on one split.

    img_feats: (n, D) one view per object; pts_feats: (n, D); labels: (n,).
    Returns ``{"img2shape": {...}, "shape2img": {...}, "gallery_size": int}``.
    """
    img_feats = np.asarray(img_feats)
    pts_feats = np.asarray(pts_feats)
    labels = np.asarray(labels).reshape(-1)
    if not (img_feats.shape[0] == pts_feats.shape[0] == labels.shape[0]):
        raise ValueError(
            f"need one image feature, point feature and label per object: {img_feats.shape[0]}, "
            f"{pts_feats.shape[0]}, {labels.shape[0]}"
        )
    keep = select_gallery(labels, max_gallery, seed=seed)
    s = pair_score_matrix(pair_classifier, img_feats[keep], pts_feats[keep], device=device)
    lab = labels[keep]
    return {
        "img2shape": rank_retrieval(s, lab, lab, ks=ks),
        "shape2img": rank_retrieval(s.T, lab, lab, ks=ks),
        "gallery_size": int(keep.size),
    }


def crossmodal_task(ctx) -> None:
    """The ``crossmodal`` task on one network: :func:`crossmodal_metrics` of one seeded random
    view and the point cloud of each test object (at most ``cfg.crossmodal.max_gallery``)."""
    img = ctx.cache.views(TEST, max(ctx.views))[:, 0]  # one seeded random view per object
    res = crossmodal_metrics(
        ctx.loaded.pair_classifier,
        img,
        ctx.cache.points(TEST),
        ctx.test_labels(),
        max_gallery=ctx.cfg.crossmodal.max_gallery,
        seed=ctx.seed,
        device=ctx.device,
    )
    for d in ("img2shape", "shape2img"):
        for k, v in res[d].items():
            ctx.put(f"crossmodal.{d}.{k}", v)
    ctx.put("crossmodal.gallery_size", res["gallery_size"])
