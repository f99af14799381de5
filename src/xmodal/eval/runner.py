"""The ``evaluate`` job: every evaluation task of a run, metrics.json, report.md, figures.

>>> from xmodal.eval.config import EvaluateConfig
>>> from xmodal.eval.runner import evaluate
>>> cfg = EvaluateConfig(run="runs/mn40", data="data/mn40", out="reports/mn40", baseline="random")
>>> metrics = evaluate(cfg)  # doctest: +SKIP

Tasks (``tasks=`` any of them, or ``"all"``; the registry is :mod:`xmodal.eval.tasks`):

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
``OUT/evaluate.yaml`` holds the resolved config of the latest evaluation into ``OUT``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from xmodal.config import save_config
from xmodal.errors import DataError
from xmodal.eval.config import EvaluateConfig
from xmodal.eval.context import BASELINE_PREFIX, NO_IMAGES, TEST, EvalContext
from xmodal.eval.features import FeatureCache, effective_views
from xmodal.eval.report import write_report
from xmodal.eval.tasks import TASK_NAMES, EvalTask, get_task, resolve_tasks
from xmodal.utils.device import default_device
from xmodal.utils.io import read_json, write_json

__all__ = ["CONFIG_NAME", "resolve_tasks", "evaluate"]

log = logging.getLogger(__name__)

#: the resolved config, written beside the report
CONFIG_NAME = "evaluate.yaml"


def _run_task(ctx: EvalContext, task: EvalTask) -> None:
    """Run one task on one network, or record why it does not run there."""
    ctx.task = task.name
    if ctx.is_baseline and task.baseline_skip:
        ctx.skip(task.name, task.baseline_skip)
    elif task.images == "required" and not ctx.has_images:
        ctx.skip(task.name, f"{NO_IMAGES}: {task.title} needs rendered views")
    else:
        task.function()(ctx)


def _run_tasks(ctx: EvalContext, tasks: list[EvalTask], label: str) -> None:
    """Run ``tasks`` on one network, in order, with a progress bar."""
    bar = None
    if ctx.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=f"evaluate {label}", unit="task")
    for task in tasks:
        t0 = time.perf_counter()
        if bar is not None:
            bar.set_postfix_str(task.name)
        _run_task(ctx, task)
        log.info("%s: %s done in %.1f s", label, task.name, time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


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


def _open_store(cfg: EvaluateConfig, loaded):
    from xmodal.data.store import open_dataset

    store = open_dataset(cfg.data)
    if TEST not in store.splits:
        raise DataError(f"the dataset has no '{TEST}' split (splits: {store.splits})", path=cfg.data)
    if store.has_images and getattr(loaded, "image_size", None) not in (None, store.image_size):
        log.warning(
            "%s: images are %s px but the run was trained on %s px; encoding them as stored",
            cfg.data, store.image_size, loaded.image_size,
        )
    return store


def _evaluate_networks(cfg: EvaluateConfig, tasks: list[EvalTask], loaded, store, *, views: list[int], device: str,
                       progress: bool) -> tuple[dict, dict, dict]:
    """Run ``tasks`` on the run and, if asked, its random-init baseline: (metrics, skipped, figures)."""
    metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    figures: dict[str, str] = {}
    networks = [("run", loaded, "")]
    if cfg.baseline == "random":
        from xmodal.api import random_init_run

        # the LoadedRun carries the run's config and up axis
        networks.append(("random init", random_init_run(loaded, seed=cfg.seed, device=device), BASELINE_PREFIX))
    for label, net, prefix in networks:
        cache = FeatureCache(net, store, seed=cfg.seed, device=device, progress=progress)
        ctx = EvalContext(cfg, net, store, cache, prefix=prefix, views=views, device=device, out=Path(cfg.out),
                          progress=progress)
        _run_tasks(ctx, tasks, label)
        metrics.update(ctx.metrics)
        figures.update(ctx.figures)
        skipped.update({prefix + k: v for k, v in ctx.skipped.items()})
    return metrics, skipped, figures


def _curves_figure(run_dir: Path, out: Path) -> dict:
    """``{caption: file name}`` of the run's training curves and, when it logged one, its
    learning curve on held-out training objects (``val.every`` > 0); ``{}`` without a metrics log."""
    from xmodal.eval.figures import training_curves_figure, validation_curve_figure

    curves = run_dir / "metrics.jsonl"
    if not curves.is_file():
        return {}
    figures = {}
    drawers = (("Training curves", training_curves_figure, "training_curves.png"),
               ("Learning curve on held-out training objects", validation_curve_figure, "learning_curve.png"))
    for caption, draw, name in drawers:
        try:
            path = draw(curves, out / name)
        except (ValueError, OSError) as exc:
            log.warning("%s: %s not drawn (%s)", curves, caption.lower(), exc)
            continue
        if path is not None:
            figures[caption] = path.name
    return figures


def _meta(cfg: EvaluateConfig, store, loaded, *, views: list[int], device: str, tasks: list[str], skipped: dict,
          figures: dict) -> dict:
    """The ``meta.*`` keys of metrics.json: what was evaluated, and how."""
    return {
        "meta.run": str(Path(cfg.run)),
        "meta.data": str(cfg.data),
        "meta.seed": int(cfg.seed),
        "meta.device": device,
        "meta.dataset": _dataset_meta(store),
        "meta.loss_mode": _loss_mode(getattr(loaded, "config", None)),
        "meta.views_requested": [int(v) for v in cfg.views],
        "meta.views_used": views,
        "meta.svm_Cs": [float(c) for c in cfg.svm.cs],
        "meta.fewshot2d_views": max(views) if views else None,
        "meta.fewshot_query": int(cfg.fewshot.query),
        "meta.fewshot_episodes": int(cfg.fewshot.episodes),
        "meta.baseline": cfg.baseline,
        "meta.tasks_run": tasks,
        "meta.tasks_skipped": skipped,
        "meta.figures": figures,
        "meta.time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def evaluate(cfg: EvaluateConfig, *, loaded: Any = None, progress: bool = True) -> dict:
    """Evaluate a run's frozen encoders; write ``OUT/metrics.json``, ``OUT/report.md``, figures
    and the resolved config ``OUT/evaluate.yaml``.

    Args:
        cfg: what to evaluate and how (:class:`~xmodal.eval.config.EvaluateConfig`): ``run``
            (the run folder written by ``xmodal pretrain``), ``data`` (a dataset folder for
            :func:`xmodal.data.store.open_dataset`: an xmodal store, or a raw ModelNet40 HDF5
            folder, points only; needs a ``test`` split), ``out`` (report folder, created),
            ``tasks``, ``baseline`` (``"random"`` also evaluates :func:`xmodal.api.random_init_run`
            of the run's config, seeded with ``seed``, stored as ``baseline.random.<key>``),
            ``seed``, ``device``, ``views`` and each task's options.
        loaded: an already loaded :class:`xmodal.api.LoadedRun` to use instead of loading ``cfg.run``.
        progress: tqdm bars.

    Returns:
        the flat metrics dict written to ``OUT/metrics.json``.
    """
    cfg.validate()
    cfg.require_paths()
    tasks = [get_task(name) for name in resolve_tasks(cfg.tasks)]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = str(default_device(None if cfg.device == "auto" else cfg.device))  # a string: it goes to metrics.json
    if loaded is None:
        from xmodal.api import load_run

        loaded = load_run(Path(cfg.run), device=device)
    store = _open_store(cfg, loaded)
    views = effective_views(cfg.views, store.views if store.has_images else 0)
    save_config(cfg, out / CONFIG_NAME)
    metrics, skipped, figures = _evaluate_networks(cfg, tasks, loaded, store, views=views, device=device,
                                                   progress=progress)
    figures.update(_curves_figure(Path(cfg.run), out))
    names = [t.name for t in tasks]
    meta = _meta(cfg, store, loaded, views=views, device=device, tasks=names, skipped=skipped, figures=figures)
    merged = _merge_previous(out / "metrics.json", metrics, meta, names)
    write_json(out / "metrics.json", merged)
    write_report(merged, out / "report.md", figures=merged.get("meta.figures") or {})
    log.info("evaluation written to %s", out)
    return merged


def _merge_previous(path: Path, metrics: dict, meta: dict, tasks: list[str]) -> dict:
    """Merge into an earlier ``metrics.json`` of the same run/data/seed; else start afresh.

    The keys of the tasks evaluated now (their registry prefixes, also under the baseline's
    prefix) replace the earlier ones; the other tasks' keys are kept.
    """
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
    drop = tuple(p for t in tasks for p in get_task(t).prefixes)
    kept = {
        k: v
        for k, v in old.items()
        if not k.startswith("meta.") and not any(k.startswith(p) or k.startswith(BASELINE_PREFIX + p) for p in drop)
    }
    merged = {**kept, **metrics}
    old_run = [t for t in (old.get("meta.tasks_run") or []) if t not in tasks]
    old_skip = {
        k: v
        for k, v in (old.get("meta.tasks_skipped") or {}).items()
        if not any(k.removeprefix(BASELINE_PREFIX).startswith(t) for t in tasks)
    }
    old_figs = dict(old.get("meta.figures") or {})
    meta = dict(meta)
    meta["meta.tasks_run"] = [t for t in TASK_NAMES if t in set(old_run) | set(tasks)]
    meta["meta.tasks_skipped"] = {**old_skip, **meta["meta.tasks_skipped"]}
    meta["meta.figures"] = {**old_figs, **meta["meta.figures"]}
    return {**merged, **meta}
