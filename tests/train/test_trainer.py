"""End-to-end pre-training on tiny synthetic stores (CPU, seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import xmodal.train.step
from xmodal.config import ConfigError, load_config, resolve, save_config
from xmodal.data.store import write_store
from xmodal.train.checkpoint import checkpoint_paths, load_checkpoint
from xmodal.train.config import PretrainConfig
from xmodal.errors import MissingInputError
from xmodal.train.trainer import TrainingDiverged, pretrain
from xmodal.utils.io import read_json, read_jsonl


def _store(root, n=6, views=4, size=32, points=128, seed=0):
    """Objects with a per-object image pattern (shifted per view) and a per-object blob shape."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = np.empty((n, views, size, size), np.uint8)
    for i in range(n):
        fx, fy = rng.uniform(1, 4, 2)
        for v in range(views):
            base = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy + rng.uniform(0, 0.5)))
            imgs[i, v] = np.clip(base * 255 + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
    pts = (rng.normal(size=(n, points, 3)) * rng.uniform(0.2, 1.0, size=(n, 1, 3))).astype(np.float32)
    train = {"ids": [f"o{i}" for i in range(n)], "labels": np.arange(n) % 2, "points": pts, "images": imgs}
    return write_store(root, classes=["a", "b"], splits={"train": train}, up_axis="y")


def _cfg(*overrides) -> PretrainConfig:
    return resolve(PretrainConfig, "smoke", list(overrides), group="pretrain")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _store(root)
    return root


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """6 smoke steps, checkpoint every 3."""
    out = tmp_path_factory.mktemp("runs") / "full"
    summary = pretrain(_cfg().with_paths(data, out), progress=False)
    return out, summary


def _losses(run):
    return np.array([[r["loss"], r["triplet"], r["cross"]] for r in read_jsonl(run / "metrics.jsonl")])


def test_run_folder_contents(full_run, data):
    out, summary = full_run
    assert summary["steps"] == 6 and summary["world_size"] == 1 and summary["final"]["step"] == 6
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        assert {"loss", "triplet", "cross", "cm_acc", "lr", "time", "samples_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and 0 <= r["cm_acc"] <= 1 and r["lr"] == pytest.approx(0.001)
        assert r["loss"] == pytest.approx(r["triplet"] + 1.0 * r["cross"], rel=1e-5)
    run = read_json(out / "run.json")
    assert run["world_size"] == 1 and run["manifest"]["up_axis"] == "y" and "torch_version" in run
    assert run["manifest"]["counts"] == {"train": 6}
    assert (out / "config.yaml").read_text().count("image_size: 32") == 1
    ckpt = load_checkpoint(out)
    assert ckpt.step == 6 and any(k.startswith("optim/") for k in ckpt.tensors)
    assert ckpt.state["scheduler"]["last_epoch"] == 6
    enc = read_json(out / "encoders.json")
    assert enc["step"] == 6 and enc["up_axis"] == "y" and enc["num_points"] == 128 and enc["image_size"] == 32
    assert enc["architecture"]["point_encoder"] == {"name": "dgcnn", "kwargs": {"k": 8}}


def test_exact_resume(full_run, data, tmp_path):
    ref = _losses(full_run[0])
    out = tmp_path / "resumed"
    pretrain(_cfg("iterations=3").with_paths(data, out), progress=False)
    assert load_checkpoint(out).step == 3
    # as if the first run had logged step 4 and died before its next checkpoint
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 4, "loss": 123.0, "triplet": 0, "cross": 0}) + "\n")
    s = pretrain(_cfg("iterations=6").with_paths(data, out), resume=True, progress=False)
    assert s["start_step"] == 3 and s["steps"] == 6
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(_losses(out), ref, rtol=1e-6, atol=1e-7)
    assert read_json(out / "run.json")["resumed"][0]["from_step"] == 3
    # resuming a finished run is a no-op that keeps its files
    s2 = pretrain(_cfg("iterations=6").with_paths(data, out), resume=True, progress=False)
    assert s2["start_step"] == 6 and len(read_jsonl(out / "metrics.jsonl")) == 6


