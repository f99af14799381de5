"""Feature API: load_run / random_init_run / extraction helpers."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import xmodal
from xmodal.api import (
    LoadedRun,
    extract_image_features,
    extract_point_features,
    load_encoders,
    load_run,
    random_init_run,
)
from xmodal.config import resolve
from xmodal.data.store import write_store
from xmodal.train.checkpoint import CheckpointError, architecture_from_config, save_encoders
from xmodal.train.config import PretrainConfig
from xmodal.train.trainer import pretrain


def _cfg(*ov):
    return resolve(PretrainConfig, "smoke", list(ov), group="pretrain")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    rng = np.random.default_rng(0)
    n = 6
    write_store(
        root / "data",
        classes=["a", "b"],
        splits={
            "train": {
                "ids": [f"o{i}" for i in range(n)],
                "labels": np.arange(n) % 2,
                "points": rng.normal(size=(n, 128, 3)).astype(np.float32),
                "images": rng.integers(0, 256, size=(n, 4, 32, 32), dtype=np.uint8),
            }
        },
        up_axis="y",
    )
    pretrain(_cfg("iterations=2", "checkpoint_every=2").with_paths(root / "data", root / "run"), progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(5, 32, 32), dtype=np.uint8), rng.normal(size=(5, 128, 3)).astype(np.float32)


def test_round_trip_gives_the_in_memory_features(tmp_path, inputs):
    imgs, pts = inputs
    cfg = _cfg()
    mem = random_init_run(cfg, seed=3)
    assert mem.source == "random" and not mem.image_encoder.training
    # write these in-memory weights as a run's final encoders, then load them back from disk
    run = tmp_path / "run"
    arch = architecture_from_config(cfg)
    assert arch["pair_classifier"]["kwargs"] == {"hidden": cfg.model.pair_hidden, "input_norm": "batch"}
    nets = {"image_encoder": mem.image_encoder, "point_encoder": mem.point_encoder, "pair_classifier": mem.pair_classifier}
    info = {"architecture": arch, "image_size": 32, "num_points": 128, "up_axis": "z", "step": 0}
    save_encoders(run, nets=nets, info={**info, "config": xmodal.config.to_dict(cfg)})
    loaded = load_run(run)
    assert isinstance(loaded, LoadedRun) and loaded.source == "final" and loaded.image_size == 32
    np.testing.assert_array_equal(
        extract_image_features(loaded.image_encoder, imgs), extract_image_features(mem.image_encoder, imgs)
    )
    np.testing.assert_array_equal(
        extract_point_features(loaded.point_encoder, pts), extract_point_features(mem.point_encoder, pts)
    )
    fi = torch.randn(2, 512)
    torch.testing.assert_close(loaded.pair_classifier(fi, fi), mem.pair_classifier(fi, fi))


def test_random_init_at_the_runs_seed_is_the_weights_training_starts_from():
    from xmodal.train.distributed import DistContext
    from xmodal.train.model import build_training_model

    cfg = _cfg("seed=5", "model.point_init=kaiming")
    start = build_training_model(cfg, DistContext()).networks()
    for seed, same in ((5, True), (6, False)):
        rnd = random_init_run(cfg, seed=seed)
        for name, module in start.items():
            theirs = getattr(rnd, name).state_dict()
            for key, tensor in module.state_dict().items():
                if tensor.is_floating_point() and tensor.numel() > 1 and tensor.std() > 0:  # random tensors only
                    assert torch.equal(tensor, theirs[key]) is same, (seed, name, key)


def test_point_init_is_part_of_the_architecture_and_of_the_random_baseline(tmp_path):
    cfg = _cfg()
    assert "init" not in architecture_from_config(cfg)["point_encoder"]["kwargs"]  # older runs read the same
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, point_init="kaiming"))
    arch = architecture_from_config(cfg)
    assert arch["point_encoder"]["kwargs"]["init"] == "kaiming"
    mem = random_init_run(cfg, seed=0)
    w = mem.point_encoder.edge_convs[3].conv1.weight  # fan-in 2 x 64
    assert abs(w.std().item() - (2 / (1 + 0.2**2) / 128) ** 0.5) < 0.01
    run = tmp_path / "run"
    nets = {"image_encoder": mem.image_encoder, "point_encoder": mem.point_encoder, "pair_classifier": mem.pair_classifier}
    info = {"architecture": arch, "image_size": 32, "num_points": 128, "up_axis": "z", "step": 0}
    save_encoders(run, nets=nets, info={**info, "config": xmodal.config.to_dict(cfg)})
    baseline = load_run(run).at_random_init(seed=0)  # the random baseline of such a run is He-initialised too
    torch.testing.assert_close(baseline.point_encoder.edge_convs[3].conv1.weight, w)


def test_trained_run_loads_and_differs_from_random(trained, inputs):
    imgs, pts = inputs
    run = load_run(trained)
    assert run.step == 2 and run.up_axis == "y" and run.num_points == 128 and run.config.data.image_size == 32
    assert all(not m.training for m in (run.image_encoder, run.point_encoder, run.pair_classifier))
    f2 = extract_image_features(run.image_encoder, imgs)
    f3 = extract_point_features(run.point_encoder, pts)
    assert f2.shape == (5, 512) and f3.shape == (5, 512) and f2.dtype == f3.dtype == np.float32
    rnd = run.at_random_init()
    assert rnd.up_axis == "y"
    assert not np.allclose(extract_image_features(rnd.image_encoder, imgs), f2)
    assert not np.allclose(extract_point_features(rnd.point_encoder, pts), f3)
    # the same seed gives the same random weights; another seed other weights
    again, other = random_init_run(run.config, seed=0), random_init_run(run.config, seed=1)
    np.testing.assert_array_equal(
        extract_point_features(again.point_encoder, pts), extract_point_features(rnd.point_encoder, pts)
    )
    assert not np.allclose(extract_point_features(other.point_encoder, pts), f3)


def test_last_checkpoint_equals_final(trained, inputs, tmp_path):
    imgs, _ = inputs
    last = load_run(trained, prefer="last")
    assert last.source == "last" and last.step == 2
    final = load_run(trained)
    np.testing.assert_array_equal(
        extract_image_features(last.image_encoder, imgs), extract_image_features(final.image_encoder, imgs)
    )
    # an unfinished run (no encoders.*) falls back to its checkpoint
    partial = tmp_path / "partial"
    shutil.copytree(trained, partial)
    (partial / "encoders.json").unlink()
    assert load_run(partial).source == "last"
    img_enc, pts_enc = load_encoders(partial)
    assert xmodal.load_encoders(partial)[0].__class__ is img_enc.__class__


def test_extraction_batching_resizing_and_train_flag(trained, inputs):
    imgs, pts = inputs
    enc = load_run(trained).image_encoder
    enc.train()
    a = extract_image_features(enc, imgs, batch_size=2)
    assert enc.training  # the caller's mode is restored
    b = extract_image_features(enc, imgs, batch_size=64)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)  # eval mode: independent of batching (float32 round-off only)
    # larger images are resized to the run's 32 px first
    big = np.repeat(np.repeat(imgs, 2, axis=1), 2, axis=2)
    from xmodal.train.augment import resize_images

    np.testing.assert_allclose(
        extract_image_features(enc, big), extract_image_features(enc, resize_images(big, 32)), rtol=1e-6, atol=1e-6
    )
    penc = load_run(trained).point_encoder
    np.testing.assert_allclose(
        extract_point_features(penc, pts, batch_size=1), extract_point_features(penc, pts), rtol=1e-4, atol=1e-5
    )
    assert extract_point_features(penc, pts[:0]).shape == (0, 512)
    with pytest.raises(TypeError, match="uint8"):
        extract_image_features(enc, imgs.astype(np.float32))
    with pytest.raises(ValueError, match="points"):
        extract_point_features(penc, pts[..., :2])


def test_load_errors(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="xmodal pretrain"):
        load_run(empty)
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    (bad / "encoders.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="encoders.safetensors"):
        load_run(bad)
    with pytest.raises(ValueError, match="prefer"):
        load_run(trained, prefer="best")


def test_a_device_this_machine_lacks_is_a_config_error(trained, inputs, monkeypatch):
    """CUDA on a machine without it: a ConfigError with a hint, not torch's bare assertion."""
    from xmodal.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (lambda: load_encoders(trained, device="cuda"), lambda: random_init_run(device="cuda:0"),
                 lambda: extract_point_features(load_run(trained).point_encoder, inputs[1], device="cuda")):
        with pytest.raises(ConfigError, match="CUDA is not available") as info:
            call()
        assert info.value.hint == "use device='cpu'"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"'cuda:3': only 1 CUDA device\(s\) visible"):
        load_run(trained, device="cuda:3")
    with pytest.raises(ConfigError, match="'gpu' is not a device name"):
        load_run(trained, device="gpu")
    assert load_run(trained, device=torch.device("cpu")).device.type == "cpu"


