"""Evaluating into a report folder again: finished tasks are kept, not recomputed (xmodal.eval.resume)."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

import xmodal.eval.fewshot as fewshot_mod
import xmodal.eval.partseg as partseg_mod
import xmodal.eval.retrieval as retrieval_mod
import xmodal.eval.runner as runner
from xmodal.api import random_init_run
from xmodal.data.store import write_store
from xmodal.errors import Interrupted
from xmodal.eval.config import EvaluateConfig, FewShotConfig, PartSegConfig
from xmodal.eval.runner import evaluate
from xmodal.train.config import resolve_pretrain_config

CLASSES = ["a", "b", "c"]
N = 48


def _split(n_per: int, seed: int, *, parts: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(CLASSES)), n_per)
    pts = rng.normal(size=(y.size, N, 3)) * (0.3 + 0.2 * y)[:, None, None]
    out = {"ids": [f"{CLASSES[c]}/{seed}_{i}" for i, c in enumerate(y)], "labels": y, "points": pts.astype(np.float32)}
    if parts:  # two parts per class: the lower and upper half of each cloud
        out["point_labels"] = (2 * y[:, None] + (pts[..., 2] > 0)).astype(np.int16)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    parts = [f"{c}/{p}" for c in CLASSES for p in ("bottom", "top")]
    write_store(root, classes=CLASSES, splits={"train": _split(5, 0, parts=True), "test": _split(3, 1, parts=True)},
                part_names=parts)
    return root


def _net(seed: int = 0):
    return random_init_run(resolve_pretrain_config("smoke", [f"data.num_points={N}"]), seed=seed, device="cpu")


@pytest.fixture(scope="module")
def loaded():
    return _net(0)


@pytest.fixture
def calls(monkeypatch):
    """Counts the evaluations of the fewshot and retrieval tasks (by network prefix)."""
    counter: Counter = Counter()
    for mod, name in ((fewshot_mod, "fewshot_task"), (retrieval_mod, "retrieval_task")):
        real = getattr(mod, name)

        def counted(ctx, real=real, name=name):
            counter[ctx.prefix + name.removesuffix("_task")] += 1
            return real(ctx)

        monkeypatch.setattr(mod, name, counted)
    return counter


def _fewshot(episodes: int = 2) -> FewShotConfig:
    return FewShotConfig(settings=[(2, 2)], episodes=episodes, query=2)


def _cfg(store, tmp_path, **kw) -> EvaluateConfig:
    return EvaluateConfig(run=tmp_path / "run", data=store, out=tmp_path / "r", tasks=["fewshot", "retrieval"],
                          device="cpu", fewshot=_fewshot(), **kw)


def _metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("meta.")}


def test_finished_tasks_are_kept_and_only_changed_ones_evaluated_again(store, tmp_path, loaded, calls):
    cfg = _cfg(store, tmp_path)
    first = evaluate(cfg, loaded=loaded, progress=False)
    assert calls == {"fewshot": 1, "retrieval": 1}
    assert set(first["meta.tasks_done"]) == {"fewshot", "retrieval"}
    again = evaluate(cfg, loaded=loaded, progress=False)
    assert calls == {"fewshot": 1, "retrieval": 1}  # nothing evaluated again
    assert _metrics(again) == _metrics(first) and again["meta.tasks_done"] == first["meta.tasks_done"]
    # another setting of one task: that task only
    changed = evaluate(replace(cfg, fewshot=_fewshot(3)), loaded=loaded, progress=False)
    assert calls == {"fewshot": 2, "retrieval": 1} and changed["meta.fewshot_episodes"] == 3
    assert changed["meta.tasks_done"]["retrieval"] == first["meta.tasks_done"]["retrieval"]
    assert changed["meta.tasks_done"]["fewshot"] != first["meta.tasks_done"]["fewshot"]
    # other weights: every task
    evaluate(cfg, loaded=_net(1), progress=False)
    assert calls == {"fewshot": 3, "retrieval": 2}
    # redo: every task, whatever is recorded
    evaluate(replace(cfg, redo=True), loaded=_net(1), progress=False)
    assert calls == {"fewshot": 4, "retrieval": 3}


def test_a_baseline_asked_later_evaluates_the_baseline_only(store, tmp_path, loaded, calls):
    cfg = _cfg(store, tmp_path)
    evaluate(cfg, loaded=loaded, progress=False)
    m = evaluate(replace(cfg, baseline="random"), loaded=loaded, progress=False)
    assert calls == {"fewshot": 1, "retrieval": 1, "baseline.random.fewshot": 1, "baseline.random.retrieval": 1}
    assert "baseline.random.fewshot3d.2w2s.mean" in m and "baseline.random.fewshot" in m["meta.tasks_done"]
    # the run's fewshot evaluated again without the baseline: the baseline's (of other settings) goes
    m = evaluate(replace(cfg, fewshot=_fewshot(3)), loaded=loaded, progress=False)
    assert "baseline.random.fewshot3d.2w2s.mean" not in m and "baseline.random.fewshot" not in m["meta.tasks_done"]
    assert "baseline.random.fewshot" not in m["meta.tasks_settings"]
    assert "baseline.random.retrieval3d.top1" in m  # untouched


class _StopAfter:
    """A stand-in for StopRequest whose stop is requested once ``cells`` part-segmentation cells ran."""

    cells = 1

    def __init__(self, *args, **kwargs):
        self.signum = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        _StopAfter.current = self
        return self

    def __exit__(self, *exc):
        return None


def test_part_segmentation_resumes_at_the_first_cell_not_done(store, tmp_path, loaded, monkeypatch):
    cfg = EvaluateConfig(run=tmp_path / "run", data=store, out=tmp_path / "r", tasks=["partseg"], device="cpu",
                         partseg=PartSegConfig(settings=["frozen", "scratch"], fractions=[0.5, 1.0], epochs=1,
                                               batch_size=4))
    reference = evaluate(replace(cfg, out=str(tmp_path / "ref")), loaded=loaded, progress=False)
    ran = []
    real_run = partseg_mod._Table4.run

    def run_cell(self, setting, pct, sub):
        ran.append(f"{setting}/{pct}")
        result = real_run(self, setting, pct, sub)
        if len(ran) == _StopAfter.cells:
            _StopAfter.current.signum = 15  # SIGTERM arrives during the first cell
        return result

    monkeypatch.setattr(partseg_mod._Table4, "run", run_cell)
    monkeypatch.setattr(runner, "StopRequest", _StopAfter)
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM: 0 of 1 task evaluations finished; run: partseg "
                                          r"stopped part-way") as exc:
        evaluate(cfg, loaded=loaded, progress=False)
    assert exc.value.signum == 15 and ran == ["frozen/50"]
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert list(saved["meta.tasks_partial"]["partseg"]["state"]["cells"]) == ["frozen/50"]
    assert "partseg" not in saved["meta.tasks_done"] and not any(k.startswith("partseg.") for k in saved)
    _StopAfter.cells = 0  # never stop
    m = evaluate(cfg, loaded=loaded, progress=False)
    assert ran == ["frozen/50", "scratch/50", "frozen/100", "scratch/100"]  # the first cell was not trained again
    assert _metrics(m) == pytest.approx(_metrics(reference))
    assert m["meta.tasks_partial"] == {} and "partseg" in m["meta.tasks_done"]


def _options_before_solver(name, plain):
    """A task option as it was hashed before ``svm.solver`` existed."""
    return {k: v for k, v in plain.items() if k != "solver"} if name == "svm" else plain


def test_svm_solver_auto_keeps_the_fingerprint_written_before_the_option_and_others_change_it():
    from xmodal import __version__
    from xmodal.eval.resume import _plain, _sha, task_fingerprint
    from xmodal.eval.tasks import get_task

    kw = dict(network="", weights="w", data="d", views=[1], device="cpu")
    task = get_task("svm")
    cfg = EvaluateConfig(run="r", data="d", out="o")
    before = {"task": "svm", "network": "", "weights": "w", "data": "d", "seed": 0, "device": "cpu", "views": [1],
              "options": {"views": _plain(cfg.views), "svm": {"cs": list(cfg.svm.cs)}}, "xmodal": __version__}
    assert task_fingerprint(task, cfg, **kw) == _sha(before)[:32]
    prints = {task_fingerprint(task, cfg, **kw)}
    for solver in ("newton", "lbfgs"):
        cfg.svm.solver = solver
        prints.add(task_fingerprint(task, cfg, **kw))
    assert len(prints) == 3


def test_point_subsets_change_the_fingerprint_of_3d_tasks_only_and_1_keeps_the_old_one():
    from xmodal import __version__
    from xmodal.eval.resume import _plain, _sha, task_fingerprint
    from xmodal.eval.tasks import get_task

    cfg = EvaluateConfig(run="r", data="d", out="o")
    kw = dict(network="", weights="w", data="d", views=[1], device="cpu")
    for name in ("svm", "retrieval", "partseg"):
        task = get_task(name)
        one = task_fingerprint(task, cfg, point_subsets=1, **kw)
        before = {"task": name, "network": "", "weights": "w", "data": "d", "seed": 0, "device": "cpu", "views": [1],
                  "options": {o: _options_before_solver(o, _plain(getattr(cfg, o))) for o in task.options},
                  "xmodal": __version__}
        assert one == _sha(before)[:32]  # the hash written before the option existed: those reports still match
        two = task_fingerprint(task, cfg, point_subsets=2, **kw)
        assert (two != one) is (name != "partseg")  # part segmentation trains on the clouds, not on 3D features


def _report(tmp_path) -> str:
    return (tmp_path / "r" / "report.md").read_text()


def _other_settings(report: str) -> list[str]:
    """The report's lines listing tasks evaluated under other settings ([] when there are none)."""
    lines = report.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("- **evaluated by an earlier call under other settings**")]
    if not heads:
        return []
    out = []
    for line in lines[heads[0] + 1:]:
        if not line.startswith("  - "):
            break
        out.append(line)
    return out


