"""What an evaluation task sees of one evaluated network: :class:`EvalContext`.

The runner (:func:`xmodal.eval.runner.evaluate`) builds one context per network — the run,
and with ``baseline="random"`` its random-init copy — and calls every task's function of
:mod:`xmodal.eval.tasks` with it. A task reads its options from ``ctx.cfg``, features from
``ctx.cache`` and records metrics with :meth:`EvalContext.put` (keys get the network's prefix,
``""`` or ``"baseline.random."``), skips with :meth:`EvalContext.skip` and figures with
:meth:`EvalContext.add_figure`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TRAIN", "TEST", "NO_IMAGES", "BASELINE_PREFIX", "EvalContext"]

log = logging.getLogger(__name__)

TRAIN, TEST = "train", "test"
#: the reason recorded for the 2D part of a task on a points-only dataset
NO_IMAGES = "the dataset has no images (points only)"
#: metric-key prefix of the random-init baseline's copies
BASELINE_PREFIX = "baseline.random."


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
    """

    def __init__(self, cfg, loaded, store, cache, *, prefix: str, views: list[int], device: str, out: Path,
                 progress: bool):
        self.cfg = cfg
        self.loaded = loaded
        self.store = store
        self.cache = cache
        self.prefix = prefix
        self.views = views
        self.device = device
        self.out = Path(out)
        self.progress = progress
        #: the task running now (set by the runner)
        self.task = ""
        self.metrics: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        #: ``{caption: file name in out}``
        self.figures: dict[str, str] = {}

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
