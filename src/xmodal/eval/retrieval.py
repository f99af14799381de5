"""Shape retrieval with global features (paper Table 3).

Every test object is a query; its gallery is **the other test objects** (the
query itself is excluded). Gallery items are ranked by the Euclidean distance
between global features (Sec. 4.1: "Euclidean distance over the global
features of two objects is used as a metric"); ties are broken by the gallery
index (stable sort), so results are deterministic.

* top-K accuracy: the fraction of queries with at least one object of their
  class among their K nearest gallery items (K larger than the gallery means
  the whole gallery);
* mAP (an extra): the mean over queries of the average precision of the
  ranking with "same class" as relevant; queries without any relevant gallery
  item are left out of the mean.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["DEFAULT_KS", "pairwise_sq_distances", "rank_gallery", "rank_gallery_rows", "retrieval_metrics"]

DEFAULT_KS = (1, 5, 10, 20, 50)


def pairwise_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(n, m)`` between rows of a ``(n, D)`` and b ``(m, D)`` (float64).

    Uses ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product instead of an (n, m, D)
    difference tensor), clipped at 0 against rounding.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def rank_gallery_rows(feats: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Leave-one-out gallery ranking of queries ``start..stop-1``: ``(stop-start, n-1)`` int64.

    Row ``r`` lists the objects other than query ``start + r`` sorted by
    increasing Euclidean distance to it (ties by index).
    """
    n = feats.shape[0]
    d = pairwise_sq_distances(feats[start:stop], feats)
    rows = np.arange(d.shape[0])
    d[rows, start + rows] = np.inf  # the query is not in its own gallery
    order = np.argsort(d, axis=1, kind="stable")
    return order[:, : n - 1]  # the query (at +inf) sorts last


def rank_gallery(feats: np.ndarray, *, chunk: int = 1024) -> np.ndarray:
    """Gallery ranking of every query (leave-one-out): ``(n, n-1)`` int64 indices.

    Row ``i`` lists the other objects sorted by increasing distance to object
    ``i`` (ties by index). Computed in row chunks of ``chunk`` queries.
    """
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be (n, D), got shape {feats.shape}")
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"retrieval needs at least 2 objects, got {n}")
    return np.concatenate([rank_gallery_rows(feats, s, min(s + chunk, n)) for s in range(0, n, chunk)])


def retrieval_metrics(feats, labels, *, ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024) -> dict:
    """Top-K accuracy and mAP of leave-one-out retrieval.

    feats: (n, D) global features; labels: (n,) class ids.
    Returns ``{"top<K>": float for K in ks, "map": float}`` (fractions in [0, 1]).
    """
    feats = np.asarray(feats)
    labels = np.asarray(labels).reshape(-1)
    if feats.ndim != 2 or feats.shape[0] != labels.shape[0]:
        raise ValueError(f"features {feats.shape} and labels {labels.shape} do not match")
    if not np.isfinite(feats).all():
        raise ValueError("features contain NaN or infinity")
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"retrieval needs at least 2 objects, got {n}")
    g = n - 1
    first = np.empty(n, dtype=np.int64)  # rank (0-based) of the first same-class item; g if none
    ap = np.full(n, np.nan)
    f64 = np.asarray(feats, dtype=np.float64)
    for s in range(0, n, chunk):
        # rank one chunk of queries at a time: memory O(chunk * n)
        order = rank_gallery_rows(f64, s, min(s + chunk, n))
        rel = labels[order] == labels[s : s + order.shape[0], None]
        any_rel = rel.any(axis=1)
        first[s : s + order.shape[0]] = np.where(any_rel, rel.argmax(axis=1), g)
        hits = np.cumsum(rel, axis=1)
        prec = hits / np.arange(1, g + 1)[None, :]
        n_rel = rel.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[s : s + order.shape[0]] = np.where(any_rel, (prec * rel).sum(axis=1) / n_rel, np.nan)
    out = {f"top{int(k)}": float(np.mean(first < int(k))) for k in ks}
    valid = ~np.isnan(ap)
    out["map"] = float(ap[valid].mean()) if valid.any() else float("nan")
    return out
