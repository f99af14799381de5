"""The ``evaluate`` job: every evaluation task of a run, metrics.json, report.md, figures.

>>> from xmodal.eval.runner import evaluate
>>> metrics = evaluate("runs/mn40", "data/mn40", out="reports/mn40", baseline="random")  # doctest: +SKIP

Tasks (``tasks=`` any of them, or ``"all"``):

=============  =====================================================================
``pretext``    Table 1: cross-modality accuracy of Ff, cross-view pair distances
``svm``        Table 2: linear SVM on frozen 3D features and on v-view 2D features
``retrieval``  Table 3: leave-one-out top-K retrieval on the test split (3D and 2D), the
               PSB statistics (NN, FT, ST, E, DCG), and the D2 shape distribution as a
               non-learned 3D reference (``reference.d2.retrieval3d.*``, run only once)
``partseg``    Table 4: part segmentation via :func:`xmodal.eval.partseg.run_partseg`
``tsne``       Fig. 3: t-SNE of 2D (v = 1, 4, 8, 80) and 3D test features
``fewshot``    N-way K-shot linear evaluation (beyond the paper)
``crossmodal`` image <-> shape retrieval ranked by Ff (beyond the paper)
=============  =====================================================================

Tasks that need images (pretext, the 2D halves of svm / retrieval / fewshot /
t-SNE, crossmodal) are skipped with a recorded reason on a points-only
dataset. ``OUT/metrics.json`` holds flat dotted keys (accuracies as fractions)
plus ``meta.*``; when ``OUT/metrics.json`` already holds an evaluation of the
same run, data and seed, the new metrics are merged into it (a task evaluated
again replaces its keys), so tasks can be run one at a time into one report.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from xmodal.eval.descriptors import d2_descriptor
from xmodal.eval.features import FeatureCache, effective_views, pool_views
from xmodal.eval.retrieval import psb_statistics, retrieval_metrics
from xmodal.utils.device import default_device
from xmodal.utils.io import read_json, write_json

__all__ = ["TASKS", "DEFAULT_VIEWS", "TSNE_VIEWS", "resolve_tasks", "evaluate"]

log = logging.getLogger(__name__)

#: every task, in the order they run
TASKS = ("pretext", "svm", "retrieval", "fewshot", "crossmodal", "tsne", "partseg")
#: Table 2/3 view counts (capped at the dataset's V)
DEFAULT_VIEWS = (1, 12, 36, 80)
#: Fig. 3 view counts (capped at the dataset's V, deduplicated)
TSNE_VIEWS = (1, 4, 8, 80)

_TRAIN, _TEST = "train", "test"
#: metric-key prefix of the non-learned D2 reference (not a network: never under baseline.random.)
D2_PREFIX = "reference.d2."


def resolve_tasks(tasks: Iterable[str]) -> list[str]:
    """Expand ``"all"`` and check names; returns tasks in :data:`TASKS` order."""
    if isinstance(tasks, str):
        tasks = [tasks]
    asked = set()
    for t in tasks:
        if t == "all":
            asked.update(TASKS)
        elif t in TASKS:
            asked.add(t)
        else:
            raise ValueError(f"unknown evaluation task '{t}'; choose from {list(TASKS) + ['all']}")
    if not asked:
        raise ValueError("no evaluation task given")
    return [t for t in TASKS if t in asked]


class _Ctx:
    """What one evaluated network (the run, or its random-init baseline) needs."""

    def __init__(self, loaded, store, cache: FeatureCache, prefix: str, views: list[int], seed: int, device: str):
        self.loaded = loaded
        self.store = store
        self.cache = cache
        self.prefix = prefix
        self.views = views
        self.seed = seed
        self.device = device
        self.metrics: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}

    def put(self, key: str, value: Any) -> None:
        self.metrics[self.prefix + key] = value

    def skip(self, task: str, reason: str) -> None:
        self.skipped[task] = reason
        log.info("%sskipped %s: %s", self.prefix, task, reason)

    @property
    def has_images(self) -> bool:
        return self.cache.num_views > 0

    def test_labels(self) -> np.ndarray:
        return self.store.split(_TEST).labels


_NO_IMAGES = "the dataset has no images (points only)"


# --------------------------------------------------------------------------- tasks


def _task_pretext(ctx: _Ctx) -> None:
    from xmodal.eval.pretext import pretext_metrics

    if not ctx.has_images:
        ctx.skip("pretext", _NO_IMAGES + ": Table 1 needs rendered views")
        return
    if ctx.store.split(_TEST).n < 2:
        ctx.skip("pretext", "the test split has fewer than 2 objects")
        return
    pool = max(ctx.views)
    res = pretext_metrics(
        ctx.loaded.pair_classifier,
        ctx.cache.views(_TEST, pool),
        ctx.cache.points(_TEST),
        seed=ctx.seed,
        device=ctx.device,
    )
    for k, v in res.items():
        ctx.put(f"pretext.{k}", v)
    if pool < 2:
        ctx.skip("pretext.cross_view", "cross-view pairs need at least 2 stored views per object")


def _task_svm(ctx: _Ctx, Cs: Sequence[float]) -> None:
    from xmodal.eval.svm import linear_svm_eval

    if _TRAIN not in ctx.store.splits:
        ctx.skip("svm", f"the dataset has no '{_TRAIN}' split to fit the SVM on")
        return
    ytr, yte = ctx.store.split(_TRAIN).labels, ctx.test_labels()
    r = linear_svm_eval(ctx.cache.points(_TRAIN), ytr, ctx.cache.points(_TEST), yte, Cs=Cs, seed=ctx.seed)
    ctx.put("svm3d.accuracy", r["accuracy"])
    ctx.put("svm3d.C", r["C"])
    ctx.put("svm3d.cv_score", r["cv_score"])
    ctx.put("svm3d.folds", r["folds"])
    if not ctx.has_images:
        ctx.skip("svm2d", _NO_IMAGES)
        return
    vmax = max(ctx.views)
    ftr, fte = ctx.cache.views(_TRAIN, vmax), ctx.cache.views(_TEST, vmax)
    for v in ctx.views:
        r = linear_svm_eval(pool_views(ftr, v), ytr, pool_views(fte, v), yte, Cs=Cs, seed=ctx.seed)
        ctx.put(f"svm2d.accuracy.{v}", r["accuracy"])
        ctx.put(f"svm2d.C.{v}", r["C"])
        ctx.put(f"svm2d.cv_score.{v}", r["cv_score"])
        ctx.put(f"svm2d.folds.{v}", r["folds"])


def _retrieval_scores(feats: np.ndarray, y: np.ndarray, ks: Sequence[int], class_names: Sequence[str]) -> dict:
    """Top-K, mAP and the PSB statistics of one feature set: ``{name: value}``."""
    return {**retrieval_metrics(feats, y, ks=ks), **psb_statistics(feats, y, class_names=class_names)}


def _task_retrieval(ctx: _Ctx, ks: Sequence[int]) -> None:
    y = ctx.test_labels()
    if y.shape[0] < 2:
        ctx.skip("retrieval", "the test split has fewer than 2 objects")
        return
    names = ctx.store.classes
    for k, v in _retrieval_scores(ctx.cache.points(_TEST), y, ks, names).items():
        ctx.put(f"retrieval3d.{k}", v)
    if not ctx.prefix:  # the reference does not depend on the network: once, beside the run's keys
        d2 = d2_descriptor(ctx.store.split(_TEST).all_points(), seed=ctx.seed)
        for k, v in _retrieval_scores(d2, y, ks, names).items():
            ctx.put(f"{D2_PREFIX}retrieval3d.{k}", v)
    if not ctx.has_images:
        ctx.skip("retrieval2d", _NO_IMAGES)
        return
    feats = ctx.cache.views(_TEST, max(ctx.views))
    for v in ctx.views:
        for k, val in _retrieval_scores(pool_views(feats, v), y, ks, names).items():
            ctx.put(f"retrieval2d.{v}.{k}", val)


def _task_fewshot(ctx: _Ctx, settings, n_query: int, n_episodes: int) -> dict:
    from xmodal.eval.fewshot import fewshot_eval

    y = ctx.test_labels()
    sources = [("3d", ctx.cache.points(_TEST))]
    if ctx.has_images:
        sources.append(("2d", ctx.cache.pooled(_TEST, max(ctx.views))))
    else:
        ctx.skip("fewshot2d", _NO_IMAGES)
    skipped = {}
    for dim, feats in sources:
        res = fewshot_eval(feats, y, settings=settings, n_query=n_query, n_episodes=n_episodes, seed=ctx.seed)
        for name, r in res.items():
            if "skipped" in r:
                skipped[f"fewshot{dim}.{name}"] = r["skipped"]
                continue
            ctx.put(f"fewshot{dim}.{name}.mean", r["mean"])
            ctx.put(f"fewshot{dim}.{name}.std", r["std"])
    for k, v in skipped.items():
        ctx.skip(k, v)
    return skipped


def _task_crossmodal(ctx: _Ctx, max_gallery: Optional[int]) -> None:
    from xmodal.eval.crossmodal import crossmodal_metrics

    if not ctx.has_images:
        ctx.skip("crossmodal", _NO_IMAGES + ": cross-modal retrieval needs rendered views")
        return
    img = ctx.cache.views(_TEST, max(ctx.views))[:, 0]  # one seeded random view per object
    res = crossmodal_metrics(
        ctx.loaded.pair_classifier,
        img,
        ctx.cache.points(_TEST),
        ctx.test_labels(),
        max_gallery=max_gallery,
        seed=ctx.seed,
        device=ctx.device,
    )
    for d in ("img2shape", "shape2img"):
        for k, v in res[d].items():
            ctx.put(f"crossmodal.{d}.{k}", v)
    ctx.put("crossmodal.gallery_size", res["gallery_size"])


def _task_tsne(ctx: _Ctx, out: Path, name: str, title: str) -> Optional[Path]:
    from xmodal.eval.figures import tsne_figure

    y = ctx.test_labels()
    if y.shape[0] < 3:
        ctx.skip("tsne", "the test split has fewer than 3 objects")
        return None
    panels = []
    if ctx.has_images:
        tv = effective_views(TSNE_VIEWS, ctx.cache.num_views)
        feats = ctx.cache.views(_TEST, max(max(tv), max(ctx.views)))
        panels += [(f"images, v = {v}", pool_views(feats, v)) for v in tv]
    else:
        ctx.skip("tsne2d", _NO_IMAGES)
    panels.append(("point clouds", ctx.cache.points(_TEST)))
    return tsne_figure(panels, y, ctx.store.classes, out / name, seed=ctx.seed, title=title)


def _task_partseg(ctx: _Ctx, data_path, partseg_data, partseg_kwargs: Optional[dict], out: Path, progress: bool) -> None:
    try:
        from xmodal.eval.partseg import run_partseg
    except ImportError as exc:
        ctx.skip("partseg", f"xmodal.eval.partseg is not available ({exc})")
        return
    target = partseg_data
    if target is None:
        has_parts = ctx.store.part_names is not None and all(
            ctx.store.split(s).has_point_labels for s in (_TRAIN, _TEST) if s in ctx.store.splits
        )
        if not has_parts:
            ctx.skip("partseg", f"{data_path} has no part labels; pass partseg_data (e.g. a ShapeNet-Part folder)")
            return
        target = ctx.store
    kwargs = dict(partseg_kwargs or {})
    kwargs.setdefault("log_dir", out / "partseg")
    res = run_partseg(ctx.loaded, target, seed=ctx.seed, device=ctx.device, progress=progress, **kwargs)
    for k, v in res.items():
        ctx.put(k, v)


# --------------------------------------------------------------------------- job


def _run_tasks(ctx: _Ctx, tasks: list[str], *, out: Path, data_path, opts: dict, progress: bool, label: str) -> dict:
    """Run ``tasks`` on one network; returns ``{figure caption: file name}``."""
    figures: dict[str, str] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=f"evaluate {label}", unit="task")
    for task in tasks:
        t0 = time.perf_counter()
        if bar is not None:
            bar.set_postfix_str(task)
        if task == "pretext":
            _task_pretext(ctx)
        elif task == "svm":
            _task_svm(ctx, opts["Cs"])
        elif task == "retrieval":
            _task_retrieval(ctx, opts["retrieval_ks"])
        elif task == "fewshot":
            _task_fewshot(ctx, opts["fewshot_settings"], opts["fewshot_query"], opts["fewshot_episodes"])
        elif task == "crossmodal":
            _task_crossmodal(ctx, opts["crossmodal_max_gallery"])
        elif task == "tsne":
            name = "tsne.png" if not ctx.prefix else "tsne_random_init.png"
            title = "t-SNE of test features" + ("" if not ctx.prefix else " (random init)")
            path = _task_tsne(ctx, out, name, title)
            if path is not None:
                figures["Fig. 3 — t-SNE of features" + (" (random init)" if ctx.prefix else "")] = path.name
        elif task == "partseg":
            if ctx.prefix:
                ctx.skip("partseg", "the random-init baseline of Table 4 is its 'scratch' setting")
            else:
                _task_partseg(ctx, data_path, opts["partseg_data"], opts["partseg_kwargs"], out, progress)
        log.info("%s: %s done in %.1f s", label, task, time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return figures


def _dataset_meta(store) -> dict:
    return {
        "classes": len(store.classes),
        "counts": store.counts,
        "views": store.views if store.has_images else 0,
        "points": store.num_points,
        "image_size": store.image_size,
        "part_names": len(store.part_names) if store.part_names else 0,
    }


def _loss_mode(config: Any) -> Optional[str]:
    loss = getattr(config, "loss", None)
    mode = getattr(loss, "mode", None)
    return str(mode) if mode is not None else None


def evaluate(
    run: str | os.PathLike,
    data: str | os.PathLike,
    *,
    tasks: Iterable[str] = ("all",),
    out: str | os.PathLike,
    baseline: Optional[str] = None,
    seed: int = 0,
    device: Any = None,
    views: Sequence[int] = DEFAULT_VIEWS,
    partseg_data: Optional[str | os.PathLike] = None,
    partseg_kwargs: Optional[dict] = None,
    progress: bool = True,
    Cs: Optional[Sequence[float]] = None,
    retrieval_ks: Sequence[int] = (1, 5, 10, 20, 50),
    fewshot_settings: Sequence = ((5, 10), (5, 20), (10, 10), (10, 20)),
    fewshot_query: int = 20,
    fewshot_episodes: int = 10,
    crossmodal_max_gallery: Optional[int] = 1000,
    loaded: Any = None,
) -> dict:
    """Evaluate a run's frozen encoders; write ``OUT/metrics.json``, ``OUT/report.md`` and figures.

    Args:
        run: the run folder written by ``xmodal pretrain``.
        data: a dataset folder for :func:`xmodal.data.store.open_dataset` (an xmodal store
            or a raw ModelNet40 HDF5 folder, points only); needs ``train`` and ``test`` splits.
        tasks: names from :data:`TASKS` or ``"all"``.
        out: report folder (created).
        baseline: ``"random"`` also evaluates :func:`xmodal.api.random_init_run` of the run's
            config (seeded with ``seed``) on the same tasks, stored as ``baseline.random.<key>``.
        seed: seeds view choice, pairs, CV folds, episodes, t-SNE and the baseline.
        device: torch device (default: cuda when available).
        views: view counts v for the 2D tasks, capped at the dataset's V and deduplicated.
        partseg_data: part-segmentation data (default: ``data`` itself when it has part labels).
        partseg_kwargs: extra keyword arguments of :func:`xmodal.eval.partseg.run_partseg`.
        progress: tqdm bars.
        Cs: SVM C grid (default :data:`xmodal.eval.svm.DEFAULT_CS`).
        loaded: an already loaded :class:`xmodal.api.LoadedRun` to use instead of loading ``run``.

    Returns:
        the flat metrics dict written to ``OUT/metrics.json``.
    """
    from xmodal.data.store import open_dataset
    from xmodal.eval.figures import training_curves_figure
    from xmodal.eval.report import write_report
    from xmodal.eval.svm import DEFAULT_CS

    task_list = resolve_tasks(tasks)
    if baseline not in (None, "random"):
        raise ValueError(f"baseline must be None or 'random', got {baseline!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(run)
    device = str(default_device(device))  # a string: it is also written to metrics.json

    if loaded is None:
        from xmodal.api import load_run

        loaded = load_run(run_dir, device=device)
    store = open_dataset(data)
    if _TEST not in store.splits:
        raise ValueError(f"{data}: the dataset has no '{_TEST}' split (splits: {store.splits})")
    views_used = effective_views(views, store.views if store.has_images else 0)
    if store.has_images and getattr(loaded, "image_size", None) not in (None, store.image_size):
        log.warning(
            "%s: images are %s px but the run was trained on %s px; encoding them as stored",
            data, store.image_size, loaded.image_size,
        )
    opts = {
        "Cs": tuple(Cs) if Cs is not None else DEFAULT_CS,
        "retrieval_ks": tuple(int(k) for k in retrieval_ks),
        "fewshot_settings": tuple(fewshot_settings),
        "fewshot_query": int(fewshot_query),
        "fewshot_episodes": int(fewshot_episodes),
        "crossmodal_max_gallery": crossmodal_max_gallery,
        "partseg_data": partseg_data,
        "partseg_kwargs": partseg_kwargs,
    }

    metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    figures: dict[str, str] = {}
    networks = [("run", loaded, "")]
    if baseline == "random":
        from xmodal.api import random_init_run

        # the LoadedRun carries the run's config and up axis
        networks.append(("random init", random_init_run(loaded, seed=seed, device=device), "baseline.random."))
    for label, net, prefix in networks:
        cache = FeatureCache(net, store, seed=seed, device=device, progress=progress)
        ctx = _Ctx(net, store, cache, prefix, views_used, seed, device)
        figures.update(_run_tasks(ctx, task_list, out=out, data_path=data, opts=opts, progress=progress, label=label))
        metrics.update(ctx.metrics)
        for k, v in ctx.skipped.items():
            skipped[prefix + k] = v

    curves = run_dir / "metrics.jsonl"
    if curves.is_file():
        try:
            path = training_curves_figure(curves, out / "training_curves.png")
        except (ValueError, OSError) as exc:
            log.warning("%s: training curves not drawn (%s)", curves, exc)
            path = None
        if path is not None:
            figures["Training curves"] = path.name

    meta = {
        "meta.run": str(run_dir),
        "meta.data": str(data),
        "meta.seed": int(seed),
        "meta.device": device,
        "meta.dataset": _dataset_meta(store),
        "meta.loss_mode": _loss_mode(getattr(loaded, "config", None)),
        "meta.views_requested": [int(v) for v in views],
        "meta.views_used": views_used,
        "meta.svm_Cs": [float(c) for c in opts["Cs"]],
        "meta.fewshot2d_views": max(views_used) if views_used else None,
        "meta.fewshot_query": opts["fewshot_query"],
        "meta.fewshot_episodes": opts["fewshot_episodes"],
        "meta.baseline": baseline,
        "meta.tasks_run": task_list,
        "meta.tasks_skipped": skipped,
        "meta.figures": figures,
        "meta.time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    merged = _merge_previous(out / "metrics.json", metrics, meta, task_list)
    write_json(out / "metrics.json", merged)
    write_report(merged, out / "report.md", figures=merged.get("meta.figures") or {})
    log.info("evaluation written to %s", out)
    return merged


#: metric key prefixes each task writes (for replacing a task's keys on a merge)
_TASK_PREFIXES = {
    "pretext": ("pretext.",),
    "svm": ("svm2d.", "svm3d."),
    "retrieval": ("retrieval2d.", "retrieval3d.", D2_PREFIX),
    "fewshot": ("fewshot2d.", "fewshot3d."),
    "crossmodal": ("crossmodal.",),
    "tsne": (),
    "partseg": ("partseg.",),
}


def _merge_previous(path: Path, metrics: dict, meta: dict, tasks: list[str]) -> dict:
    """Merge into an earlier ``metrics.json`` of the same run/data/seed; else start afresh."""
    new = {**metrics, **meta}
    if not path.is_file():
        return new
    try:
        old = read_json(path)
    except ValueError as exc:
        log.warning("%s; it is replaced", exc)
        return new
    same = isinstance(old, dict) and all(old.get(k) == meta[k] for k in ("meta.run", "meta.data", "meta.seed"))
    if not same:
        log.info("%s holds another evaluation (run, data or seed differ); it is replaced", path)
        return new
    drop = tuple(p for t in tasks for p in _TASK_PREFIXES[t])
    kept = {
        k: v
        for k, v in old.items()
        if not k.startswith("meta.") and not any(k.startswith(p) or k.startswith("baseline.random." + p) for p in drop)
    }
    merged = {**kept, **metrics}
    old_run = [t for t in (old.get("meta.tasks_run") or []) if t not in tasks]
    old_skip = {
        k: v
        for k, v in (old.get("meta.tasks_skipped") or {}).items()
        if not any(k.removeprefix("baseline.random.").startswith(t) for t in tasks)
    }
    old_figs = dict(old.get("meta.figures") or {})
    meta = dict(meta)
    meta["meta.tasks_run"] = [t for t in TASKS if t in set(old_run) | set(tasks)]
    meta["meta.tasks_skipped"] = {**old_skip, **meta["meta.tasks_skipped"]}
    meta["meta.figures"] = {**old_figs, **meta["meta.figures"]}
    return {**merged, **meta}