def test_amp_auto_resolves_per_machine_and_a_resume_elsewhere_is_recorded(data, tmp_path, monkeypatch, caplog):
    """amp=auto is bf16 only on a CPU with native bfloat16; run.json says what each leg used."""
    import xmodal.train.model as model_mod

    out = tmp_path / "auto"
    monkeypatch.setattr(model_mod, "cpu_has_native_bf16", lambda: True)
    pretrain(_cfg("amp=auto", "iterations=2").with_paths(data, out), progress=False)
    assert read_json(out / "run.json")["amp"] == "bfloat16"
    monkeypatch.setattr(model_mod, "cpu_has_native_bf16", lambda: False)  # the same run, another machine
    with caplog.at_level("WARNING", logger="xmodal.train.rundir"):
        pretrain(_cfg("amp=auto", "iterations=3").with_paths(data, out), resume=True, progress=False)
    info = read_json(out / "run.json")
    assert info["amp"] == "off" and info["resumed"][0] == {**info["resumed"][0], "from_step": 2, "amp": "off"}
    assert "trained in bfloat16 up to step 2, resumed in float32" in caplog.text


def test_exact_resume_under_adamw(data, tmp_path):
    """AdamW's state (moments and its step count) goes through the checkpoint: 3 + 3 steps = 6."""
    adamw = ("optim.name=adamw", "optim.lr=0.0005")
    whole = tmp_path / "whole"
    pretrain(_cfg(*adamw).with_paths(data, whole), progress=False)
    ckpt = load_checkpoint(whole)
    assert any(k.endswith("/exp_avg_sq") for k in ckpt.tensors)
    assert _losses(whole)[0, 0] != _losses(whole)[-1, 0]
    out = tmp_path / "resumed"
    pretrain(_cfg("iterations=3", *adamw).with_paths(data, out), progress=False)
    pretrain(_cfg("iterations=6", *adamw).with_paths(data, out), resume=True, progress=False)
    np.testing.assert_allclose(_losses(out), _losses(whole), rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="optim.name"):  # the optimizer cannot change on resume
        pretrain(_cfg("iterations=7").with_paths(data, out), resume=True, progress=False)


def test_refuses_to_overwrite_or_change_config(full_run, data, tmp_path):
    out = full_run[0]
    with pytest.raises(FileExistsError, match="already holds a run") as info:
        pretrain(_cfg().with_paths(data, out), progress=False)
    assert "--resume" in info.value.hint
    with pytest.raises(ConfigError, match="optim.lr"):
        pretrain(_cfg("optim.lr=0.5").with_paths(data, out), resume=True, progress=False)
    with pytest.raises(ConfigError, match="already at step 6"):
        pretrain(_cfg("iterations=4").with_paths(data, out), resume=True, progress=False)
    with pytest.raises(FileNotFoundError):
        pretrain(_cfg().with_paths(data, tmp_path / "nothing"), resume=True, progress=False)


def test_loss_falls_when_overfitting(tmp_path):
    data = tmp_path / "data"
    _store(data, n=4, views=2)
    out = tmp_path / "run"
    pretrain(_cfg("iterations=12", "checkpoint_every=12", "aug.enabled=false").with_paths(data, out), progress=False)
    loss = _losses(out)[:, 0]
    assert np.isfinite(loss).all()
    assert loss[-4:].mean() < 0.5 * loss[:4].mean(), loss


def test_projected_nce_falls_and_is_logged(tmp_path):
    data = tmp_path / "data"
    _store(data, n=4, views=2)
    out = tmp_path / "run"
    cfg = _cfg("iterations=30", "checkpoint_every=30", "aug.enabled=false", "loss.projected_nce=1.0",
               "model.projection_dim=8", "optim.lr=0.01")
    pretrain(cfg.with_paths(data, out), progress=False)
    nce = np.array([r["nce"] for r in read_jsonl(out / "metrics.jsonl")])
    assert np.isfinite(nce).all() and nce[-5:].mean() < 0.8 * nce[:5].mean(), nce
    assert read_json(out / "encoders.json")["architecture"]["pair_classifier"]["kwargs"]["projection_dim"] == 8
    with pytest.raises(ConfigError, match="projection_dim"):
        _cfg("loss.projected_nce=1.0")