def test_tasks_from_calls_with_other_settings_are_named_in_the_report(store, tmp_path, loaded, caplog):
    """meta.* describes the latest call; a task kept from an earlier call under another baseline
    seed keeps its own settings in meta.tasks_settings, and the report lists it."""
    cfg = replace(_cfg(store, tmp_path, baseline="random", baseline_seed=3), tasks=["pretext", "fewshot", "retrieval"])
    first = evaluate(cfg, loaded=loaded, progress=False)
    # points only: views [] for the tasks that could read images; pretext needs images, so it was
    # skipped whole and has no settings to describe
    assert first["meta.tasks_settings"]["baseline.random.retrieval"] == {"views": [], "point_subsets": 1,
                                                                        "baseline_seed": 3}
    assert first["meta.tasks_settings"]["retrieval"] == {"views": [], "point_subsets": 1,
                                                         "weights": first["meta.weights"]}
    assert "pretext" in first["meta.tasks_skipped"] and "baseline.random.pretext" not in first["meta.tasks_settings"]
    assert _other_settings(_report(tmp_path)) == []
    m = evaluate(replace(cfg, baseline_seed=5, tasks=["fewshot"]), loaded=loaded, progress=False)
    assert m["meta.baseline_seed"] == 5
    assert m["meta.tasks_settings"]["baseline.random.fewshot"]["baseline_seed"] == 5
    assert m["meta.tasks_settings"]["baseline.random.retrieval"]["baseline_seed"] == 3
    assert _other_settings(_report(tmp_path)) == ["  - `baseline.random.retrieval`: baseline seed 3"]
    assert "earlier call under other settings (baseline.random.retrieval: {'baseline_seed': 3})" in caplog.text
    # a call without a baseline states no seed: the kept baseline figures have two, so each is listed
    evaluate(replace(cfg, baseline=None, baseline_seed=None, tasks=["retrieval"]), loaded=loaded, progress=False)
    assert _other_settings(_report(tmp_path)) == ["  - `baseline.random.retrieval`: baseline seed 3",
                                                  "  - `baseline.random.fewshot`: baseline seed 5"]
    # asking for the task again with seed 3 re-evaluates it (its fingerprint differs): nothing differs any more
    evaluate(replace(cfg, tasks=["fewshot"]), loaded=loaded, progress=False)
    assert _other_settings(_report(tmp_path)) == []
    # and without a baseline the report still states the one seed all baseline figures have
    evaluate(replace(cfg, baseline=None, baseline_seed=None, tasks=["retrieval"]), loaded=loaded, progress=False)
    assert _other_settings(_report(tmp_path)) == [] and "(weights seeded with 3)" in _report(tmp_path)


