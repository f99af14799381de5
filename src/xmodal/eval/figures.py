"""Figures of the evaluation: t-SNE of features (paper Fig. 3) and training curves.

Drawn with matplotlib's object API on the Agg canvas (no pyplot global state,
no display needed) and written atomically.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from xmodal.eval.context import NO_IMAGES, TEST
from xmodal.eval.features import effective_views, pool_views
from xmodal.utils.io import atomic_path, read_jsonl

__all__ = [
    "top_classes", "tsne_embed", "tsne_figure", "smooth", "training_curves_figure", "CURVE_KEYS", "TSNE_VIEWS",
    "validation_curve_figure", "VALIDATION_PANELS", "tsne_task",
]

log = logging.getLogger(__name__)

#: the metrics.jsonl fields drawn by :func:`training_curves_figure`
CURVE_KEYS = ("loss", "triplet", "cross", "cm_acc")
#: Fig. 3 view counts (capped at the dataset's V, deduplicated)
TSNE_VIEWS = (1, 4, 8, 80)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=path.suffix or ".png") as tmp:
        fig.savefig(tmp, format=(path.suffix.lstrip(".") or "png"), bbox_inches="tight")
    return path


def top_classes(labels, k: int = 10) -> np.ndarray:
    """The ``k`` most frequent class ids of ``labels`` (ties: smaller id first), sorted."""
    classes, counts = np.unique(np.asarray(labels).reshape(-1), return_counts=True)
    order = np.lexsort((classes, -counts))
    return np.sort(classes[order[:k]])


def tsne_embed(feats, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE embedding (sklearn) of features ``(n, D)`` -> ``(n, 2)``.

    The perplexity is lowered to ``(n - 1) / 3`` on small inputs (t-SNE needs
    perplexity < n).
    """
    from sklearn.manifold import TSNE

    feats = np.asarray(feats, dtype=np.float64)
    n = feats.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {n}")
    perp = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    # Barnes-Hut pays a fixed per-iteration overhead that dominates on tiny inputs; the
    # exact O(n^2) gradient is faster there and gives the same kind of embedding
    method = "exact" if n <= 200 else "barnes_hut"
    tsne = TSNE(
        n_components=2, perplexity=perp, init="pca", learning_rate="auto", method=method, random_state=seed
    )
    return tsne.fit_transform(feats)


def tsne_figure(
    panels: Sequence[tuple[str, np.ndarray]],
    labels,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    top: int = 10,
    seed: int = 0,
    title: Optional[str] = None,
) -> Path:
    """One PNG with a t-SNE subplot per ``(title, feats (n, D))`` panel, like Fig. 3.

    Only objects of the ``top`` largest classes of ``labels`` (n,) are drawn,
    one colour per class, with a shared legend. Returns the written path.
    """
    labels = np.asarray(labels).reshape(-1)
    if not panels:
        raise ValueError("no t-SNE panels to draw")
    keep_classes = top_classes(labels, top)
    mask = np.isin(labels, keep_classes)
    lab = labels[mask]
    ncol = len(panels)
    fig = _figure(3.2 * ncol, 3.6)
    cmap = _colours(len(keep_classes))
    handles = []
    for j, (name, feats) in enumerate(panels):
        feats = np.asarray(feats)
        if feats.shape[0] != labels.shape[0]:
            raise ValueError(f"panel '{name}': {feats.shape[0]} features for {labels.shape[0]} labels")
        emb = tsne_embed(feats[mask], seed=seed)
        ax = fig.add_subplot(1, ncol, j + 1)
        for c_i, c in enumerate(keep_classes):
            sel = lab == c
            h = ax.scatter(emb[sel, 0], emb[sel, 1], s=6, color=cmap[c_i], label=str(class_names[int(c)]))
            if j == 0:
                handles.append(h)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(bottom=0.16, top=0.84, wspace=0.05)
    fig.legend(
        handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 5),
        fontsize=8, markerscale=2, frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _colours(k: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


#: values of a training log beyond this magnitude are left out of its curves: no loss, step or
#: time is that large unless the line is damaged, and matplotlib cannot lay ticks out on such ranges
MAX_CURVE_VALUE = 1e30


def _is_number(x) -> bool:
    """An int or float (not a bool) of at most :data:`MAX_CURVE_VALUE` in magnitude: what a curve can draw."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and abs(x) <= MAX_CURVE_VALUE


def _step_records(metrics_jsonl: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` with a numeric ``step`` (a damaged line has none)."""
    return [r for r in read_jsonl(metrics_jsonl) if _is_number(r.get("step"))]


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points, NaN-aware: (n,) -> (n,)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or v.size == 0:
        return v.copy()
    ok = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    cnt = ccount[idx] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (csum[idx] - csum[lo]) / np.maximum(cnt, 1), np.nan)