def test_projected_nce_on_pooled_views_falls(tmp_path):
    data = tmp_path / "data"
    _store(data, n=4, views=2)
    runs = {}
    for pooled in (False, True):
        out = tmp_path / f"run-{pooled}"
        cfg = _cfg("iterations=20", "checkpoint_every=20", "aug.enabled=false", "loss.projected_nce=1.0",
                   "model.projection_dim=8", "optim.lr=0.01", f"loss.nce_pool_views={str(pooled).lower()}")
        pretrain(cfg.with_paths(data, out), progress=False)
        runs[pooled] = np.array([r["nce"] for r in read_jsonl(out / "metrics.jsonl")])
    nce = runs[True]
    assert np.isfinite(nce).all() and nce[-5:].mean() < 0.8 * nce[:5].mean(), nce
    assert nce[0] != runs[False][0]  # the same first batch and weights: only the term's anchors differ
    with pytest.raises(ConfigError, match="nce_pool_views"):
        _cfg("loss.nce_pool_views=true")


def test_point_nce_pairs_the_two_copies_of_each_cloud(tmp_path):
    data = tmp_path / "data"
    _store(data, n=4, views=2)
    out = tmp_path / "run"
    cfg = _cfg("iterations=30", "checkpoint_every=30", "loss.point_nce=1.0", "model.projection_dim=8",
               "optim.lr=0.01")
    pretrain(cfg.with_paths(data, out), progress=False)
    pnce = np.array([r["point_nce"] for r in read_jsonl(out / "metrics.jsonl")])
    assert np.isfinite(pnce).all() and pnce[-5:].mean() < 0.8 * pnce[:5].mean(), pnce
    assert "nce" not in read_jsonl(out / "metrics.jsonl")[0]


def test_point_decorrelation_term_is_logged_and_falls(tmp_path):
    data = tmp_path / "data"
    _store(data, n=4, views=2)
    out = tmp_path / "run"
    # the term alone (cross-modality weight 0, no triplet): its gradient reaches Fp through the model
    cfg = _cfg("iterations=30", "checkpoint_every=30", "loss.point_decorrelation=1.0", "loss.mode=cm", "loss.beta=0",
               "optim.lr=0.01")
    pretrain(cfg.with_paths(data, out), progress=False)
    recs = read_jsonl(out / "metrics.jsonl")
    decor = np.array([r["decor"] for r in recs])
    assert np.isfinite(decor).all() and 0 < decor[0] <= 1 and decor[-5:].mean() < 0.8 * decor[:5].mean(), decor
    assert "nce" not in recs[0] and "point_nce" not in recs[0]
    with pytest.raises(ConfigError, match="point_decorrelation needs the point encoder"):
        _cfg("loss.point_decorrelation=1", "loss.mode=cv")


@pytest.mark.parametrize("pairs", ["batch", "batch-bce"])
def test_batch_cross_modal_loss_falls_when_overfitting(tmp_path, pairs):
    """Ff scored on every pair of the batch: the cross-modality term itself must fall."""
    data = tmp_path / "data"
    _store(data, n=4, views=2)
    out = tmp_path / "run"
    cfg = _cfg("iterations=30", "checkpoint_every=30", "aug.enabled=false", "loss.mode=cm",
               f"loss.cross_pairs={pairs}", "optim.lr=0.01", "model.pair_input_norm=batch")
    pretrain(cfg.with_paths(data, out), progress=False)
    cross = _losses(out)[:, 2]
    assert np.isfinite(cross).all()
    assert cross[-5:].mean() < 0.7 * cross[:5].mean(), cross