def test_figures_kept_from_other_weights_of_the_run_are_named_and_the_weights_stated(store, tmp_path, loaded, calls):
    # evaluate everything, then (the run extended) only one task on the new weights: the other
    # task's figures are the old weights'; the report must say so, and which weights it states
    cfg = _cfg(store, tmp_path)
    first = evaluate(cfg, loaded=loaded, progress=False)
    assert first["meta.run_step"] == 0 and first["meta.run_source"] == "random"
    assert len(first["meta.weights"]) == 16
    assert first["meta.tasks_settings"]["fewshot"]["weights"] == first["meta.weights"]
    assert "- **weights**: step 0 (random initialisation); digest `" + first["meta.weights"] in _report(tmp_path)
    assert _other_settings(_report(tmp_path)) == []
    other = _net(1)
    m = evaluate(replace(cfg, tasks=["retrieval"]), loaded=other, progress=False)
    assert calls == {"fewshot": 1, "retrieval": 2}
    assert m["meta.weights"] != first["meta.weights"]
    assert _other_settings(_report(tmp_path)) == [f"  - `fewshot`: weights {first['meta.weights']}"]
    # asking for it again on these weights evaluates it: nothing is from other weights any more
    evaluate(replace(cfg, tasks=["fewshot"]), loaded=other, progress=False)
    assert calls == {"fewshot": 2, "retrieval": 2} and _other_settings(_report(tmp_path)) == []


