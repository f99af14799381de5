"""The evaluate job end to end on a tiny synthetic store, and the Markdown report."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from xmodal.api import random_init_run
from xmodal.data.store import ShapeStore, write_store
from xmodal.eval.config import EvaluateConfig, FewShotConfig, PartSegConfig, SvmConfig
from xmodal.eval.descriptors import d2_descriptor
from xmodal.eval.report import DASH, TABLE_HEADERS, render_report
from xmodal.eval.retrieval import PSB_STATS, psb_statistics, retrieval_metrics
from xmodal.errors import ConfigError, DataError
from xmodal.eval.runner import evaluate, resolve_tasks
from xmodal.train.config import resolve_pretrain_config
from xmodal.utils.lock import LOCK_NAME

CLASSES = ["cone", "cube", "ring", "rod"]
V, S, N = 6, 32, 64


def _split(n_per: int, seed: int, *, images: bool) -> dict:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(CLASSES)), n_per)
    dirs = rng.normal(size=(y.size, N, 3))
    dirs /= np.linalg.norm(dirs, axis=2, keepdims=True)
    # class = radius and elongation of a noisy ellipsoid
    pts = dirs * (0.3 + 0.2 * y)[:, None, None] * np.array([1.0, 1.0, 1.0])
    pts[..., 2] *= 1.0 + y[:, None]
    pts += 0.01 * rng.normal(size=pts.shape)
    out = {"ids": [f"{CLASSES[c]}/{seed}_{i:03d}" for i, c in enumerate(y)], "labels": y, "points": pts.astype(np.float32)}
    if images:
        im = rng.integers(0, 30, size=(y.size, V, S, S)).astype(np.uint8)
        for i, c in enumerate(y):
            for v in range(V):
                o = 2 + 6 * c + rng.integers(0, 3)
                im[i, v, o : o + 6, 4 + v : 20 + v] = 220  # class-dependent bright bar
        out["images"] = im
        out["cameras"] = rng.uniform(0, 180, size=(y.size, V, 2)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    write_store(root, classes=CLASSES, splits={"train": _split(8, 0, images=True), "test": _split(5, 1, images=True)})
    return root


@pytest.fixture(scope="module")
def points_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pstore")
    write_store(root, classes=CLASSES, splits={"train": _split(8, 2, images=False), "test": _split(5, 3, images=False)})
    return root


def _part_labelled_store(root):
    """A points-only store whose clouds carry part labels (two parts per class)."""
    splits = {"train": _split(3, 4, images=False), "test": _split(2, 5, images=False)}
    for sp in splits.values():  # two parts per class: the upper and lower half of each cloud
        sp["point_labels"] = (2 * sp["labels"][:, None] + (sp["points"][..., 2] > 0)).astype(np.int16)
    parts = [f"{c}/{p}" for c in CLASSES for p in ("bottom", "top")]
    write_store(root, classes=CLASSES, splits=splits, part_names=parts)
    return root


# ------------------------------------------------------------------ a run


@pytest.fixture
def loaded():
    """A LoadedRun: the smoke config's networks at random initialisation (32 px images, k = 8)."""
    return random_init_run(resolve_pretrain_config("smoke", ["data.num_points=48"]), seed=0, device="cpu")


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as fh:
        for step in range(0, 50, 5):
            fh.write(json.dumps({"step": step, "loss": 3.0 / (1 + step), "triplet": 1.0, "cross": 2.0, "cm_acc": 0.5}) + "\n")
    return run


# ------------------------------------------------------------------ tests


