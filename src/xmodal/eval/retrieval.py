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

:func:`psb_statistics` gives the five statistics of the 3D-retrieval literature
exactly as the Princeton Shape Benchmark's ``psbTable`` tool defines them
(micro-averaged over queries; C = the query's class size, the query included):

* NN: the nearest gallery item is of the query's class;
* FT (first tier): same-class items among the first C-1, divided by C-1;
* ST (second tier): same-class items among the first min(2(C-1), n-1), divided by C-1;
* E: 2 / (1/P + 1/R) with P = hits / k and R = hits / (C-1) among the first
  k = min(32, n-1) items; 0 without a hit;
* DCG: sum over gallery ranks i (1-based) of rel_i * w_i with w_1 = 1 and
  w_i = 1 / log2(i) for i >= 2, divided by its ideal value (the C-1 same-class
  items ranked first).

Objects of classes with fewer than 3 objects, and of the benchmark's
miscellaneous class (:data:`PSB_SKIP_CLASSES`), are not queries; they stay in
every gallery.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from xmodal.data.psb import MISC_CLASS
from xmodal.errors import DataError
from xmodal.eval.context import NO_IMAGES, TEST
from xmodal.eval.descriptors import D2_BINS, d2_descriptor
from xmodal.eval.features import pool_views

__all__ = [
    "DEFAULT_KS",
    "PSB_STATS",
    "PSB_SKIP_CLASSES",
    "pairwise_sq_distances",
    "rank_gallery",
    "rank_gallery_rows",
    "query_chunk",
    "retrieval_metrics",
    "psb_query_mask",
    "psb_statistics",
    "D2_PREFIX",
    "retrieval_scores",
    "retrieval_task",
    "split_d2",
]

DEFAULT_KS = (1, 5, 10, 20, 50)
#: clouds read at once for the D2 reference (:func:`split_d2`)
D2_SPLIT_BLOCK = 512
#: gallery entries (queries x gallery size) ranked at once when ``chunk`` is None: the ranking
#: holds ~6 arrays of this many 8-byte values (distances, order, hits, ...), ~100 MB in all,
#: whatever the number of objects
RANK_VALUES = 1 << 21
#: metric-key prefix of the non-learned D2 reference (not a network: never under baseline.random.)
D2_PREFIX = "reference.d2."
#: keys of :func:`psb_statistics`, in psbTable's column order
PSB_STATS = ("nn", "ft", "st", "e", "dcg")
#: class names never used as queries by default: the PSB's miscellaneous class ("-1",
#: as in the benchmark's coarse2 classification and its psbTable tool)
PSB_SKIP_CLASSES = (MISC_CLASS,)


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


def query_chunk(n: int, chunk: Optional[int] = None) -> int:
    """Queries ranked at once among ``n`` objects: ``chunk``, or when None as many as keep
    the ranked entries near :data:`RANK_VALUES` (at least 1), so that memory stays bounded
    as ``n`` grows."""
    if chunk is not None:
        if int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return int(chunk)
    return max(1, RANK_VALUES // max(int(n), 1))


def retrieval_metrics(feats, labels, *, ks: Sequence[int] = DEFAULT_KS, chunk: Optional[int] = None) -> dict:
    """Top-K accuracy and mAP of leave-one-out retrieval.

    feats: (n, D) global features; labels: (n,) class ids; chunk: queries ranked at once
    (memory O(chunk * n); None: :func:`query_chunk`, bounded whatever ``n``).
    Returns ``{"top<K>": float for K in ks, "map": float}`` (fractions in [0, 1]).
    """
    f64, labels = _check_features(feats, labels)
    n = f64.shape[0]
    g = n - 1
    chunk = query_chunk(n, chunk)
    first = np.empty(n, dtype=np.int64)  # rank (0-based) of the first same-class item; g if none
    ap = np.full(n, np.nan)
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


def _check_features(feats, labels) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if feats.ndim != 2 or feats.shape[0] != labels.shape[0]:
        raise ValueError(f"features {feats.shape} and labels {labels.shape} do not match")
    if not np.isfinite(feats).all():
        raise DataError("features contain NaN or infinity", hint="the run's weights may be out of range (features overflowed)")
    if feats.shape[0] < 2:
        raise ValueError(f"retrieval needs at least 2 objects, got {feats.shape[0]}")
    return feats, labels


def psb_query_mask(
    labels, *, class_names: Optional[Sequence[str]] = None, skip_classes: Iterable[str] = PSB_SKIP_CLASSES,
    min_class_size: int = 3,
) -> np.ndarray:
    """Which objects are queries of :func:`psb_statistics`: ``(n,)`` bool.

    labels: (n,) class ids. An object is a query when its class has at least
    ``min_class_size`` objects and its class name is not in ``skip_classes``; the
    name of label ``l`` is ``class_names[l]`` (``str(l)`` when ``class_names`` is None).
    """
    labels = np.asarray(labels).reshape(-1)
    uniq, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if class_names is not None and uniq.size and not (0 <= uniq.min() and uniq.max() < len(class_names)):
        raise ValueError(f"labels range over [{uniq.min()}, {uniq.max()}] but there are {len(class_names)} class names")
    names = [str(class_names[u]) if class_names is not None else str(u) for u in uniq]
    skip = set(skip_classes)
    keep = np.array([name not in skip for name in names], dtype=bool) & (counts >= min_class_size)
    return keep[inverse.reshape(-1)]


def psb_statistics(
    feats,
    labels,
    *,
    class_names: Optional[Sequence[str]] = None,
    skip_classes: Iterable[str] = PSB_SKIP_CLASSES,
    min_class_size: int = 3,
    e_top: int = 32,
    chunk: Optional[int] = None,
) -> dict:
    """NN, first tier, second tier, E-measure and DCG of leave-one-out retrieval (module doc).

    Args:
        feats: (n, D) global features, ranked by Euclidean distance (ties by index).
        labels: (n,) class ids.
        class_names: name of each class id, for ``skip_classes``.
        skip_classes: class names whose objects are not queries (default: PSB's "-1").
        min_class_size: smallest class whose objects are queries (psbTable: 3).
        e_top: the E-measure's cut-off (psbTable: 32).
        chunk: queries ranked at once (memory O(chunk * n); None: :func:`query_chunk`).

    Returns:
        ``{"nn", "ft", "st", "e", "dcg"}``: fractions in [0, 1], averaged over the queries
        (NaN when no object is a query).
    """
    feats, labels = _check_features(feats, labels)
    if int(min_class_size) < 2 or int(e_top) < 1:
        raise ValueError(f"min_class_size must be >= 2 and e_top >= 1, got {min_class_size} and {e_top}")
    n = feats.shape[0]
    g = n - 1
    chunk = query_chunk(n, chunk)
    is_query = psb_query_mask(labels, class_names=class_names, skip_classes=skip_classes, min_class_size=min_class_size)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    size = counts[inverse.reshape(-1)]  # class size of each object, itself included
    weight = np.ones(g)
    weight[1:] = 1.0 / np.log2(np.arange(2, g + 1))  # gallery rank i (1-based): 1 for i = 1, 1 / log2(i) after
    ideal = np.cumsum(weight)  # ideal[c - 1]: DCG of c relevant items ranked first
    k_e = min(int(e_top), g)
    sums = dict.fromkeys(PSB_STATS, 0.0)
    for s in range(0, n, chunk):
        rows = np.arange(s, min(s + chunk, n))[is_query[s : s + chunk]]
        if rows.size == 0:
            continue
        order = rank_gallery_rows(feats, s, min(s + chunk, n))[rows - s]
        rel = labels[order] == labels[rows, None]  # (q, g)
        hits = np.cumsum(rel, axis=1)
        c1 = size[rows] - 1  # relevant items in each gallery, >= 1
        at = np.arange(rows.size)
        sums["nn"] += rel[:, 0].sum()
        sums["ft"] += (hits[at, c1 - 1] / c1).sum()
        sums["st"] += (hits[at, np.minimum(2 * c1, g) - 1] / c1).sum()
        sums["e"] += (2.0 * hits[:, k_e - 1] / (k_e + c1)).sum()  # = 2 / (1/P + 1/R), 0 without a hit
        sums["dcg"] += ((rel @ weight) / ideal[c1 - 1]).sum()
    n_queries = int(is_query.sum())
    return {k: float(v / n_queries) if n_queries else float("nan") for k, v in sums.items()}


def split_d2(split, *, seed: int = 0, block: int = D2_SPLIT_BLOCK) -> np.ndarray:
    """:func:`~xmodal.eval.descriptors.d2_descriptor` of every cloud of ``split`` (a
    :class:`~xmodal.data.store.SplitView`): ``(n, bins)``, its clouds read ``block`` objects at a
    time (a cloud's descriptor does not depend on the others, so the result is that of the
    whole split at once)."""
    n = split.n
    parts = [d2_descriptor(split.points_range(s, min(s + block, n)), seed=seed) for s in range(0, n, block)]
    return np.concatenate(parts) if parts else np.zeros((0, D2_BINS))


def retrieval_scores(feats: np.ndarray, y: np.ndarray, ks: Sequence[int], class_names: Sequence[str]) -> dict:
    """Top-K, mAP and the PSB statistics of one feature set: ``{name: value}``."""
    return {**retrieval_metrics(feats, y, ks=ks), **psb_statistics(feats, y, class_names=class_names)}


def retrieval_task(ctx) -> None:
    """The ``retrieval`` task (Table 3) on one network: :func:`retrieval_scores` of the test
    split's 3D features and of its 2D features for each view count of ``ctx.views`` (top-K for
    ``cfg.retrieval.ks``); once, beside the run's keys, the D2 reference (``reference.d2.``)."""
    y = ctx.test_labels()
    if y.shape[0] < 2:
        ctx.skip("retrieval", "the test split has fewer than 2 objects")
        return
    ks = tuple(int(k) for k in ctx.cfg.retrieval.ks)
    names = ctx.store.classes
    for k, v in retrieval_scores(ctx.cache.points(TEST), y, ks, names).items():
        ctx.put(f"retrieval3d.{k}", v)
    if not ctx.is_baseline:  # the reference does not depend on the network
        d2 = split_d2(ctx.store.split(TEST), seed=ctx.seed)
        for k, v in retrieval_scores(d2, y, ks, names).items():
            ctx.put(f"{D2_PREFIX}retrieval3d.{k}", v)
    if not ctx.has_images:
        ctx.skip("retrieval2d", NO_IMAGES)
        return
    feats = ctx.cache.views(TEST, max(ctx.views))
    for v in ctx.views:
        for k, val in retrieval_scores(pool_views(feats, v), y, ks, names).items():
            ctx.put(f"retrieval2d.{v}.{k}", val)