def test_a_baseline_figure_goes_with_the_baseline_figures_it_belongs_to(store, tmp_path, loaded):
    cfg = replace(_cfg(store, tmp_path, baseline="random"), tasks=["tsne"])
    first = evaluate(cfg, loaded=loaded, progress=False)
    assert set(first["meta.figures"]) >= {"Fig. 3 — t-SNE of features", "Fig. 3 — t-SNE of features (random init)"}
    assert first["meta.task_figures"]["baseline.random.tsne"] == ["Fig. 3 — t-SNE of features (random init)"]
    # the run's t-SNE drawn again without the baseline: the baseline's figure is dropped with its task
    m = evaluate(replace(cfg, baseline=None, redo=True), loaded=loaded, progress=False)
    assert "baseline.random.tsne" not in m["meta.tasks_done"]
    assert "Fig. 3 — t-SNE of features (random init)" not in m["meta.figures"]
    assert "Fig. 3 — t-SNE of features" in m["meta.figures"]
    assert "tsne_random_init.png" not in _report(tmp_path)


def test_the_same_run_and_data_spelled_otherwise_continue_the_folder(store, tmp_path, loaded, calls, monkeypatch):
    cfg = _cfg(store, tmp_path)
    evaluate(cfg, loaded=loaded, progress=False)
    monkeypatch.chdir(tmp_path)  # relative spellings of the same folders
    m = evaluate(replace(cfg, run="run", data=os.path.relpath(store, tmp_path)), loaded=loaded, progress=False)
    assert calls == {"fewshot": 1, "retrieval": 1}  # nothing evaluated again
    assert set(m["meta.tasks_done"]) == {"fewshot", "retrieval"}
    assert m["meta.run"] == str(tmp_path / "run")  # recorded absolute: comparable from any folder
    # from another working folder, relative spellings of the same run and data continue it too
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    m = evaluate(replace(cfg, run="../run", data=os.path.relpath(store, tmp_path / "elsewhere"), out="../r"),
                 loaded=loaded, progress=False)
    assert calls == {"fewshot": 1, "retrieval": 1}