def test_evaluate_end_to_end_with_baseline(image_store, run_dir, tmp_path, loaded):
    out = tmp_path / "report"
    cfg = EvaluateConfig(
        run=run_dir, data=image_store, out=out, baseline="random", views=[1, 3, 80], device="cpu",
        fewshot=FewShotConfig(settings=[(2, 3), (4, 2)], episodes=3), svm=SvmConfig(cs=[0.01, 1.0]),
    )
    m = evaluate(cfg, loaded=loaded, progress=False)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(on_disk) == set(m)
    assert m["meta.views_used"] == [1, 3, V]
    assert m["meta.tasks_run"] == ["pretext", "svm", "retrieval", "fewshot", "crossmodal", "tsne", "partseg"]
    assert "partseg" in m["meta.tasks_skipped"] and "part labels" in m["meta.tasks_skipped"]["partseg"]
    expected = [
        "pretext.cm_accuracy", "pretext.cv_pos_mean", "pretext.cv_pos_std", "pretext.cv_neg_mean", "pretext.cv_neg_std",
        "svm3d.accuracy", "svm3d.C", "svm3d.cv_score",
        *(f"svm2d.{k}.{v}" for k in ("accuracy", "C") for v in (1, 3, V)),
        *(f"retrieval3d.top{k}" for k in (1, 5, 10, 20, 50)), "retrieval3d.map",
        *(f"retrieval2d.{v}.top{k}" for v in (1, 3, V) for k in (1, 5, 10, 20, 50)),
        *(f"retrieval3d.{k}" for k in PSB_STATS), *(f"retrieval2d.{v}.{k}" for v in (1, 3, V) for k in PSB_STATS),
        "fewshot3d.2w3s.mean", "fewshot3d.4w2s.std", "fewshot2d.2w3s.mean",
        *(f"crossmodal.{d}.top{k}" for d in ("img2shape", "shape2img") for k in (1, 5, 10)),
        "crossmodal.img2shape.exact1",
    ]
    for key in expected:
        assert key in m, key
        assert "baseline.random." + key in m, key
    assert m["pretext.num_pairs"] == 10 * 5 * len(CLASSES)
    for key in expected:
        if "accuracy" in key or ".top" in key or key.startswith("retrieval"):
            assert 0.0 <= m[key] <= 1.0, key
    assert m["retrieval3d.top50"] == 1.0  # the gallery (19 others) holds every class
    # the D2 reference: computed once from the stored test clouds, not a network (no baseline copy)
    test = ShapeStore(image_store).split("test")
    d2 = d2_descriptor(test.all_points(), seed=0)
    want = {**retrieval_metrics(d2, test.labels), **psb_statistics(d2, test.labels, class_names=CLASSES)}
    assert {k: m[f"reference.d2.retrieval3d.{k}"] for k in want} == pytest.approx(want)
    assert not any(k.startswith("baseline.random.reference.") for k in m)
    assert m["svm3d.accuracy"] > 0.5  # classes differ in size and shape (chance 0.25)
    report = (out / "report.md").read_text()
    for header in TABLE_HEADERS:
        assert header in report, header
    assert "random init" in report and "89.8" in report  # baseline column and a paper number
    assert "### Princeton Shape Benchmark statistics" in report and "| D2 (no learning) |" in report
    for png in ("tsne.png", "tsne_random_init.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in report
    assert [p.name for p in out.glob(".*")] == [LOCK_NAME]  # no temporary files left behind, only the lock


def test_random_baseline_is_the_runs_own_initial_weights_unless_seeded(points_store, run_dir, tmp_path, monkeypatch):
    import xmodal.eval.runner as runner

    digests = []  # the weights evaluated: the run's, then the baseline's
    real = runner.weights_digest
    monkeypatch.setattr(runner, "weights_digest", lambda net: digests.append(real(net)) or digests[-1])
    # a "run" whose weights are those of its config's random init at its own training seed, 5
    start = random_init_run(resolve_pretrain_config("smoke", ["data.num_points=48", "seed=5"]), seed=5, device="cpu")
    cfg = EvaluateConfig(run=run_dir, data=points_store, out=tmp_path / "a", tasks=["retrieval"], baseline="random",
                         device="cpu")
    m = evaluate(cfg, loaded=start, progress=False)
    assert m["meta.baseline_seed"] == 5 and m["meta.run_seed"] == 5
    assert len(digests) == 2 and digests[0] == digests[1]  # the baseline is the run's start itself
    assert "the very weights it started from" in (tmp_path / "a" / "report.md").read_text()
    digests.clear()
    m = evaluate(replace(cfg, out=str(tmp_path / "b"), baseline_seed=6), loaded=start, progress=False)
    assert m["meta.baseline_seed"] == 6 and m["meta.run_seed"] == 5
    assert len(digests) == 2 and digests[0] != digests[1]
    assert "the very weights it started from" not in (tmp_path / "b" / "report.md").read_text()


def test_point_subsets_average_the_3d_features(points_store, run_dir, tmp_path, loaded, monkeypatch):
    import xmodal.eval.features as features

    subsets_asked, computed = [], []
    real = features.point_features

    def recorded(*a, **kw):
        subsets_asked.append(kw["subsets"])
        computed.append(real(*a, **kw))
        return computed[-1]

    monkeypatch.setattr(features, "point_features", recorded)
    cfg = EvaluateConfig(run=run_dir, data=points_store, out=tmp_path / "r", tasks=["retrieval"], device="cpu")
    one = evaluate(cfg, loaded=loaded, progress=False)
    two = evaluate(replace(cfg, point_subsets=2), loaded=loaded, progress=False)  # same folder: evaluated again
    assert subsets_asked == [1, 2]  # the test split (retrieval's gallery), once per setting
    assert one["meta.point_subsets"] == 1 and two["meta.point_subsets"] == 2
    assert not np.allclose(computed[0], computed[1])  # 64 stored points, 48 per subset: other features
    report = (tmp_path / "r" / "report.md").read_text()
    assert "mean of Fp over 2 seeded subsets" in report
    assert "meta.baseline_seed" not in two  # no baseline asked


def test_point_subsets_without_subsampling_are_one_encoding(points_store, run_dir, tmp_path, caplog):
    whole = random_init_run(resolve_pretrain_config("smoke", [f"data.num_points={N}"]), seed=0, device="cpu")
    cfg = EvaluateConfig(run=run_dir, data=points_store, out=tmp_path / "r", tasks=["retrieval"], device="cpu",
                         point_subsets=3)
    m = evaluate(cfg, loaded=whole, progress=False)
    assert m["meta.point_subsets"] == 1 and "has no effect" in caplog.text
    assert "mean of Fp" not in (tmp_path / "r" / "report.md").read_text()


def test_points_only_dataset_skips_image_tasks(points_store, run_dir, tmp_path, loaded):
    out = tmp_path / "r"
    cfg = EvaluateConfig(run=run_dir, data=points_store, tasks=["pretext", "svm", "retrieval", "crossmodal"], out=out,
                         device="cpu", svm=SvmConfig(cs=[1.0]))
    m = evaluate(cfg, loaded=loaded, progress=False)
    sk = m["meta.tasks_skipped"]
    for task in ("pretext", "svm2d", "retrieval2d", "crossmodal"):
        assert "no images" in sk[task], task
    assert "svm3d.accuracy" in m and "retrieval3d.top1" in m and "retrieval3d.dcg" in m
    assert "reference.d2.retrieval3d.nn" in m
    assert not any(k.startswith(("svm2d.", "retrieval2d.", "pretext.", "crossmodal.")) for k in m)
    assert m["meta.views_used"] == []
    report = (out / "report.md").read_text()
    assert "no images" in report


def test_tasks_run_one_at_a_time_are_merged(points_store, run_dir, tmp_path, loaded):
    out = tmp_path / "r"
    cfg = EvaluateConfig(run=run_dir, data=points_store, tasks=["svm"], out=out, device="cpu", svm=SvmConfig(cs=[1.0]))
    evaluate(cfg, loaded=loaded, progress=False)
    m = evaluate(replace(cfg, tasks=["retrieval"]), loaded=loaded, progress=False)
    assert "svm3d.accuracy" in m and "retrieval3d.top1" in m
    assert m["meta.tasks_run"] == ["svm", "retrieval"]
    setup = (out / "report.md").read_text()
    assert "**SVM (Table 2)**" in setup and "**retrieval (Table 3)**" in setup
    assert "**pretext (Table 1)**" not in setup and "**few-shot**" not in setup  # only the protocols of tasks run
    # another seed is another evaluation: refused before anything is written, replaced on request
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK_NAME}
    with pytest.raises(FileExistsError, match=r"holds the report of another evaluation \(seed: 0 there, 1 here\)") as e:
        evaluate(replace(cfg, tasks=["retrieval"], seed=1), loaded=loaded, progress=False)
    assert "--overwrite" in e.value.hint
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK_NAME} == before
    (out / "tsne.png").write_bytes(b"a figure of the old evaluation")
    (out / "notes.txt").write_text("the user's own file")
    old = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({**old, "meta.figures": {"t-SNE": "tsne.png"}}))
    m = evaluate(replace(cfg, tasks=["retrieval"], seed=1, overwrite=True), loaded=loaded, progress=False)
    assert "svm3d.accuracy" not in m and m["meta.seed"] == 1
    assert not (out / "tsne.png").exists() and (out / "notes.txt").read_text() == "the user's own file"