def test_nan_loss_stops_and_keeps_last_checkpoint(data, tmp_path, monkeypatch):
    real = xmodal.train.step.cross_modal_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(xmodal.train.step, "cross_modal_loss", flaky)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="step 5: the cross loss is nan") as info:
        pretrain(_cfg().with_paths(data, out), progress=False)
    assert info.value.step == 5 and info.value.checkpoint == checkpoint_paths(out)[1]
    ckpt = load_checkpoint(out)
    assert ckpt.step == 3
    assert all(torch.isfinite(t.float()).all() for t in ckpt.tensors.values())
    assert not (out / "encoders.json").exists()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("trust", [0.0, 0.5])
def test_pretrain_applies_the_point_trust_ratio_to_fp_weights_only(data, tmp_path, monkeypatch, trust):
    """optim.point_trust reaches the step through pretrain(): every step rescales exactly Fp's weight
    tensors with the configured coefficient; at 0 nothing is rescaled."""
    real = xmodal.train.step.apply_trust_ratio_
    calls = []

    def spy(params, coefficient):
        calls.append((sorted(tuple(p.shape) for p in params), coefficient))
        return real(params, coefficient)

    monkeypatch.setattr(xmodal.train.step, "apply_trust_ratio_", spy)
    out = tmp_path / "run"
    pretrain(_cfg("iterations=2", "checkpoint_every=2", f"optim.point_trust={trust}").with_paths(data, out),
             progress=False)
    if trust == 0:
        assert calls == []
        return
    from xmodal.api import load_encoders

    _, fp = load_encoders(out)
    fp_weights = sorted(tuple(p.shape) for p in fp.parameters() if p.dim() >= 2)
    assert len(fp_weights) > 0
    assert calls == [(fp_weights, trust)] * 2


def test_cross_view_only_mode(data, tmp_path):
    out = tmp_path / "cv"
    s = pretrain(_cfg("iterations=2", "checkpoint_every=2", "loss.mode=cv").with_paths(data, out), progress=False)
    rec = s["final"]
    assert rec["cross"] is None and rec["cm_acc"] is None and rec["loss"] == pytest.approx(rec["triplet"])


def test_torn_checkpoint_pair_uses_the_weights_state(full_run, tmp_path, caplog):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(full_run[0] / "checkpoints", out / "checkpoints")
    wpath, jpath = checkpoint_paths(out)
    state = read_json(jpath)
    state["step"] = 3  # an older JSON beside newer weights: a crash between the two writes
    jpath.write_text(json.dumps(state))
    ckpt = load_checkpoint(out)
    assert ckpt.step == 6 and "torn" in caplog.text
    jpath.unlink()
    assert load_checkpoint(out).step == 6


def test_xmodalnet_freeze_point_bn_keeps_only_fp_batchnorm_in_eval_mode():
    from torch import nn

    from xmodal.train.model import XModalNet

    def bn_net():
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))

    for freeze in (False, True):
        net = XModalNet(bn_net(), bn_net(), bn_net(), freeze_point_bn=freeze)
        for _ in range(2):  # train() after eval() must freeze again
            net.eval()
            assert not any(m.training for m in net.modules())
            net.train()
            assert net.image_encoder[1].training and net.pair_classifier[1].training
            assert net.point_encoder[1].training is (not freeze)
            assert net.point_encoder[0].training  # only BatchNorm layers are held in eval mode