def test_a_relative_path_recorded_by_an_earlier_version_does_not_refuse_the_folder(store, tmp_path, loaded, calls,
                                                                                  monkeypatch):
    cfg = _cfg(store, tmp_path)
    evaluate(cfg, loaded=loaded, progress=False)
    path = tmp_path / "r" / "metrics.json"
    old = json.loads(path.read_text())
    path.write_text(json.dumps({**old, "meta.run": "runs/gone"}))  # relative, and names nothing from here
    evaluate(cfg, loaded=loaded, progress=False)
    assert calls == {"fewshot": 1, "retrieval": 1}  # the tasks' fingerprints match: kept
    path.write_text(json.dumps({**old, "meta.run": str(tmp_path / "another")}))  # absolute: another run
    with pytest.raises(FileExistsError, match="holds the report of another evaluation"):
        evaluate(cfg, loaded=loaded, progress=False)


def test_tasks_of_a_folder_written_before_the_settings_record_get_theirs_when_found_done(store, tmp_path, loaded):
    cfg = _cfg(store, tmp_path, baseline="random")
    evaluate(cfg, loaded=loaded, progress=False)
    path = tmp_path / "r" / "metrics.json"
    old = json.loads(path.read_text())
    del old["meta.tasks_settings"]
    path.write_text(json.dumps(old))
    m = evaluate(replace(cfg, tasks=["retrieval"]), loaded=loaded, progress=False)
    # retrieval was found done under this call's settings (same fingerprint); fewshot's are unknown
    assert set(m["meta.tasks_settings"]) == {"retrieval", "baseline.random.retrieval"}


def test_settings_differing_compares_each_recorded_setting_with_the_stated_one():
    from xmodal.eval.resume import baseline_seed_in_effect, settings_differing

    metrics = {
        "meta.views_used": [1, 12], "meta.point_subsets": 2, "meta.baseline_seed": 0, "meta.svm_solver": "auto",
        "meta.svm_Cs": [0.1, 1.0],
        "meta.tasks_done": {"svm": "a", "retrieval": "b", "baseline.random.svm": "c", "pretext": "d"},
        "meta.tasks_settings": {
            # other point subsets and another solver (the C grid is the same)
            "svm": {"views": [1, 12], "point_subsets": 1, "svm_solver": "newton", "svm_Cs": [0.1, 1.0]},
            "retrieval": {"views": [12], "point_subsets": 2},  # other views
            "baseline.random.svm": {"views": [1, 12], "point_subsets": 2, "baseline_seed": 0},  # the same
            "pretext": {"views": [1]},  # views differ, but not done any more: not listed
        },
    }
    metrics["meta.tasks_done"].pop("pretext")
    assert settings_differing(metrics) == {"svm": {"point_subsets": 1, "svm_solver": "newton"},
                                           "retrieval": {"views": [12]}}
    assert baseline_seed_in_effect(metrics) == 0
    unstated = {**metrics, "meta.baseline_seed": None}
    assert baseline_seed_in_effect(unstated) == 0 and "baseline.random.svm" not in settings_differing(unstated)


def test_weights_digest_ignores_options_at_the_value_older_runs_had():
    """A run saved before an option existed loads with the option at its neutral value: its digest
    must be what it was before the option was added; the option away from that value changes it."""
    import dataclasses

    from xmodal.eval.resume import _config_identity, weights_digest

    cfg = resolve_pretrain_config("smoke")
    before_the_field = dataclasses.asdict(cfg)  # the config as an older version's schema held it
    del before_the_field["loss"]["point_decorrelation"]
    assert _config_identity(before_the_field) == _config_identity(cfg)
    net = random_init_run(cfg, seed=0)
    on = replace(net, config=replace(cfg, loss=replace(cfg.loss, point_decorrelation=1.0)))
    assert weights_digest(on) != weights_digest(net)
    other = replace(net, config=replace(cfg, loss=replace(cfg.loss, point_nce=1.0)))  # not a neutral field
    assert weights_digest(other) != weights_digest(net)