def test_encoders_from_two_saves_are_refused_and_a_newer_checkpoint_is_named(tmp_path, trained, caplog):
    # a save stopped between its two files: the step-2 weights beside the JSON of a step-1 save
    torn = tmp_path / "torn"
    shutil.copytree(trained, torn)
    meta = json.loads((torn / "encoders.json").read_text())
    assert meta["step"] == 2
    (torn / "encoders.json").write_text(json.dumps({**meta, "step": 1}))
    with pytest.raises(CheckpointError, match=r"encoders.safetensors: holds the weights of step 2, but "
                                              r"encoders.json describes step 1") as err:
        load_run(torn)
    assert "--resume" in err.value.hint
    # a run extended past its encoders and stopped: its last checkpoint is newer than encoders.*
    extended = tmp_path / "extended"
    shutil.copytree(trained, extended)
    state = json.loads((extended / "checkpoints" / "last.json").read_text())
    (extended / "checkpoints" / "last.json").write_text(json.dumps({**state, "step": 5}))
    with caplog.at_level("WARNING", logger="xmodal.api"):
        loaded = load_run(extended)
    assert loaded.step == 2 and loaded.source == "final" and loaded.later_checkpoint == 5
    assert "holds step 2, but the last checkpoint is at step 5" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="xmodal.api"):
        assert load_run(trained).later_checkpoint is None
    assert "last checkpoint is at step" not in caplog.text