def test_resolve_tasks():
    assert resolve_tasks(["svm", "pretext"]) == ["pretext", "svm"]
    assert len(resolve_tasks(("all",))) == 7
    with pytest.raises(ValueError, match="unknown evaluation task 'svn'"):
        resolve_tasks(["svn"])


def test_report_lays_out_paper_tables():
    metrics = {
        "svm3d.accuracy": 0.9, "svm3d.C": 0.1, "baseline.random.svm3d.accuracy": 0.7,
        "svm2d.accuracy.12": 0.8, "svm2d.C.12": 1.0,
        "retrieval3d.top1": 0.85, "retrieval3d.top50": 0.99,
        **{f"retrieval3d.{k}": 0.5 + 0.1 * i for i, k in enumerate(PSB_STATS)},
        **{f"baseline.random.retrieval3d.{k}": 0.25 for k in PSB_STATS},
        **{f"reference.d2.retrieval3d.{k}": 0.125 for k in PSB_STATS}, "reference.d2.retrieval3d.top1": 0.375,
        "partseg.frozen.100.oa": 0.91, "partseg.frozen.100.class_miou": 0.7, "partseg.frozen.100.instance_miou": 0.8,
        "partseg.scratch.2.oa": 0.85, "partseg.scratch.2.class_miou": 0.5, "partseg.scratch.2.instance_miou": 0.6,
        "partseg.finetune.2.oa": 0.86, "partseg.finetune.2.class_miou": 0.55, "partseg.finetune.2.instance_miou": 0.65,
        "meta.tasks_skipped": {"pretext": "the dataset has no images"},
    }
    text = render_report(metrics, figures={"Fig": "f.png"})
    for header in TABLE_HEADERS:
        assert header in text
    lines = text.splitlines()
    row3d = next(line for line in lines if line.startswith("| 3D (Fp)"))
    assert "| 90.0 | 70.0 | +20.0 |" in row3d and "87.5" in row3d and "89.8" in row3d
    psb = lines[lines.index("### Princeton Shape Benchmark statistics (%)") + 2:]
    assert psb[0] == "| network | views | NN | FT | ST | E | DCG |"
    assert psb[2:5] == [
        "| Fp (ours) | — | 50.0 | 60.0 | 70.0 | 80.0 | 90.0 |",
        "| Fp (random init) | — | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 |",
        "| D2 (no learning) | — | 12.5 | 12.5 | 12.5 | 12.5 | 12.5 |",
    ]
    assert next(line for line in lines if line.startswith("| D2 (no learning) | — | 37.5 |"))  # beside top-K
    row = next(line for line in lines if line.startswith("| frozen | 100%"))
    assert "| 91.0 | 70.0 | 80.0 | CM-CV-Frozen | 92.1 | 74.7 | 80.8 |" in row
    row = next(line for line in lines if line.startswith("| finetune | 2%"))
    assert "88.3" in row and row.rstrip(" |").endswith("+5.0")  # Δ instance mIoU vs scratch
    assert "the dataset has no images" in text
    assert "![Fig](f.png)" in text