def training_curves_figure(
    metrics_jsonl: str | os.PathLike,
    path: str | os.PathLike,
    *,
    keys: Sequence[str] = CURVE_KEYS,
    window: Optional[int] = None,
) -> Optional[Path]:
    """Training curves (``keys`` vs ``step``) of a run's ``metrics.jsonl`` as one PNG.

    Raw values are drawn faintly, a moving average (``window`` records, default
    about 2% of the records, at least 1) on top. Returns None (and logs) when
    the file has no record with a ``step`` and one of ``keys``.
    """
    metrics_jsonl = Path(metrics_jsonl)
    records = _step_records(metrics_jsonl)
    present = [k for k in keys if any(_is_number(r.get(k)) for r in records)]
    if not records or not present:
        log.warning("%s: no training records with %s; no curves drawn", metrics_jsonl, list(keys))
        return None
    if window is None:
        window = max(1, len(records) // 50)
    ncol = len(present)
    fig = _figure(3.2 * ncol, 2.8)
    for j, k in enumerate(present):
        rs = [r for r in records if _is_number(r.get(k))]
        steps = np.asarray([r["step"] for r in rs], dtype=np.float64)
        vals = np.asarray([r[k] for r in rs], dtype=np.float64)
        ax = fig.add_subplot(1, ncol, j + 1)
        ax.plot(steps, vals, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(vals, window), color="tab:blue", linewidth=1.5)
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if k != "cm_acc" and np.isfinite(vals).all() and (vals > 0).all() and vals.max() / vals.min() > 100:
            ax.set_yscale("log")
    fig.tight_layout()
    return _save(fig, path)


#: the validation metrics drawn by :func:`validation_curve_figure`, in panel order
VALIDATION_PANELS = (
    ("linear SVM accuracy (cross-validated)", ("val.svm3d", "val.svm2d")),
    ("retrieval top-1", ("val.retrieval3d.top1", "val.retrieval2d.top1")),
    ("retrieval mAP", ("val.retrieval3d.map", "val.retrieval2d.map")),
)


def validation_curve_figure(metrics_jsonl: str | os.PathLike, path: str | os.PathLike) -> Optional[Path]:
    """The learning curve of a run pre-trained with ``val.every`` > 0, as one PNG.

    Top row: each validation metric (points: solid, images: dashed) against the training step;
    bottom row: the same against training minutes (the records' ``time``, validation excluded).
    A run with weight averaging (``optim.average_from``) adds its averaged networks' ``val.averaged.*``
    figures in the same colours, lighter, with crosses.
    The value at step 0 is the random initialisation, drawn as a dotted horizontal line.
    Returns None (and logs) when the log has no validation record.
    """
    metrics_jsonl = Path(metrics_jsonl)
    records = sorted((r for r in _step_records(metrics_jsonl) if any(k.startswith("val.") for k in r)),
                     key=lambda r: r["step"])
    if not records:
        log.info("%s: no validation records (pre-train with val.every > 0 for a learning curve)", metrics_jsonl)
        return None
    fig = _figure(4.0 * len(VALIDATION_PANELS), 6.0)

    def series(key: str, xkey: str, scale: float):
        rs = [r for r in records if _is_number(r.get(key))]
        x = np.asarray([r[xkey] if _is_number(r.get(xkey)) else 0.0 for r in rs], dtype=np.float64) / scale
        return rs, x, np.asarray([r[key] for r in rs], dtype=np.float64)

    for col, (title, keys) in enumerate(VALIDATION_PANELS):
        for row, (xkey, xlabel, scale) in enumerate((("step", "step", 1.0), ("time", "training minutes", 60.0))):
            ax = fig.add_subplot(2, len(VALIDATION_PANELS), row * len(VALIDATION_PANELS) + col + 1)
            for key, style, label in zip(keys, ("-", "--"), ("points (Fp)", "images (Fimg)")):
                rs, x, y = series(key, xkey, scale)
                if not rs:
                    continue
                line = ax.plot(x, y, style, marker="o", markersize=3, label=label)[0]
                if rs[0]["step"] == 0:
                    ax.axhline(y[0], color=line.get_color(), linestyle=":", linewidth=0.8)
                # optim.average_from: the averaged networks' figures beside the trained ones
                ra, xa, ya = series(key.replace("val.", "val.averaged.", 1), xkey, scale)
                if ra:
                    ax.plot(xa, ya, style, marker="x", markersize=5, color=line.get_color(), alpha=0.6,
                            label=f"{label}, averaged weights")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8, title="dotted: random init", title_fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def tsne_task(ctx) -> None:
    """The ``tsne`` task (Fig. 3) on one network: a t-SNE panel of the test split's 2D features
    for each view count of :data:`TSNE_VIEWS` and one of its 3D features, drawn to
    ``tsne.png`` (``tsne_random_init.png`` for the baseline)."""
    y = ctx.test_labels()
    if y.shape[0] < 3:
        ctx.skip("tsne", "the test split has fewer than 3 objects")
        return
    panels = []
    if ctx.has_images:
        tv = effective_views(TSNE_VIEWS, ctx.cache.num_views)
        feats = ctx.cache.views(TEST, max(max(tv), max(ctx.views)))
        panels += [(f"images, v = {v}", pool_views(feats, v)) for v in tv]
    else:
        ctx.skip("tsne2d", NO_IMAGES)
    panels.append(("point clouds", ctx.cache.points(TEST)))
    suffix = " (random init)" if ctx.is_baseline else ""
    name = "tsne_random_init.png" if ctx.is_baseline else "tsne.png"
    title = "t-SNE of test features" + suffix
    path = tsne_figure(panels, y, ctx.store.classes, ctx.out / name, seed=ctx.seed, title=title)
    ctx.add_figure("Fig. 3 — t-SNE of features" + suffix, path)