def test_freeze_point_bn_run_keeps_fp_statistics_and_trains_its_affine(data, tmp_path):
    from torch import nn

    from xmodal.api import load_run

    out = tmp_path / "frozen"
    pretrain(_cfg("iterations=3", "checkpoint_every=3", "model.freeze_point_bn=true").with_paths(data, out), progress=False)
    run = load_run(out)
    fp_bns = [m for m in run.point_encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    img_bns = [m for m in run.image_encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert fp_bns and img_bns
    for m in fp_bns:  # statistics untouched: still the initial mean 0 / variance 1
        torch.testing.assert_close(m.running_mean, torch.zeros_like(m.running_mean))
        torch.testing.assert_close(m.running_var, torch.ones_like(m.running_var))
        assert int(m.num_batches_tracked) == 0
    # ... while their scale/shift and the other networks' statistics did learn
    assert any(not torch.equal(m.weight, torch.ones_like(m.weight)) for m in fp_bns)
    assert any(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in img_bns)
    assert np.isfinite(_losses(out)).all()


def test_resume_on_another_dataset_folder_needs_consent(data, tmp_path):
    import shutil

    out = tmp_path / "run"
    pretrain(_cfg("iterations=3").with_paths(data, out), progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    with pytest.raises(ConfigError, match="was trained on .*data.*, not on .*copy") as info:
        pretrain(_cfg("iterations=4").with_paths(copy, out), resume=True, progress=False)
    assert "--allow-other-data" in info.value.hint
    s = pretrain(_cfg("iterations=4").with_paths(copy, out), resume=True, progress=False, allow_other_data=True)
    assert s["start_step"] == 3 and s["steps"] == 4
    assert read_json(out / "run.json")["dataset"] == str(copy.resolve())
    other = tmp_path / "other"
    _store(other, n=5)  # other settings (object count) are refused even with consent
    with pytest.raises(ConfigError, match="trained on other data"):
        pretrain(_cfg("iterations=5").with_paths(other, out), resume=True, progress=False, allow_other_data=True)


@pytest.mark.slow
def test_compiled_training_matches_eager(data, tmp_path):
    """compile=true runs the same steps through torch.compile: the same losses up to float rounding."""
    # a small learning rate keeps the smoke dynamics from amplifying rounding differences
    base = ("iterations=3", "checkpoint_every=3", "optim.lr=1e-5")
    eager = pretrain(_cfg(*base).with_paths(data, tmp_path / "eager"), progress=False)
    compiled = pretrain(_cfg(*base, "compile=true").with_paths(data, tmp_path / "compiled"), progress=False)
    assert compiled["steps"] == 3
    np.testing.assert_allclose(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-2, atol=1e-3)
    enc = read_json(tmp_path / "compiled" / "encoders.json")
    assert not any("_orig_mod" in k for k in load_checkpoint(tmp_path / "compiled").tensors)  # plain keys
    assert enc["step"] == 3 and eager["steps"] == 3


def test_full_disk_during_a_checkpoint_keeps_the_last_one_and_resume_completes(full_run, data, tmp_path, monkeypatch):
    import errno
    import os as _os

    from xmodal.errors import WriteError

    real_replace = _os.replace

    def full_disk(src, dst, *a, **k):
        if str(dst).endswith("last.safetensors") and load_checkpoint(out) is not None:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **k)

    out = tmp_path / "run"
    monkeypatch.setattr("xmodal.utils.io.os.replace", full_disk)
    with pytest.raises(WriteError, match=r"last\.safetensors: could not be written \(No space left on device\)"):
        pretrain(_cfg().with_paths(data, out), progress=False)  # checkpoints at steps 3 and 6: the second fails
    monkeypatch.undo()
    ckpt = load_checkpoint(out)
    assert ckpt.step == 3 and not (out / "encoders.safetensors").exists()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary file left
    s = pretrain(_cfg().with_paths(data, out), resume=True, progress=False)  # space freed: the same command completes
    assert s["start_step"] == 3 and s["steps"] == 6
    np.testing.assert_allclose(_losses(out), _losses(full_run[0]), rtol=1e-6, atol=1e-7)


def test_resume_of_a_folder_without_a_run_is_refused_and_writes_nothing(data, tmp_path):
    out = tmp_path / "not_a_run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError, match="no run to resume here"):
        pretrain(_cfg().with_paths(data, out), resume=True, progress=False)
    assert sorted(p.name for p in out.iterdir() if p.name != ".xmodal.lock") == ["notes.txt"]


def test_resuming_a_run_stopped_before_its_first_checkpoint_says_it_starts_over(data, tmp_path, caplog):
    out = tmp_path / "early"
    cfg = _cfg("iterations=2").with_paths(data, out)
    out.mkdir()
    save_config(cfg, out / "config.yaml")  # what a run stopped during its first steps leaves
    with caplog.at_level("WARNING", logger="xmodal.train.rundir"):
        pretrain(cfg, resume=True, progress=False)
    assert "no checkpoint yet" in caplog.text and "starts from step 0" in caplog.text
    assert (out / "encoders.safetensors").is_file()


def test_a_run_folder_in_the_dataset_folder_is_refused_and_writes_nothing(data):
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out, what in ((data, "is the dataset folder"), (data / "runs" / "r", "is inside the dataset folder")):
        with pytest.raises(ConfigError, match=what) as info:
            pretrain(_cfg("iterations=1").with_paths(data, out), progress=False)
        assert "outside the dataset" in info.value.hint
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_data_that_does_not_fit_the_settings_writes_nothing(data, tmp_path):
    """The dataset is checked before the run folder is written: the corrected command can run."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="data.num_points=256 but the dataset stores 128") as info:
        pretrain(_cfg("data.num_points=256").with_paths(data, out), progress=False)
    assert str(data) in str(info.value)  # the dataset is named
    assert not out.exists()  # the folder the lock created is removed again, nothing was written
    pretrain(_cfg("iterations=1").with_paths(data, out), progress=False)  # the corrected command runs


def test_a_safetensors_write_error_is_a_write_error_naming_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from xmodal.errors import WriteError
    from xmodal.train.checkpoint import NETS, save_encoders

    def no_space(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", no_space)
    with pytest.raises(WriteError, match=r"encoders\.safetensors: could not be written \(No space left") as info:
        save_encoders(tmp_path, nets={name: torch.nn.Linear(2, 2) for name in NETS}, info={"step": 1})
    assert "free some space" in info.value.hint
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_safetensors_metadata_is_written_in_sorted_order(tmp_path):
    """safetensors writes its metadata in hash-map order (which varies between processes);
    the header is rewritten sorted, so equal content gives equal bytes."""
    import struct

    from safetensors.torch import load_file, save_file

    from xmodal.train.checkpoint import _sort_safetensors_metadata

    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, str(path), metadata={"zeta": "1", "alpha": "{\"k\": \"caf\u00e9\"}", "mid": "2"})
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    shuffled = {"__metadata__": {"zeta": "1", "mid": "2", "alpha": header["__metadata__"]["alpha"]},
                **{k: v for k, v in header.items() if k != "__metadata__"}}
    body = json.dumps(shuffled, separators=(",", ":"), ensure_ascii=False).encode()
    path.write_bytes(raw[:8] + body + b" " * (n - len(body)) + raw[8 + n:])  # same length, keys unsorted
    _sort_safetensors_metadata(path)
    new = path.read_bytes()
    assert len(new) == len(raw)
    assert list(json.loads(new[8:8 + n])["__metadata__"]) == ["alpha", "mid", "zeta"]
    assert torch.equal(load_file(str(path))["a"], tensors["a"])


def test_cli_resume_without_data_uses_the_runs_dataset(data, tmp_path):
    from xmodal.cli import main

    out = tmp_path / "run"
    assert main(["-q", "pretrain", "--data", str(data), "--out", str(out), "--preset", "smoke", "iterations=1"]) == 0
    assert load_config(PretrainConfig, out / "config.yaml").data.path == str(data)
    assert main(["-q", "pretrain", "--out", str(out), "--resume", "iterations=2"]) == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r][-1] == 2


@pytest.mark.parametrize("make_folder", [False, True])
def test_resume_without_data_or_run_names_the_folder(tmp_path, make_folder):
    from xmodal.cli import main

    out = tmp_path / "run"
    if make_folder:
        out.mkdir()
    with pytest.raises(MissingInputError, match="no run to resume here" if make_folder else "no run folder to resume"):
        pretrain(_cfg().with_paths(out=out), resume=True, progress=False)
    assert main(["-q", "pretrain", "--out", str(out), "--resume"]) == 2
    assert out.exists() == make_folder