def test_report_table4_face_accuracy_and_one_shape_per_category():
    metrics = {
        "partseg.scratch.2.oa": 0.5, "partseg.scratch.2.class_miou": 0.4, "partseg.scratch.2.instance_miou": 0.45,
        "partseg.scratch.2.face_accuracy": 0.612,
        "partseg.scratch.100.oa": 0.8, "partseg.scratch.100.class_miou": 0.7, "partseg.scratch.100.instance_miou": 0.75,
        "partseg.scratch.100.face_accuracy": 0.834,
        "partseg.2.n_train": 19, "partseg.2.one_per_category": True,
        "partseg.100.n_train": 95, "partseg.100.one_per_category": False,
    }
    lines = render_report(metrics).splitlines()
    header = next(line for line in lines if line.startswith("| setting | training data"))
    assert "| instance mIoU | face acc. | paper row |" in header
    assert "| scratch | 2% (19 shapes) † | 50.0 | 40.0 | 45.0 | 61.2 | Supervised |" in "\n".join(lines)
    assert "| scratch | 100% (95 shapes) | 80.0 | 70.0 | 75.0 | 83.4 | Supervised |" in "\n".join(lines)
    note = next(line for line in lines if line.startswith("† 2%"))
    assert "one shape" in note and "19 training shapes" in note
    assert not any(line.startswith("† 100%") for line in lines)
    # data without meshes: no face column
    plain = {k: v for k, v in metrics.items() if not k.endswith("face_accuracy")}
    assert "face acc." not in render_report(plain)


