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

Re-running skips finished work: ``meta.tasks_done`` fingerprints every task evaluated on each
network (weights, data, seed, device, views, the task's options; :mod:`xmodal.eval.resume`), and
a task whose fingerprint is already there is not evaluated again (``redo=True`` / ``--redo``
evaluates it anyway). ``metrics.json`` is written after every task, so on SIGTERM/SIGINT the
evaluation finishes the task in progress (part segmentation: the setting and fraction in
progress), writes the report of what is done and raises :class:`~xmodal.errors.Interrupted`;
the same call then evaluates the rest. One process writes a report folder at a time.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any, Optional

from xmodal.config import save_config
from xmodal.errors import DataError, Interrupted
from xmodal.eval.config import EvaluateConfig
from xmodal.eval.context import BASELINE_PREFIX, NO_IMAGES, TEST, EvalContext, TaskStopped
from xmodal.eval.features import FeatureCache, clouds_subsampled, effective_views
from xmodal.eval.report import write_report
from xmodal.eval.resume import (
    MetricsBook,
    data_digest,
    settings_differing,
    task_fingerprint,
    weights_digest,
)
from xmodal.eval.tasks import EvalTask, get_task, resolve_tasks
from xmodal.utils.device import default_device
from xmodal.utils.lock import output_lock
from xmodal.utils.signals import StopRequest

__all__ = ["CONFIG_NAME", "resolve_tasks", "evaluate"]

log = logging.getLogger(__name__)

#: the resolved config, written beside the report
CONFIG_NAME = "evaluate.yaml"
METRICS_NAME = "metrics.json"


def _run_task(ctx: EvalContext, task: EvalTask) -> None:
    """Run one task on one network, or record why it does not run there."""
    ctx.task = task.name
    if ctx.is_baseline and task.baseline_skip:
        ctx.skip(task.name, task.baseline_skip)
    elif task.images == "required" and not ctx.has_images:
        ctx.skip(task.name, f"{NO_IMAGES}: {task.title} needs rendered views")
    else:
        task.function()(ctx)


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


class _NoDataset:
    """What stands for ``data`` when no task reads it (part segmentation on ``partseg_data`` alone):
    no objects, no views, no clouds."""

    classes: list = []
    counts: dict = {}
    splits: list = []
    views = 0
    has_images = False
    num_points = 0
    image_size = None
    part_names = None
    manifest: dict = {}


def _open_store(cfg: EvaluateConfig, loaded):
    from xmodal.data.datasets import open_dataset

    if not cfg.reads_data():  # part segmentation reads --partseg-data: the clouds of --data are not used
        return open_dataset(cfg.data) if cfg.data else _NoDataset()
    store = open_dataset(cfg.data)
    if TEST not in store.splits:
        raise DataError(f"the dataset has no '{TEST}' split (splits: {store.splits})", path=cfg.data)
    return store


def _data_notes(cfg: EvaluateConfig, store, loaded, subsets: int) -> list[str]:
    """How the data is adapted to the run (images of another size, clouds of another size; logged
    as warnings and stated in the report's setup); ``subsets``: the point subsets in effect,
    :func:`_point_subsets`. None where no task reads ``data``."""
    if not cfg.reads_data():
        return []
    notes = []
    if store.has_images and getattr(loaded, "image_size", None) not in (None, store.image_size):
        notes.append(f"images are {store.image_size} px but the run was trained on {loaded.image_size} px; "
                     "they are resized to the run's size")
    run_points = getattr(loaded, "num_points", None)
    if run_points is not None and store.num_points != run_points:
        what = ((f"a seeded subset of {run_points} points of each cloud is used" if subsets == 1 else
                 f"each cloud's 3D feature is the mean over {subsets} seeded subsets of {run_points} points")
                if store.num_points > run_points else "the clouds are used as they are (fewer points than trained on)")
        notes.append(f"clouds have {store.num_points} points but the run was trained on {run_points}; {what}")
    return notes


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


def _point_subsets(cfg: EvaluateConfig, store, loaded) -> int:
    """The point subsets in effect: ``cfg.point_subsets``, or 1 where the clouds are not subsampled
    (no more stored points than the run trained on: every subset would be the whole cloud)."""
    subsampled = clouds_subsampled(store.num_points, getattr(loaded, "num_points", None))
    return int(cfg.point_subsets) if subsampled else 1


def _run_seed(loaded) -> Optional[int]:
    """The run's training seed (``config.seed``), None for a run without a config."""
    seed = getattr(getattr(loaded, "config", None), "seed", None)
    return None if seed is None else int(seed)


def _baseline_seed(cfg: EvaluateConfig, loaded) -> int:
    """The seed of the random-init baseline's weights: ``cfg.baseline_seed``, else the run's own
    training seed (so the baseline is the weights the run started from: training builds its
    networks with :func:`~xmodal.train.checkpoint.build_networks` under that seed, as
    :func:`xmodal.api.random_init_run` does), else 0 for a run without a config."""
    if cfg.baseline_seed is not None:
        return int(cfg.baseline_seed)
    run_seed = _run_seed(loaded)
    return run_seed if run_seed is not None else 0


def _weights_meta(loaded, digest: Optional[str]) -> dict:
    """Which weights of the run are evaluated: ``meta.run_step`` (optimisation steps),
    ``meta.run_source`` (``final``: the encoders of the finished run; ``last``: the last checkpoint of
    a run that has not finished) and ``meta.weights`` (the first 16 hex digits of
    :func:`~xmodal.eval.resume.weights_digest`, also recorded per task in ``meta.tasks_settings``
    so that figures of other weights kept in the folder are told apart); ``meta.run_checkpoint_step``
    when the run's last checkpoint is past the encoders read (``LoadedRun.later_checkpoint``: a run
    extended and not finished)."""
    if loaded is None or not hasattr(loaded, "step"):
        return {}
    meta = {"meta.run_step": int(loaded.step), "meta.run_source": getattr(loaded, "source", None),
            "meta.weights": digest[:16] if digest else None}
    later = getattr(loaded, "later_checkpoint", None)
    if later is not None:
        meta["meta.run_checkpoint_step"] = int(later)
    return meta


def _meta(cfg: EvaluateConfig, store, loaded, *, views: list[int], point_subsets: int, device: str,
          weights_meta: Optional[dict] = None) -> dict:
    """The ``meta.*`` keys of metrics.json that describe this evaluation (the :class:`MetricsBook`
    adds the tasks done, skipped and partly done, and the figures)."""
    return {
        # absolute: a later call from another working folder compares them with its own
        "meta.run": str(Path(cfg.run).absolute()),
        **(weights_meta or {}),
        "meta.data": str(Path(cfg.data).absolute()) if cfg.data else None,
        "meta.seed": int(cfg.seed),
        "meta.device": device,
        "meta.dataset": _dataset_meta(store) if cfg.data else None,
        "meta.loss_mode": _loss_mode(getattr(loaded, "config", None)),
        "meta.views_requested": [int(v) for v in cfg.views],
        "meta.views_used": views,
        "meta.svm_Cs": [float(c) for c in cfg.svm.cs],
        "meta.svm_solver": cfg.svm.solver,
        "meta.fewshot2d_views": max(views) if views else None,
        "meta.fewshot_query": int(cfg.fewshot.query),
        "meta.fewshot_episodes": int(cfg.fewshot.episodes),
        "meta.baseline": cfg.baseline,
        **({"meta.baseline_seed": _baseline_seed(cfg, loaded), "meta.run_seed": _run_seed(loaded)}
           if cfg.baseline == "random" else {}),
        "meta.point_subsets": point_subsets,
        "meta.time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def evaluate(cfg: EvaluateConfig, *, loaded: Any = None, progress: bool = True) -> dict:
    """Evaluate a run's frozen encoders; write ``OUT/metrics.json``, ``OUT/report.md``, figures
    and the resolved config ``OUT/evaluate.yaml``.

    Args:
        cfg: what to evaluate and how (:class:`~xmodal.eval.config.EvaluateConfig`): ``run``
            (the run folder written by ``xmodal pretrain``), ``data`` (a dataset folder for
            :func:`xmodal.data.store.open_dataset`: an xmodal store, or a raw ModelNet40 HDF5
            folder, points only; needs a ``test`` split; may be empty when part segmentation on
            ``partseg_data`` is the one task, which does not read it), ``out`` (report folder, created),
            ``tasks``, ``baseline`` (``"random"`` also evaluates :func:`xmodal.api.random_init_run`
            of the run's config, seeded with ``baseline_seed``, by default the run's own training
            seed, stored as ``baseline.random.<key>``), ``point_subsets`` (3D features averaged
            over that many point subsets),
            ``seed``, ``device``, ``views``, ``redo`` (evaluate tasks already in ``OUT`` again)
            and each task's options.
        loaded: an already loaded :class:`xmodal.api.LoadedRun` to use instead of loading ``cfg.run``.
        progress: tqdm bars.

    Returns:
        the flat metrics dict written to ``OUT/metrics.json``.

    Tasks already evaluated into ``OUT`` with the same fingerprint are not evaluated again
    (:mod:`xmodal.eval.resume`). On SIGTERM/SIGINT the task in progress finishes (part
    segmentation: its setting and fraction in progress), the metrics and report of what is done
    are written and :class:`~xmodal.errors.Interrupted` is raised; a second process evaluating
    into the same ``OUT`` is refused (:class:`~xmodal.errors.OutputLockedError`).
    """
    cfg.validate()
    cfg.require_paths()
    tasks = [get_task(name) for name in resolve_tasks(cfg.tasks)]
    out = Path(cfg.out)
    with output_lock(out, "evaluate"), StopRequest(until="the task in progress") as stop:
        return _Evaluation(cfg, tasks, out, progress=progress, stop=stop).run(loaded)


class _Evaluation:
    """One call of :func:`evaluate`, once ``out`` is locked."""

    def __init__(self, cfg: EvaluateConfig, tasks: list[EvalTask], out: Path, *, progress: bool,
                 stop: StopRequest) -> None:
        self.cfg, self.tasks, self.out, self.progress, self.stop = cfg, tasks, out, progress, stop
        # a string: it goes to metrics.json
        self.device = str(default_device(None if cfg.device == "auto" else cfg.device))
        #: ``"<network label>: <task>"`` of the tasks evaluated by this call, in order
        self.finished: list[str] = []

    def run(self, loaded: Any) -> dict:
        cfg = self.cfg
        if loaded is None:
            from xmodal.api import load_run

            loaded = load_run(Path(cfg.run), device=self.device)
        self.loaded = loaded
        self.store = _open_store(cfg, loaded)
        self.views = effective_views(cfg.views, self.store.views if self.store.has_images else 0)
        self.point_subsets = _point_subsets(cfg, self.store, loaded)
        self.data_notes = _data_notes(cfg, self.store, loaded, self.point_subsets)
        for note in self.data_notes:
            log.warning("%s: %s", cfg.data, note)
        if self.point_subsets != cfg.point_subsets and cfg.reads_data():
            log.warning("point_subsets=%d has no effect: the clouds of %s have no more points (%d) than the run "
                        "trained on, so each is encoded whole, once", cfg.point_subsets, cfg.data, self.store.num_points)
        if cfg.baseline_seed is not None and cfg.baseline != "random":
            log.warning("baseline_seed=%d has no effect without baseline=random", cfg.baseline_seed)
        self.weights = weights_digest(loaded)
        self.weights_meta = _weights_meta(loaded, self.weights)
        # an unfinished run (its last checkpoint read): load_run has said so, naming the step
        # the book first: a folder holding another evaluation is refused before anything is written
        self.book = MetricsBook(self.out / METRICS_NAME, self._meta(), redo=cfg.redo, overwrite=cfg.overwrite)
        save_config(cfg, self.out / CONFIG_NAME)
        todo = self._todo()
        for label, net, prefix, pending in todo:
            if pending:
                self._evaluate_network(label, net, prefix, pending, todo)
        self.book.figures.update(_curves_figure(Path(cfg.run), self.out))
        merged = self._write(report=True)
        log.info("evaluation written to %s", self.out)
        differing = settings_differing(merged)
        if differing:
            log.warning("%s also holds tasks evaluated by an earlier call under other settings (%s); the report "
                        "lists them; asking for those tasks again with the settings of this call evaluates them "
                        "again", self.out, "; ".join(f"{k}: {v}" for k, v in differing.items()))
        return merged

    def _meta(self) -> dict:
        meta = _meta(self.cfg, self.store, self.loaded, views=self.views, point_subsets=self.point_subsets,
                     device=self.device, weights_meta=self.weights_meta)
        return {**meta, "meta.data_notes": list(self.data_notes)}

    def _write(self, *, report: bool = False) -> dict:
        merged = self.book.write(self._meta())
        if report:
            write_report(merged, self.out / "report.md", figures=merged.get("meta.figures") or {})
        return merged

    def _networks(self) -> list[tuple[str, Any, str]]:
        """``(label, network, metric prefix)``: the run and, if asked, its random-init baseline."""
        networks = [("run", self.loaded, "")]
        if self.cfg.baseline == "random":
            baseline = self.loaded.at_random_init(seed=_baseline_seed(self.cfg, self.loaded), device=self.device)
            networks.append(("random init", baseline, BASELINE_PREFIX))
        return networks

    def _todo(self) -> list[tuple[str, Any, str, list[tuple[EvalTask, str]]]]:
        """Per network, the ``(task, fingerprint)`` not evaluated into ``out`` yet."""
        data = data_digest(self.store)
        todo = []
        for label, net, prefix in self._networks():
            weights = self.weights if net is self.loaded else weights_digest(net)
            pending = []
            for task in self.tasks:
                # a task that does not read `data` (part segmentation on partseg_data) does not
                # depend on it: its figures are kept whether `data` is given, or which it is
                fp = task_fingerprint(task, self.cfg, network=prefix, weights=weights,
                                      data=data if self.cfg.task_reads_data(task.name) else "", views=self.views,
                                      point_subsets=self.point_subsets,
                                      device=self.device)
                if self.book.is_done(prefix + task.name, fp):
                    self.book.note_settings(prefix + task.name, self._task_settings(task, prefix))
                    log.info("%s: %s is already evaluated in %s (redo=true evaluates it again)", label, task.name,
                             self.out / METRICS_NAME)
                else:
                    pending.append((task, fp))
            todo.append((label, net, prefix, pending))
        return todo

    def _evaluate_network(self, label: str, net: Any, prefix: str, pending: list, todo: list) -> None:
        """Run the ``pending`` tasks on one network, writing metrics.json after each."""
        cache = FeatureCache(net, self.store, seed=self.cfg.seed, device=self.device,
                             point_subsets=self.point_subsets, progress=self.progress)
        ctx = EvalContext(self.cfg, net, self.store, cache, prefix=prefix, views=self.views, device=self.device,
                          out=self.out, progress=self.progress, stop=self.stop)
        forget = (BASELINE_PREFIX,) if not prefix and self.cfg.baseline is None else ()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc=f"evaluate {label}", unit="task")
        for task, fp in pending:
            if self.stop.requested:
                raise self._interrupted(todo)
            key = prefix + task.name
            ctx.begin(task.name, partial=self.book.partial_state(key, fp),
                      save_partial=lambda state, key=key, fp=fp: self._save_partial(key, fp, state))
            if bar is not None:
                bar.set_postfix_str(task.name)
            t0 = time.perf_counter()
            try:
                _run_task(ctx, task)
            except TaskStopped:
                raise self._interrupted(todo, stopped=f"{label}: {task.name}") from None
            log.info("%s: %s done in %.1f s", label, task.name, time.perf_counter() - t0)
            skipped = {prefix + k: v for k, v in ctx.skipped.items()}
            self.book.record(task, prefix, fp, (ctx.metrics, skipped, ctx.figures), forget=forget,
                             settings=self._task_settings(task, prefix))
            self._write()
            self.finished.append(f"{label}: {task.name}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    def _task_settings(self, task: EvalTask, prefix: str) -> dict:
        """The settings of this call that ``task``'s figures on the network of ``prefix`` depend on
        and the report describes (kept per task: ``meta.tasks_settings``)."""
        settings: dict[str, Any] = {}
        if task.images != "unused":
            settings["views"] = list(self.views)
        if task.point_features:
            settings["point_subsets"] = self.point_subsets
        if "svm" in task.options:
            settings["svm_Cs"] = [float(c) for c in self.cfg.svm.cs]
            settings["svm_solver"] = self.cfg.svm.solver
        if "fewshot" in task.options:
            settings["fewshot_query"] = int(self.cfg.fewshot.query)
            settings["fewshot_episodes"] = int(self.cfg.fewshot.episodes)
        if "partseg" in task.options:
            p = self.cfg.partseg
            settings["partseg"] = {"epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr,
                                   "step_epochs": p.step_epochs, "gamma": p.gamma, "num_points": p.num_points,
                                   "augment": p.augment, "finetune_point_bn": p.finetune_point_bn}
        if prefix == BASELINE_PREFIX:
            settings["baseline_seed"] = _baseline_seed(self.cfg, self.loaded)
        else:
            settings["weights"] = self.weights[:16]
        return settings

    def _save_partial(self, key: str, fp: str, state: dict) -> None:
        self.book.save_partial(key, fp, state)
        self._write()

    def _interrupted(self, todo: list, stopped: Optional[str] = None) -> Interrupted:
        """Write the report of what is done; the error that says so and how to go on."""
        self._write(report=True)
        total = sum(len(pending) for *_, pending in todo)
        name = signal.Signals(self.stop.signum or signal.SIGTERM).name
        done = f" ({', '.join(self.finished)})" if self.finished else ""
        part = f"; {stopped} stopped part-way (the part it finished is saved)" if stopped else ""
        return Interrupted(
            f"stopped by {name}: {len(self.finished)} of {total} task evaluations finished{done}{part}; "
            f"metrics in {self.out / METRICS_NAME}",
            signum=self.stop.signum or signal.SIGTERM, path=self.out,
            hint="run the same command again to evaluate the rest; finished tasks are not evaluated again "
            "(--redo evaluates them anyway)",
        )