def test_an_unfinished_run_warns_that_its_networks_are_mid_training(trained, tmp_path, caplog):
    partial = tmp_path / "partial"
    shutil.copytree(trained, partial)
    (partial / "encoders.safetensors").unlink()
    with caplog.at_level("WARNING", logger="xmodal.api"):
        assert load_run(partial).source == "last"
    assert f"{partial} has not finished (no encoders.safetensors)" in caplog.text
    assert "step 2 of 2" in caplog.text and "--resume" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="xmodal.api"):
        load_run(partial, prefer="last")  # asked for: no warning
        load_run(trained)
    assert "has not finished" not in caplog.text
    # half of the encoders and no checkpoint to fall back on: the missing file is named
    shutil.rmtree(partial / "checkpoints")
    with pytest.raises(FileNotFoundError, match="holds encoders.json but not encoders.safetensors"):
        load_run(partial)


def test_a_run_folder_may_start_with_the_home_folder(trained, tmp_path, monkeypatch):
    shutil.copytree(trained, tmp_path / "run")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_run("~/run").path == tmp_path / "run"


def test_colour_images_reach_a_grey_trained_encoder_as_their_luminance(trained, tmp_path, caplog):
    from xmodal.data.render import to_grayscale

    rgb = np.random.default_rng(2).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    rgb[..., 0] //= 4  # tinted: its luminance differs from the mean of its channels
    run = load_run(trained)
    assert run.grayscale is True  # recorded in encoders.json
    grey = extract_image_features(run.image_encoder, to_grayscale(rgb))
    with caplog.at_level("WARNING", logger="xmodal.api"):
        np.testing.assert_array_equal(extract_image_features(run.image_encoder, rgb), grey)
        np.testing.assert_array_equal(extract_image_features(run.image_encoder, torch.from_numpy(rgb)), grey)
    assert "trained on grey renders" in caplog.text
    # the random-init baseline is fed as the run is
    rnd = run.at_random_init()
    assert rnd.grayscale is True
    np.testing.assert_array_equal(extract_image_features(rnd.image_encoder, rgb),
                                  extract_image_features(rnd.image_encoder, to_grayscale(rgb)))
    # a run written before encoders.json recorded it: read from run.json; without run.json unknown
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    meta = json.loads((old / "encoders.json").read_text())
    del meta["grayscale"]
    (old / "encoders.json").write_text(json.dumps(meta))
    assert load_run(old).grayscale is True
    (old / "run.json").unlink()
    unknown = load_run(old)
    assert unknown.grayscale is None
    assert not np.allclose(extract_image_features(unknown.image_encoder, rgb), grey)  # given as they are
    meta["grayscale"] = "yes"
    (old / "encoders.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'grayscale' must be true or false"):
        load_run(old)