def test_report_table4_keeps_fractions_below_one_percent_and_between_whole_percents():
    # partseg.fractions=[0.005, 0.025, 0.02] write the percent keys "0.5", "2.5" and "2"
    # (percent_key); every one is a row, in percent, and only a whole percent the paper
    # reports (2 %) is compared with the paper
    from xmodal.eval.partseg import percent_key

    metrics = {}
    for fraction in (0.005, 0.025, 0.02):
        pct = percent_key(fraction)
        metrics.update({f"partseg.scratch.{pct}.oa": 0.5, f"partseg.scratch.{pct}.class_miou": 0.4,
                        f"partseg.scratch.{pct}.instance_miou": 0.45})
    metrics.update({"partseg.0.5.n_train": 3, "partseg.0.5.one_per_category": True})
    lines = render_report(metrics).splitlines()
    rows = {line.split("|")[2].strip(): line for line in lines if line.startswith("| scratch |")}
    assert set(rows) == {"0.5% (3 shapes) †", "2.5%", "2%"}
    for label in ("0.5% (3 shapes) †", "2.5%"):  # no paper figures: three dashes, and the Δ column's
        assert "| 50.0 | 40.0 | 45.0 | Supervised |" in rows[label] and rows[label].count(DASH) == 4
    assert rows["2%"].count(DASH) == 1  # the paper's 2 % figures filled in
    assert any(line.startswith("† 0.5% of the train split") and "3 training shapes" in line for line in lines)


def test_report_states_the_settings_each_kept_figure_was_made_under():
    """Few-shot and part-segmentation settings are read from the task's own record, not the
    latest call's; the pretext view pool and the data's adaptation to the run are stated."""
    metrics = {
        "fewshot3d.5way10shot.mean": 0.8, "pretext.cm_accuracy": 0.7, "pretext.num_pairs": 40,
        "pretext.view_pool": 12,
        "partseg.scratch.100.oa": 0.8, "partseg.scratch.100.class_miou": 0.7,
        "partseg.scratch.100.instance_miou": 0.75, "partseg.100.n_train": 42,
        "meta.fewshot_query": 20, "meta.fewshot_episodes": 10,  # the latest call's, which evaluated neither
        "meta.tasks_done": {"fewshot": "f", "partseg": "p"},
        "meta.tasks_settings": {
            "fewshot": {"fewshot_query": 3, "fewshot_episodes": 2},
            "partseg": {"partseg": {"epochs": 1, "batch_size": 16, "lr": 0.003, "step_epochs": 20, "gamma": 0.1,
                                    "num_points": 256, "augment": True, "finetune_point_bn": "train"}},
        },
        "meta.data_notes": ["images are 32 px but the run was trained on 64 px; they are resized to the run's size"],
    }
    text = render_report(metrics)
    assert "3 queries per class (fewer if unavailable), 2 episodes" in text
    assert "**part segmentation (Table 4)**: 1 epochs of Adam, batch 16, lr 0.003 (x0.1 every 20 epochs), " \
           "256 points per shape" in text
    assert "pool of 12 seeded random stored views" in text
    assert "**data adapted to the run**: images are 32 px but the run was trained on 64 px" in text
    # stated once, as the figures' own: not also listed as differing from the latest call's
    assert "evaluated by an earlier call under other settings" not in text


