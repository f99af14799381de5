"""PretrainConfig: presets, overrides, validation, resume resolution."""

from __future__ import annotations

import pytest

from xmodal.config import ConfigError, list_presets, resolve, save_config
from xmodal.train.config import PretrainConfig, config_diff, config_hash, resolve_pretrain_config


def test_presets_are_shipped_and_valid():
    assert {"paper", "cpu", "smoke"} <= set(list_presets("pretrain"))
    for name in ("paper", "cpu", "smoke"):
        cfg = resolve(PretrainConfig, name, group="pretrain")
        cfg.validate()


def test_paper_preset_is_section_4_1():
    cfg = resolve(PretrainConfig, "paper", group="pretrain")
    assert cfg.optim.lr == 0.001 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
    assert cfg.optim.step_size == 40_000 and cfg.optim.gamma == pytest.approx(0.1)
    assert cfg.iterations == 120_000 and cfg.batch_size == 32
    assert cfg.data.num_points == 2048 and cfg.data.image_size == 224
    assert cfg.aug.hflip_p == 0.5 and cfg.aug.jitter_sigma == 0.02 and cfg.aug.rotate
    assert cfg.model.image_encoder == "resnet18" and cfg.model.point_encoder == "dgcnn" and cfg.model.k == 20
    assert cfg.loss.mode == "cm-cv"


def test_smoke_is_tiny():
    cfg = resolve(PretrainConfig, "smoke", group="pretrain")
    assert cfg.iterations <= 10 and cfg.batch_size <= 4 and cfg.data.image_size <= 32 and cfg.data.num_points <= 128


def test_overrides_apply_and_bad_keys_fail():
    cfg = resolve(PretrainConfig, "smoke", ["optim.lr=0.05", "loss.mode=cm", "aug.crop_scale=[0.3, 0.9]"], group="pretrain")
    assert cfg.optim.lr == 0.05 and cfg.loss.mode == "cm" and cfg.aug.crop_scale == (0.3, 0.9)
    assert not cfg.loss.use_cross_view and cfg.loss.use_cross_modal
    with pytest.raises(ConfigError, match="optim.lrr"):
        resolve(PretrainConfig, "smoke", ["optim.lrr=0.1"], group="pretrain")
    with pytest.raises(ConfigError, match="loss.mode"):
        resolve(PretrainConfig, "smoke", ["loss.mode=both"], group="pretrain")


@pytest.mark.parametrize(
    "override, match",
    [
        ("batch_size=1", "batch_size"),
        ("data.split=test", "test split"),
        ("aug.crop_scale=[0.9, 0.5]", "crop_scale"),
        ("device=gpu", "device"),
        ("log_every=4", "multiple of log_every"),
        ("optim.gamma=0", "gamma"),
        ("aug.jitter_clip=-1", "jitter_clip"),
    ],
)
def test_validation_rejects_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve(PretrainConfig, "smoke", [override], group="pretrain")


def test_hash_ignores_resume_mutable_keys():
    a = resolve(PretrainConfig, "smoke", group="pretrain")
    b = resolve(PretrainConfig, "smoke", ["iterations=50", "data.workers=3"], group="pretrain")
    c = resolve(PretrainConfig, "smoke", ["optim.lr=0.5"], group="pretrain")
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert config_diff(a, b) == []
    assert config_diff(a, c) == ["optim.lr: 0.001 -> 0.5"]


def test_resume_uses_saved_config_as_base(tmp_path, caplog):
    saved = resolve(PretrainConfig, "smoke", ["optim.lr=0.02", "seed=7"], group="pretrain")
    save_config(saved, tmp_path / "config.yaml")
    cfg = resolve_pretrain_config("paper", ["iterations=9"], run=tmp_path, resume=True)
    assert cfg.optim.lr == 0.02 and cfg.seed == 7 and cfg.iterations == 9 and cfg.data.image_size == 32
    assert "ignored" in caplog.text
    # without resume the preset is the base
    fresh = resolve_pretrain_config("smoke", [], run=tmp_path, resume=False)
    assert fresh.optim.lr == 0.001 and fresh.seed == 0
