"""What an evaluation task sees of one evaluated network: :class:`EvalContext`.

The runner (:func:`xmodal.eval.runner.evaluate`) builds one context per network — the run,
and with ``baseline="random"`` its random-init copy — and calls every task's function of
:mod:`xmodal.eval.tasks` with it. A task reads its options from ``ctx.cfg``, features from
``ctx.cache`` and records metrics with :meth:`EvalContext.put` (keys get the network's prefix,
``""`` or ``"baseline.random."``), skips with :meth:`EvalContext.skip` and figures with
:meth:`EvalContext.add_figure`.

A long task can save partial progress with :meth:`EvalContext.save_partial` (an evaluation
stopped later resumes from ``ctx.partial``) and call :meth:`EvalContext.check_stop` at safe
points: once the job is asked to stop (SIGTERM/SIGINT) it raises :class:`TaskStopped`, and the
runner abandons the task, keeping what was saved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["TRAIN", "TEST", "NO_IMAGES", "BASELINE_PREFIX", "TaskStopped", "EvalContext"]

log = logging.getLogger(__name__)

TRAIN, TEST = "train", "test"
#: the reason recorded for the 2D part of a task on a points-only dataset
NO_IMAGES = "the dataset has no images (points only)"
#: metric-key prefix of the random-init baseline's copies
BASELINE_PREFIX = "baseline.random."


class TaskStopped(Exception):
    """Raised by :meth:`EvalContext.check_stop` once the job was asked to stop."""


class EvalContext:
    """One evaluated network with its dataset, feature cache and evaluation settings.

    Args:
        cfg: the :class:`~xmodal.eval.config.EvaluateConfig`.
        loaded: the network (a :class:`xmodal.api.LoadedRun`).
        store: the dataset (:class:`xmodal.data.store.ShapeStore`).
        cache: the network's :class:`~xmodal.eval.features.FeatureCache` on ``store``.
        prefix: prefix of every metric key (``""``; ``"baseline.random."`` for the baseline).
        views: the view counts usable on ``store`` (``cfg.views`` capped and deduplicated).
        device: the torch device, as a string.
        out: the report folder (figures and logs go there).
        progress: show progress bars.
        stop: the job's :class:`~xmodal.utils.signals.StopRequest` (None: never asked to stop).
    """

    def __init__(self, cfg, loaded, store, cache, *, prefix: str, views: list[int], device: str, out: Path,
                 progress: bool, stop=None):
        self.cfg = cfg
        self.loaded = loaded
        self.store = store
        self.cache = cache
        self.prefix = prefix
        self.views = views
        self.device = device
        self.out = Path(out)
        self.progress = progress
        self.stop = stop
        self.begin("")

    def begin(self, task: str, *, partial: Optional[dict] = None,
              save_partial: Optional[Callable[[dict], None]] = None) -> None:
        """Start ``task`` (the runner does): metrics, skips and figures from here on are its own.

        ``partial``: the progress it saved when an earlier evaluation stopped it; ``save_partial``:
        how :meth:`save_partial` persists progress.
        """
        #: the task running now
        self.task = task
        self.metrics: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        #: ``{caption: file name in out}``
        self.figures: dict[str, str] = {}
        #: the progress the task saved in an earlier, stopped evaluation ({}: start afresh)
        self.partial: dict = dict(partial or {})
        self._save_partial = save_partial

    def save_partial(self, state: dict) -> None:
        """Persist the running task's progress (JSON-able); a later evaluation finds it in ``partial``."""
        self.partial = dict(state)
        if self._save_partial is not None:
            self._save_partial(self.partial)

    def check_stop(self) -> None:
        """Raise :class:`TaskStopped` when the job was asked to stop (a safe point of a long task)."""
        if self.stop is not None and self.stop.requested:
            raise TaskStopped(self.task)

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def is_baseline(self) -> bool:
        return bool(self.prefix)

    def put(self, key: str, value: Any) -> None:
        self.metrics[self.prefix + key] = value

    def skip(self, what: str, reason: str) -> None:
        """Record that ``what`` (a task, or a part such as ``svm2d``) was not evaluated, and why."""
        self.skipped[what] = reason
        log.info("%sskipped %s: %s", self.prefix, what, reason)

    def add_figure(self, caption: str, path: Path) -> None:
        self.figures[caption] = Path(path).name

    @property
    def has_images(self) -> bool:
        return self.cache.num_views > 0

    def test_labels(self) -> np.ndarray:
        return self.store.split(TEST).labels