def test_encoders_of_a_run_extended_and_unfinished_are_named_so(tmp_path):
    from types import SimpleNamespace

    from xmodal.eval.runner import _weights_meta

    # what load_run gives for encoders of step 2 beside a last checkpoint of step 5
    loaded = SimpleNamespace(step=2, source="final", path=tmp_path, later_checkpoint=5)
    meta = _weights_meta(loaded, "ab" * 32)
    assert meta == {"meta.run_step": 2, "meta.run_source": "final", "meta.weights": "ab" * 8,
                    "meta.run_checkpoint_step": 5}
    text = render_report(meta)
    assert "step 2 (the encoders of the run before it was extended: **its last checkpoint is at step 5**" in text
    finished = _weights_meta(SimpleNamespace(step=5, source="final", path=tmp_path, later_checkpoint=None), "ab" * 32)
    assert "meta.run_checkpoint_step" not in finished
    assert "step 5 (the finished run's encoders)" in render_report(finished)


def test_partseg_runs_on_a_part_labelled_store(tmp_path, run_dir, loaded):
    root = _part_labelled_store(tmp_path / "parts")
    cfg = EvaluateConfig(
        run=run_dir, data=root, tasks=["partseg"], out=tmp_path / "r", device="cpu",
        partseg=PartSegConfig(settings=["frozen"], fractions=[1.0], epochs=1, batch_size=4),
    )
    m = evaluate(cfg, loaded=loaded, progress=False)
    for k in ("oa", "class_miou", "instance_miou"):
        assert 0.0 <= m[f"partseg.frozen.100.{k}"] <= 1.0
    report = (tmp_path / "r" / "report.md").read_text()
    assert f"| frozen | 100% ({m['partseg.100.n_train']} shapes) |" in report and "CM-CV-Frozen" in report
    assert "**part segmentation (Table 4)**: 1 epochs of Adam, batch 4, lr 0.003" in report


def test_registry_prefixes_cover_every_key_a_task_writes(image_store, run_dir, tmp_path, loaded, monkeypatch):
    """Each task writes only under its registry prefixes (what a merge replaces), and each task
    with prefixes writes something."""
    from xmodal.eval.context import EvalContext
    from xmodal.eval.tasks import TASKS, get_task

    written = []
    real_put = EvalContext.put
    monkeypatch.setattr(EvalContext, "put", lambda self, k, v: written.append((self.task, k)) or real_put(self, k, v))
    cfg = EvaluateConfig(
        run=run_dir, data=image_store, out=tmp_path / "r", views=[1, 3], device="cpu", svm=SvmConfig(cs=[1.0]),
        fewshot=FewShotConfig(settings=[(2, 3)], episodes=2), partseg_data=_part_labelled_store(tmp_path / "parts"),
        partseg=PartSegConfig(settings=["frozen"], fractions=[1.0], epochs=1, batch_size=4),
    )
    m = evaluate(cfg, loaded=loaded, progress=False)
    assert m["meta.tasks_run"] == [t.name for t in TASKS] and not m["meta.tasks_skipped"]
    for task, key in written:
        assert key.startswith(get_task(task).prefixes), (task, key)
    assert {t for t, _ in written} == {t.name for t in TASKS if t.prefixes}
    assert m["meta.figures"]["Fig. 3 — t-SNE of features"] == "tsne.png"  # tsne writes a figure, no keys


