"""The registry of evaluation tasks: what the CLI, the runner and the report read from it."""

from __future__ import annotations

import dataclasses

import pytest

from xmodal.cli import EVAL_TASKS, build_parser
from xmodal.errors import ConfigError
from xmodal.eval import report
from xmodal.eval.config import EvaluateConfig
from xmodal.eval.tasks import TASK_NAMES, TASKS, get_task, report_tasks, resolve_tasks


def test_cli_task_choices_are_the_registry():
    assert EVAL_TASKS == (*TASK_NAMES, "all")
    evaluate = next(a for a in build_parser()._subparsers._group_actions[0].choices["evaluate"]._actions
                    if a.dest == "task")
    assert tuple(evaluate.choices) == EVAL_TASKS


def test_every_entry_resolves_and_names_real_options():
    fields = {f.name for f in dataclasses.fields(EvaluateConfig)}
    assert len(set(TASK_NAMES)) == len(TASKS)
    for task in TASKS:
        assert callable(task.function()), task.name
        assert task.section is None or callable(task.section_function()), task.name
        assert set(task.options) <= fields, task.name
        assert task.images in ("required", "optional", "unused"), task.name
        assert all(p.endswith(".") for p in task.prefixes), task.name


def test_no_two_tasks_share_a_prefix():
    # a merge replaces the keys under a task's prefixes: they must not reach another task's keys
    prefixes = [(p, t.name) for t in TASKS for p in t.prefixes]
    for p, a in prefixes:
        for q, b in prefixes:
            if a != b:
                assert not p.startswith(q), (p, q)


def test_all_expands_in_run_order_and_unknown_names_fail():
    assert resolve_tasks(["all"]) == list(TASK_NAMES)
    assert resolve_tasks(["partseg", "svm", "svm"]) == ["svm", "partseg"]
    with pytest.raises(ConfigError, match="unknown evaluation task 'svn'"):
        get_task("svn")
    with pytest.raises(ConfigError, match="no evaluation task"):
        resolve_tasks([])


def test_report_sections_follow_the_registry():
    order = [t.name for t in report_tasks()]
    assert order[:4] == ["pretext", "svm", "retrieval", "partseg"]  # Tables 1-4
    assert set(order) == {t.name for t in TASKS if t.section is not None}
    text = report.render_report({})
    headers = [line for line in text.splitlines() if line.startswith("## ")]
    sections = [t.section_function()(report.ReportMetrics({}))[0] for t in report_tasks()]
    assert headers == ["## Setup", *sections, "## Figures"]
    assert [h.split(" —")[0] for h in headers[1:5]] == ["## Table 1", "## Table 2", "## Table 3", "## Table 4"]