def test_to_grayscale_rounds_the_luminance():
    from xmodal.data.render import LUMA, to_grayscale

    rgb = np.random.default_rng(3).integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    expected = np.array([[[round(sum(w * float(c) for w, c in zip(LUMA, px))) for px in row] for row in img]
                         for img in rgb])
    got = to_grayscale(rgb)
    assert got.dtype == np.uint8 and got.shape == (4, 5, 6)
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="3 channels"):
        to_grayscale(rgb[..., :2])


def test_extraction_follows_the_encoders_dtype_and_sees_through_data_parallel(trained, inputs):
    import copy

    imgs, pts = inputs
    run = load_run(trained)
    f2, f3 = extract_image_features(run.image_encoder, imgs), extract_point_features(run.point_encoder, pts)
    img64, pts64 = copy.deepcopy(run.image_encoder).double(), copy.deepcopy(run.point_encoder).double()
    for got, want in ((extract_image_features(img64, imgs), f2), (extract_point_features(pts64, pts), f3)):
        assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # images of another size: a wrapped encoder still resizes them to the size it was trained on
    big = np.repeat(np.repeat(imgs, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(extract_image_features(torch.nn.DataParallel(run.image_encoder), big),
                                  extract_image_features(run.image_encoder, big))


def test_point_clouds_normalised_on_request_and_a_warning_when_far_from_the_unit_sphere(trained, caplog):
    from xmodal.data.geometry import normalize_unit_sphere

    enc = load_run(trained).point_encoder
    raw = np.random.default_rng(4).normal(size=(3, 128, 3)).astype(np.float32)
    unit = normalize_unit_sphere(raw)[0].astype(np.float32)
    with caplog.at_level("WARNING", logger="xmodal.api"):
        f_unit = extract_point_features(enc, unit)
    assert "not centred and scaled" not in caplog.text
    moved = unit * 40.0 + np.float32(7.0)
    with caplog.at_level("WARNING", logger="xmodal.api"):
        f_moved = extract_point_features(enc, moved)
    assert "3 of 3 clouds are not centred and scaled" in caplog.text and "normalize=True" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="xmodal.api"):
        extract_point_features(enc, moved)
    assert "not centred" not in caplog.text  # once per encoder, not once per call
    assert not np.allclose(f_moved, f_unit, atol=1e-3)
    for given in (moved, torch.from_numpy(moved)):
        got = extract_point_features(enc, given, normalize=True)
        assert np.abs(got - f_unit).max() <= 1e-4 * np.abs(f_unit).max()


def test_point_extraction_refuses_clouds_it_cannot_encode(trained, inputs):
    enc = load_run(trained).point_encoder
    pts = inputs[1].copy()
    pts[3, 7, 1] = np.nan
    pts[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 of 5 clouds hold NaN or infinite coordinates \(indices \[1, 3\]\)"):
        extract_point_features(enc, pts)
    with pytest.raises(ValueError, match=f"give clouds of at least {enc.k} points"):
        extract_point_features(enc, inputs[1][:, : enc.k - 1])
    for bad in (None, 2.5, 0, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            extract_point_features(enc, inputs[1], batch_size=bad)
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            extract_image_features(load_run(trained).image_encoder, inputs[0], batch_size=bad)