def test_evaluate_writes_its_resolved_config_beside_the_report(points_store, run_dir, tmp_path, loaded):
    from xmodal.config import load_config
    from xmodal.eval.runner import CONFIG_NAME

    cfg = EvaluateConfig(run=run_dir, data=points_store, tasks=["svm"], out=tmp_path / "r", device="cpu",
                         seed=3, svm=SvmConfig(cs=[0.01, 1.0]))
    m = evaluate(cfg, loaded=loaded, progress=False)
    saved = load_config(EvaluateConfig, tmp_path / "r" / CONFIG_NAME)
    assert saved == cfg and saved.out == str(tmp_path / "r")
    assert m["meta.svm_Cs"] == [0.01, 1.0] and m["svm3d.C"] in (0.01, 1.0)
    assert [p.name for p in (tmp_path / "r").glob(".*")] == [LOCK_NAME]


def test_svm_solver_reaches_every_fit_and_the_report_names_it(points_store, run_dir, tmp_path, loaded, monkeypatch):
    from xmodal.eval.linear_svm import SquaredHingeSVC

    solvers = []
    real_fit = SquaredHingeSVC.fit
    monkeypatch.setattr(SquaredHingeSVC, "fit", lambda self, X, y: solvers.append(self.solver) or real_fit(self, X, y))
    cfg = EvaluateConfig(run=run_dir, data=points_store, tasks=["svm"], out=tmp_path / "r", device="cpu",
                         svm=SvmConfig(cs=[0.01, 1.0], solver="newton"))
    m = evaluate(cfg, loaded=loaded, progress=False)
    assert m["meta.svm_solver"] == "newton" and solvers and set(solvers) == {"newton"}  # the folds and the refit
    assert m["meta.tasks_settings"]["svm"]["svm_solver"] == "newton"
    assert m["meta.tasks_settings"]["svm"]["svm_Cs"] == [0.01, 1.0]
    assert "solved exactly by Newton's method (with more samples" in (tmp_path / "r" / "report.md").read_text()


def test_table3_columns_follow_the_evaluated_ks():
    """retrieval.ks=[1,3]: Table 3 shows Top1 and Top3 (the paper's row only where it has that K)."""
    metrics = {"retrieval3d.top1": 0.5, "retrieval3d.top3": 0.75, "retrieval3d.map": 0.25}
    lines = render_report(metrics).splitlines()
    table = lines[lines.index("## Table 3 — 2D and 3D shape retrieval (top-K accuracy, %)") + 2:]
    assert table[0] == "| network | views | Top1 | Top3 | mAP |"
    assert table[2] == "| Fp (ours) | — | 50.0 | 75.0 | 25.0 |"
    paper = next(line for line in table if line.startswith("| paper "))
    cells = [c.strip() for c in paper.strip("| ").split("|")]
    assert float(cells[2]) > 0 and cells[3] == DASH  # the paper reports top-1, not top-3


def test_evaluate_warns_when_clouds_differ_from_the_runs_point_count(points_store, run_dir, tmp_path, loaded, caplog):
    """The run was trained on 48 points; the store holds N: the subset used is said in a warning."""
    cfg = EvaluateConfig(run=run_dir, data=points_store, tasks=["retrieval"], out=tmp_path / "r", device="cpu")
    with caplog.at_level("WARNING", logger="xmodal.eval.runner"):
        evaluate(cfg, loaded=loaded, progress=False)
    line = next(r.getMessage() for r in caplog.records if "points but the run was trained on" in r.getMessage())
    assert line == (f"{points_store}: clouds have {N} points but the run was trained on {loaded.num_points}; "
                    f"a seeded subset of {loaded.num_points} points of each cloud is used")


