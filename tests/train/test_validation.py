"""Tests of the held-out learning curve (xmodal.train.validation) and its use in pretrain."""

import shutil

import numpy as np
import pytest

from xmodal.config import resolve
from xmodal.data.datasets import open_dataset
from xmodal.data.store import write_store
from xmodal.train.config import PretrainConfig, ValConfig
from xmodal.train.sampler import BatchSpec, PretrainBatches
from xmodal.train.trainer import pretrain
from xmodal.train.validation import Validator, cv_svm_accuracy, holdout_split
from xmodal.utils.io import read_json, read_jsonl


def _store(root, n=24, views=3, size=32, points=128, seed=0):
    """Two classes that differ in shape (flat vs round blobs) and in image brightness."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    pts = rng.normal(size=(n, points, 3)).astype(np.float32)
    pts[labels == 0, :, 2] *= 0.1
    pts /= np.linalg.norm(pts, axis=2).max(axis=1)[:, None, None]
    imgs = rng.integers(0, 80, size=(n, views, size, size)).astype(np.uint8)
    imgs[labels == 1] += 150
    split = {"ids": [f"o{i}" for i in range(n)], "labels": labels, "points": pts, "images": imgs}
    return write_store(root, classes=["flat", "round"], splits={"train": split}, up_axis="z")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("valdata")
    _store(root)
    return root


def test_holdout_split_is_disjoint_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [10, 20, 3, 1])
    tr, va = holdout_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
    assert [int((labels[va] == c).sum()) for c in range(4)] == [2, 4, 1, 0]  # a single object stays in training
    tr2, va2 = holdout_split(labels, 0.2, seed=0)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, holdout_split(labels, 0.2, seed=1)[1])


def test_cv_svm_accuracy_separable_and_degenerate():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    x = rng.normal(size=(30, 4)) + 5 * np.eye(3, 4)[y]
    assert cv_svm_accuracy(x, y, folds=3) == pytest.approx(1.0)
    noise = rng.normal(size=(30, 4))
    assert cv_svm_accuracy(noise, y, folds=3) < 0.8
    assert cv_svm_accuracy(x[:3], np.array([0, 1, 2])) is None  # no class with two members


def test_sampler_draws_only_the_given_objects(data):
    split = open_dataset(data).split("train")
    keep = np.array([1, 4, 6, 9, 13])
    spec = BatchSpec(batch_size=4, seed=0, num_points=32, image_size=32)
    ds = PretrainBatches(split, spec, stop=20, indices=keep)
    for s in range(20):
        p = ds.plan(s)
        assert np.isin(p.objects, keep).all() and np.isin(p.negatives, keep).all()
        assert (p.objects != p.negatives).all()
    everything = PretrainBatches(split, spec, stop=3, indices=np.arange(split.n))
    plain = PretrainBatches(split, spec, stop=3)
    for s in range(3):
        assert np.array_equal(everything.plan(s).objects, plain.plan(s).objects)
        assert np.array_equal(everything.plan(s).negatives, plain.plan(s).negatives)


def test_validator_scores_both_modalities(data):
    from xmodal.train.distributed import DistContext
    from xmodal.train.model import build_training_model

    cfg = resolve(PretrainConfig, "smoke", ["val.every=2", "val.fraction=0.5", "val.folds=2"], group="pretrain")
    net = build_training_model(cfg, DistContext())
    split = open_dataset(data).split("train")
    _, va = holdout_split(split.labels, 0.5, seed=0)
    out = Validator(split, va, cfg.val, num_points=64, seed=0)(net, DistContext().device, image_size=32)
    for key in ("val.svm3d", "val.retrieval3d.top1", "val.retrieval3d.top5", "val.retrieval3d.map",
                "val.svm2d", "val.retrieval2d.top1", "val_seconds"):
        assert key in out, key
    assert out["val.svm2d"] > 0.9  # the image classes differ in brightness: any encoder separates them
    assert net.training  # the mode is restored
    no_img = Validator(split, va, ValConfig(every=1, views=0), num_points=64, seed=0)
    assert "val.svm2d" not in no_img(net, DistContext().device, image_size=32)


def test_too_few_held_out_objects_per_class_are_warned_about(data, caplog):
    split = open_dataset(data).split("train")  # 24 objects, 2 classes
    for fraction, said in ((0.05, "one per class"), (0.25, "a median of 3 per class"), (0.5, None)):
        caplog.clear()
        _, va = holdout_split(split.labels, fraction, seed=0)
        with caplog.at_level("WARNING", logger="xmodal.train.validation"):
            Validator(split, va, ValConfig(every=1, views=0), num_points=64, seed=0)
        if said is None:
            assert caplog.text == ""
        else:
            assert f"holds out {len(va)} of the 24 training objects" in caplog.text and said in caplog.text


def test_pretrain_with_validation_logs_a_curve_and_never_trains_on_held_out(data, tmp_path, monkeypatch):
    seen = set()
    real_plan = PretrainBatches.plan

    def spy(self, step):
        p = real_plan(self, step)
        seen.update(p.objects.tolist() + p.negatives.tolist())
        return p

    monkeypatch.setattr(PretrainBatches, "plan", spy)
    cfg = resolve(PretrainConfig, "smoke", ["iterations=5", "val.every=2", "val.fraction=0.25", "val.views=2"],
                  group="pretrain")
    out = tmp_path / "run"
    pretrain(cfg.with_paths(data, out), progress=False)
    recs = read_jsonl(out / "metrics.jsonl")
    val_steps = [r["step"] for r in recs if "val.svm3d" in r]
    assert val_steps == [0, 2, 4, 5]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5]
    _, va = holdout_split(open_dataset(data).split("train").labels, 0.25, seed=cfg.seed)
    assert seen and not seen & set(va.tolist())
    info = read_json(out / "run.json")
    assert info["objects_held_out"] == len(va) and info["objects_trained_on"] == 24 - len(va)


def test_a_run_resumed_before_its_first_checkpoint_logs_step_0_once(data, tmp_path):
    # a run stopped before any checkpoint starts again at step 0: its step-0 validation is not doubled
    cfg = resolve(PretrainConfig, "smoke", ["iterations=2", "val.every=2", "val.fraction=0.25", "val.views=2"],
                  group="pretrain")
    out = tmp_path / "run"
    pretrain(cfg.with_paths(data, out), progress=False)
    shutil.rmtree(out / "checkpoints")
    for name in ("encoders.json", "encoders.safetensors"):
        (out / name).unlink()
    pretrain(cfg.with_paths(data, out), resume=True, progress=False)
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs if "val.svm3d" in r] == [0, 2]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]

