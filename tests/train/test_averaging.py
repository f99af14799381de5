"""Weight averaging (xmodal.train.averaging, optim.average_from) and its use in pretrain."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from xmodal.config import resolve
from xmodal.data.store import write_store
from xmodal.errors import CheckpointError
from xmodal.train.averaging import WeightAverage, is_sample_step
from xmodal.train.checkpoint import load_checkpoint, read_encoders
from xmodal.train.config import PretrainConfig
from xmodal.train.trainer import pretrain
from xmodal.utils.io import read_json, read_jsonl


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net[1].running_mean.normal_()
    net[1].num_batches_tracked.fill_(seed)
    return net


def test_is_sample_step_samples_the_grid_and_the_last_step():
    assert [s for s in range(1, 8) if is_sample_step(s, start=2, every=2, last=7)] == [2, 4, 6, 7]
    assert [s for s in range(1, 7) if is_sample_step(s, start=3, every=3, last=6)] == [3, 6]
    assert not any(is_sample_step(s, start=0, every=1, last=5) for s in range(6))  # off
    assert not any(is_sample_step(s, start=9, every=1, last=5) for s in range(6))  # past the end


def test_weight_average_is_the_mean_of_the_samples_and_keeps_the_last_counter():
    samples = [_net(seed) for seed in (1, 2, 3)]
    avg = WeightAverage()
    for net in samples:
        avg.update({"net": net})
    assert avg.count == 3
    got = avg.networks()["net"].state_dict()
    for key, value in got.items():
        if value.is_floating_point():  # the slow obvious reference: the mean of the three state dicts
            ref = torch.stack([s.state_dict()[key] for s in samples]).mean(0)
            torch.testing.assert_close(value, ref)
    assert int(got["1.num_batches_tracked"]) == 3
    assert not avg.networks()["net"].training
    # the copies are the average's own: training the source on does not move them
    with torch.no_grad():
        samples[-1][0].weight.add_(1.0)
    assert not torch.equal(avg.networks()["net"][0].weight, samples[-1][0].weight)


def test_weight_average_round_trips_through_checkpoint_tensors(tmp_path):
    avg = WeightAverage()
    assert avg.state_tensors() == {}
    for seed in (4, 5):
        avg.update({"net": _net(seed)})
    tensors = avg.state_tensors()
    assert all(k.startswith("average/net/") for k in tensors)
    back = WeightAverage()
    back.load({"net": _net(0)}, tensors, avg.count, tmp_path / "last.safetensors")
    assert back.count == 2
    for key, value in avg.networks()["net"].state_dict().items():
        assert torch.equal(back.networks()["net"].state_dict()[key], value)
    with pytest.raises(CheckpointError, match="last.safetensors.*averaged weights of net"):
        WeightAverage().load({"net": nn.Linear(3, 5)}, tensors, 2, tmp_path / "last.safetensors")
    with pytest.raises(RuntimeError, match="no weights averaged"):
        WeightAverage().networks()


# --------------------------------------------------------------------------- in pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 12
    labels = np.arange(n) % 2
    pts = rng.normal(size=(n, 128, 3)).astype(np.float32)
    imgs = rng.integers(0, 255, size=(n, 3, 32, 32)).astype(np.uint8)
    split = {"ids": [f"o{i}" for i in range(n)], "labels": labels, "points": pts, "images": imgs}
    root = tmp_path_factory.mktemp("avgdata")
    write_store(root, classes=["a", "b"], splits={"train": split}, up_axis="z")
    return root


def _cfg(*overrides) -> PretrainConfig:
    return resolve(PretrainConfig, "smoke", ["optim.lr=0.05", *overrides], group="pretrain")


def _model_weights(run) -> dict[str, torch.Tensor]:
    """The training networks' weights in the run's last checkpoint, named as in encoders.safetensors."""
    return {k[len("model/"):]: v for k, v in load_checkpoint(run).tensors.items() if k.startswith("model/")}


@pytest.fixture(scope="module")
def averaged_run(data, tmp_path_factory):
    """5 steps, the weights after steps 2, 4 and 5 averaged."""
    out = tmp_path_factory.mktemp("avg") / "run"
    pretrain(_cfg("iterations=5", "optim.average_from=2", "optim.average_every=2").with_paths(data, out),
             progress=False)
    return out


def test_pretrain_exports_the_mean_of_the_sampled_steps(averaged_run, data, tmp_path):
    # the reference: the same schedule without averaging, stopped after steps 2, 4 and 5 in turn
    # (a resumed run reproduces one that never stopped), its weights read from each checkpoint
    ref = tmp_path / "plain"
    samples = []
    for steps in (2, 4, 5):
        pretrain(_cfg(f"iterations={steps}").with_paths(data, ref), resume=steps > 2, progress=False)
        samples.append(_model_weights(ref))
    meta, exported = read_encoders(averaged_run)
    assert meta["averaged"] == {"from": 2, "every": 2, "samples": 3}
    moved = 0
    for key, value in exported.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, torch.stack([s[key] for s in samples]).mean(0), rtol=1e-5, atol=1e-6)
            moved += not torch.equal(value, samples[-1][key])
        else:
            assert torch.equal(value, samples[-1][key])
    assert moved > 0  # the mean differs from the last step's weights
    ckpt = load_checkpoint(averaged_run)  # the checkpoint keeps both: training weights and the average
    assert ckpt.state["average_samples"] == 3
    for key, value in samples[-1].items():
        assert torch.equal(ckpt.tensors[f"model/{key}"], value)
        assert torch.equal(ckpt.tensors[f"average/{key}"], exported[key])


def test_a_resumed_averaging_run_exports_what_an_uninterrupted_one_does(averaged_run, data, tmp_path):
    out = tmp_path / "resumed"
    cfg = _cfg("optim.average_from=2", "optim.average_every=2").with_paths(data, out)
    pretrain(_with_iterations(cfg, 4), progress=False)
    assert load_checkpoint(out).state["average_samples"] == 2
    pretrain(_with_iterations(cfg, 5), resume=True, progress=False)
    _, want = read_encoders(averaged_run)
    _, got = read_encoders(out)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def _with_iterations(cfg: PretrainConfig, n: int) -> PretrainConfig:
    return dataclasses.replace(cfg, iterations=n)


def test_averaging_that_never_starts_exports_the_last_weights(data, tmp_path, caplog):
    out = tmp_path / "late"
    with caplog.at_level("WARNING"):
        pretrain(_cfg("iterations=3", "optim.average_from=10").with_paths(data, out), progress=False)
    assert "past the last step" in caplog.text
    meta, exported = read_encoders(out)
    assert "averaged" not in meta
    for key, value in _model_weights(out).items():
        assert torch.equal(exported[key], value)


def test_the_curve_scores_the_averaged_networks_once_they_exist(data, tmp_path):
    out = tmp_path / "curve"
    cfg = _cfg("iterations=4", "optim.average_from=2", "optim.average_every=1", "val.every=2", "val.fraction=0.5",
               "val.views=2", "val.folds=2")
    pretrain(cfg.with_paths(data, out), progress=False)
    recs = [r for r in read_jsonl(out / "metrics.jsonl") if "val.retrieval3d.top1" in r]
    assert [r["step"] for r in recs] == [0, 2, 4]
    assert not any(k.startswith("val.averaged.") for k in recs[0])
    for r in recs[1:]:
        assert {"val.averaged.retrieval3d.top1", "val.averaged.retrieval2d.top1"} <= set(r)
    # at step 2 the average holds one sample, the weights of step 2 themselves
    assert recs[1]["val.averaged.retrieval3d.map"] == pytest.approx(recs[1]["val.retrieval3d.map"])
    assert read_json(out / "encoders.json")["averaged"]["samples"] == 3
