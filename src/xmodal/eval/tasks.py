"""The evaluation tasks: one registry read by the CLI, the runner and the report.

Each task is an :class:`EvalTask`: the function that runs it on one network (an
:class:`xmodal.eval.context.EvalContext`: the run, or its random-init baseline), the
:class:`~xmodal.eval.config.EvaluateConfig` fields it reads, the metric-key prefixes it writes
(a task evaluated again into the same report replaces exactly those keys), whether it needs
rendered views, and the function of the report that renders its section.

:data:`TASKS` is in run order: ``xmodal evaluate --task`` offers these names plus ``all``,
``"all"`` expands to all of them in this order, and the report lays the sections of the paper's
tables out first (by table), then the others in this order.

Functions are named ``"module:function"`` and imported when used, so that reading the registry
(the CLI does, to list the ``--task`` choices) imports nothing heavy.

Adding a task: a module with ``def my_task(ctx)`` (it reads its options from ``ctx.cfg`` and
records metrics with ``ctx.put``) and, if the report is to show it, ``def my_section(m)``
returning Markdown lines (``m``: :class:`xmodal.eval.report.ReportMetrics`); then one
``EvalTask(...)`` line in :data:`TASKS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional

from xmodal.errors import ConfigError

__all__ = ["EvalTask", "TASKS", "TASK_NAMES", "get_task", "resolve_tasks", "report_tasks"]


def _load(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task."""

    #: the name of ``--task`` and ``tasks=``
    name: str
    #: ``"module:function"``: ``function(ctx)`` evaluates one network and records its metrics
    run: str
    #: what the task is called in messages ("Table 1", "cross-modal retrieval")
    title: str
    #: the :class:`~xmodal.eval.config.EvaluateConfig` fields it reads
    options: tuple[str, ...] = ()
    #: prefixes of the metric keys it writes (``svm3d.``); the baseline's copies carry
    #: ``baseline.random.`` in front
    prefixes: tuple[str, ...] = ()
    #: ``required``: skipped on a points-only dataset; ``optional``: its 2D half is skipped
    #: there; ``unused``: works on point clouds only
    images: Literal["required", "optional", "unused"] = "optional"
    #: ``"module:function"`` rendering its report section from the metrics, or None
    section: Optional[str] = None
    #: the table or figure of the paper it reproduces ("" for tasks beyond the paper)
    paper: str = ""
    #: why it does not run on the random-init baseline (None: it does)
    baseline_skip: Optional[str] = None
    #: it reads the frozen 3D features (``FeatureCache.points``), so ``point_subsets`` changes its figures
    point_features: bool = True

    def function(self) -> Callable:
        """The task's function, imported."""
        return _load(self.run)

    def section_function(self) -> Optional[Callable]:
        """The report function of its section, imported (None when it has none)."""
        return None if self.section is None else _load(self.section)


_REPORT = "xmodal.eval.report:"

#: every task, in the order they run
TASKS: tuple[EvalTask, ...] = (
    EvalTask("pretext", "xmodal.eval.pretext:pretext_task", title="Table 1", options=("views",),
             prefixes=("pretext.",), images="required", section=_REPORT + "section_table1", paper="Table 1"),
    EvalTask("svm", "xmodal.eval.svm:svm_task", title="linear SVM", options=("views", "svm"),
             prefixes=("svm2d.", "svm3d."), images="optional", section=_REPORT + "section_table2", paper="Table 2"),
    EvalTask("retrieval", "xmodal.eval.retrieval:retrieval_task", title="retrieval", options=("views", "retrieval"),
             prefixes=("retrieval2d.", "retrieval3d.", "reference.d2."), images="optional",
             section=_REPORT + "section_table3", paper="Table 3"),
    EvalTask("fewshot", "xmodal.eval.fewshot:fewshot_task", title="few-shot", options=("views", "fewshot"),
             prefixes=("fewshot2d.", "fewshot3d."), images="optional", section=_REPORT + "section_fewshot"),
    EvalTask("crossmodal", "xmodal.eval.crossmodal:crossmodal_task", title="cross-modal retrieval",
             options=("views", "crossmodal"), prefixes=("crossmodal.",), images="required",
             section=_REPORT + "section_crossmodal"),
    EvalTask("tsne", "xmodal.eval.figures:tsne_task", title="t-SNE", options=("views",), images="optional",
             paper="Fig. 3"),
    EvalTask("partseg", "xmodal.eval.partseg:partseg_task", title="part segmentation",
             options=("partseg_data", "partseg"), prefixes=("partseg.",), images="unused",
             section=_REPORT + "section_table4", paper="Table 4",
             baseline_skip="the random-init baseline of Table 4 is its 'scratch' setting", point_features=False),
)
#: the task names, in run order
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)


def get_task(name: str) -> EvalTask:
    """The task called ``name``."""
    for task in TASKS:
        if task.name == name:
            return task
    raise ConfigError(f"tasks: unknown evaluation task '{name}'; choose from {list(TASK_NAMES) + ['all']}")


def resolve_tasks(tasks: Iterable[str]) -> list[str]:
    """Expand ``"all"`` and check names; returns task names in run order."""
    if isinstance(tasks, str):
        tasks = [tasks]
    asked = set()
    for t in tasks:
        if t == "all":
            asked.update(TASK_NAMES)
        else:
            asked.add(get_task(t).name)
    if not asked:
        raise ConfigError("tasks: no evaluation task given")
    return [t for t in TASK_NAMES if t in asked]


def report_tasks() -> list[EvalTask]:
    """Tasks with a report section, in report order: the paper's tables by number, then the rest."""
    with_section = [t for t in TASKS if t.section is not None]
    tables = sorted((t for t in with_section if t.paper.startswith("Table ")), key=lambda t: int(t.paper.split()[1]))
    return tables + [t for t in with_section if t not in tables]