def test_no_point_count_warning_when_only_partseg_data_is_read(points_store, run_dir, tmp_path, loaded, caplog):
    """`--task partseg --partseg-data D` never reads the clouds of `--data`: no warning about them."""
    parts = _part_labelled_store(tmp_path / "parts")
    cfg = EvaluateConfig(
        run=run_dir, data=points_store, tasks=["partseg"], partseg_data=str(parts), out=tmp_path / "r", device="cpu",
        partseg=PartSegConfig(settings=["frozen"], fractions=[1.0], epochs=1, batch_size=4),
    )
    with caplog.at_level("WARNING", logger="xmodal.eval.runner"):
        m = evaluate(cfg, loaded=loaded, progress=False)
    assert "partseg.frozen.100.instance_miou" in m
    assert "points but the run was trained on" not in caplog.text


def test_partseg_data_alone_needs_no_test_split_in_data(run_dir, tmp_path, loaded):
    """`--data` names a store of training objects only: part segmentation on `--partseg-data` still runs."""
    train_only = tmp_path / "train-only"
    write_store(train_only, classes=CLASSES, splits={"train": _split(4, 2, images=False)})
    parts = _part_labelled_store(tmp_path / "parts")
    kw = dict(run=run_dir, data=train_only, out=tmp_path / "r", device="cpu",
              partseg=PartSegConfig(settings=["frozen"], fractions=[1.0], epochs=1, batch_size=4))
    m = evaluate(EvaluateConfig(tasks=["partseg"], partseg_data=str(parts), **kw), loaded=loaded, progress=False)
    assert "partseg.frozen.100.instance_miou" in m
    with pytest.raises(DataError, match="no 'test' split"):  # a task that reads --data's test split
        evaluate(EvaluateConfig(tasks=["svm"], **kw), loaded=loaded, progress=False)


def test_partseg_data_alone_needs_no_data_at_all(run_dir, points_store, tmp_path, loaded, monkeypatch):
    """`--task partseg --partseg-data D` without `--data`: it runs; any task that reads `data` needs it.
    Its figures do not depend on `data`, so calls with and without it continue one report folder."""
    import xmodal.eval.partseg as partseg_mod

    parts = _part_labelled_store(tmp_path / "parts")
    kw = dict(run=run_dir, out=tmp_path / "r", device="cpu",
              partseg=PartSegConfig(settings=["frozen"], fractions=[1.0], epochs=1, batch_size=4))
    key = "partseg.frozen.100.instance_miou"
    m = evaluate(EvaluateConfig(tasks=["partseg"], partseg_data=str(parts), **kw), loaded=loaded, progress=False)
    assert key in m and m["meta.data"] is None and m["meta.dataset"] is None
    assert "**splits**" not in (tmp_path / "r" / "report.md").read_text()
    # from here on part segmentation must not run again: its figures are kept
    monkeypatch.setattr(partseg_mod, "run_partseg", lambda *a, **k: pytest.fail("part segmentation ran again"))
    again = evaluate(EvaluateConfig(tasks=["partseg"], partseg_data=str(parts), **kw), loaded=loaded, progress=False)
    assert again[key] == m[key]
    # with --data and a task that reads it, into the same folder: partseg kept, svm added
    both = evaluate(EvaluateConfig(tasks=["partseg", "svm"], partseg_data=str(parts), data=points_store, **kw),
                    loaded=loaded, progress=False)
    assert both[key] == m[key] and "svm3d.accuracy" in both and both["meta.data"] == str(points_store)
    # without --data again: the svm figures and the description of their data stay
    last = evaluate(EvaluateConfig(tasks=["partseg"], partseg_data=str(parts), **kw), loaded=loaded, progress=False)
    assert last["svm3d.accuracy"] == both["svm3d.accuracy"] and last["meta.data"] == str(points_store)
    assert last["meta.dataset"] == both["meta.dataset"] and last["meta.dataset"]["classes"] == len(CLASSES)
    for tasks, partseg_data in ((["partseg", "svm"], str(parts)), (["partseg"], None)):
        with pytest.raises(ConfigError, match="data: required") as err:
            evaluate(EvaluateConfig(tasks=tasks, partseg_data=partseg_data, **kw), loaded=loaded, progress=False)
        assert "partseg_data" in err.value.hint
