"""PretrainConfig: presets, overrides, validation, resume resolution."""

from __future__ import annotations

import json

import pytest

from xmodal.config import ConfigError, list_presets, resolve, save_config, to_dict
from xmodal.train.config import PretrainConfig, config_diff, config_hash, resolve_pretrain_config


def test_presets_are_shipped_and_valid():
    shipped = set(list_presets("pretrain"))
    assert {"paper", "paper-stable", "cpu", "cpu-fp32", "cpu-long", "demo", "smoke"} <= shipped
    for name in sorted(shipped):
        cfg = resolve(PretrainConfig, name, group="pretrain")
        cfg.validate()


#: every field of the `paper` preset: §4.1 where the paper gives a value, the documented choice
#: where it does not (margin, beta, crop range, k), and every option beyond the paper off
PAPER = {
    "model": {"image_encoder": "resnet18", "point_encoder": "dgcnn", "k": 20, "pair_hidden": 256,
              "pair_input_norm": "none", "freeze_point_bn": False, "projection_dim": 0,
              "point_init": "default"},
    "data": {"path": "", "image_size": 224, "num_points": 2048, "point_subsample": "random", "split": "train",
             "workers": 6, "prefetch_factor": 2},
    "loss": {"mode": "cm-cv", "margin": 1.0, "beta": 1.0, "cross_pairs": "sample", "projected_nce": 0.0,
             "point_nce": 0.0, "point_decorrelation": 0.0, "nce_pool_views": False, "temperature": 0.1},
    "optim": {"name": "sgd", "lr": 0.001, "momentum": 0.9, "weight_decay": 0.0005, "step_size": 40000, "gamma": 0.1,
              "point_lr_scale": 1.0, "point_trust": 0.0,
              "average_from": 0, "average_every": 200},
    "aug": {"enabled": True, "crop_scale": (0.5, 1.0), "crop_ratio": (0.75, 4 / 3), "hflip_p": 0.5,
            "rotate": True, "jitter_sigma": 0.02, "jitter_clip": None, "point_scale": (1.0, 1.0), "point_shift": 0.0},
    "val": {"every": 0, "fraction": 0.1, "views": 12, "folds": 3, "Cs": (0.001, 0.01, 0.1)},
    "iterations": 120000, "batch_size": 32, "log_every": 10, "checkpoint_every": 2000, "seed": 0,
    "device": "auto", "amp": "off", "compile": False, "out": "",
}


def test_paper_preset_is_section_4_1_and_nothing_else():
    assert to_dict(resolve(PretrainConfig, "paper", group="pretrain")) == PAPER


def test_dataclass_defaults_are_the_papers_settings():
    d = to_dict(PretrainConfig())
    for key in ("model", "loss", "optim", "aug", "val", "iterations", "batch_size", "amp"):
        assert d[key] == PAPER[key], key


def test_paper_stable_is_paper_plus_named_stabilisers():
    a = to_dict(resolve(PretrainConfig, "paper", group="pretrain"))
    b = to_dict(resolve(PretrainConfig, "paper-stable", group="pretrain"))
    diff = {(sec, k) for sec in a if isinstance(a[sec], dict) for k in a[sec] if a[sec][k] != b[sec][k]}
    diff |= {(k,) for k in a if not isinstance(a[k], dict) and a[k] != b[k]}
    assert diff == {("model", "pair_input_norm"), ("amp",)}
    assert b["model"]["pair_input_norm"] == "batch" and b["amp"] == "auto"


def test_preset_inheritance_and_cycles(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("inherit: smoke\noptim:\n  lr: 0.02\n")
    cfg = resolve(PretrainConfig, str(child), group="pretrain")
    assert cfg.optim.lr == 0.02 and cfg.iterations == resolve(PretrainConfig, "smoke", group="pretrain").iterations
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"inherit: {loop}\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        resolve(PretrainConfig, str(loop), group="pretrain")


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
        ("aug.point_scale=[1.5, 0.67]", "point_scale"),
        ("aug.point_scale=[0, 1.5]", "point_scale"),
        ("aug.point_shift=-0.1", "point_shift"),
        ("device=gpu", "device"),
        ("log_every=4", "multiple of log_every"),
        ("optim.gamma=0", "gamma"),
        ("aug.jitter_clip=-1", "jitter_clip"),
        ("model.point_init=xavier", "model.point_init"),
        ("optim.point_trust=-0.5", "optim.point_trust"),
        ("optim.average_from=-1", "optim.average_from"),
        ("optim.average_every=0", "optim.average_every"),
        ("optim.name=adam", "optim.name must be one of sgd, adamw"),
    ],
)
def test_validation_rejects_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve(PretrainConfig, "smoke", [override], group="pretrain")


def test_point_trust_needs_sgd():
    with pytest.raises(ConfigError, match="needs optim.name=sgd"):
        resolve(PretrainConfig, "smoke", ["optim.name=adamw", "optim.point_trust=0.01"], group="pretrain")


def test_point_init_is_refused_for_an_encoder_it_does_not_apply_to():
    with pytest.raises(ConfigError, match="applies to DGCNN point encoders"):
        resolve(PretrainConfig, "smoke", ["model.point_encoder=pointnet", "model.point_init=kaiming"], group="pretrain")
    cfg = resolve(PretrainConfig, "smoke", ["model.point_encoder=dgcnn_reference", "model.point_init=kaiming"],
                  group="pretrain")
    assert cfg.model.point_init == "kaiming"


def test_a_new_field_at_its_neutral_value_keeps_the_hash_of_older_runs():
    cpu = resolve(PretrainConfig, "cpu-fp32", group="pretrain")
    # the hash in the checkpoints of runs of the earlier `cpu` preset (now `cpu-fp32`), saved
    # before model.point_init existed: a field added since (without an entry in
    # HASH_NEUTRAL_VALUES) or a changed default breaks it, and with it `--resume` of every such run
    assert config_hash(cpu) == "cd1dd34d38ff2f59"
    kaiming = resolve(PretrainConfig, "cpu-fp32", ["model.point_init=kaiming"], group="pretrain")
    assert config_hash(kaiming) != config_hash(cpu)
    trust = resolve(PretrainConfig, "cpu-fp32", ["optim.point_trust=1"], group="pretrain")
    assert config_hash(trust) != config_hash(cpu)
    adamw = resolve(PretrainConfig, "cpu-fp32", ["optim.name=adamw"], group="pretrain")
    assert config_hash(adamw) != config_hash(cpu)
    averaged = resolve(PretrainConfig, "cpu-fp32", ["optim.average_from=100"], group="pretrain")
    assert config_hash(averaged) != config_hash(cpu)
    for override in ("aug.point_scale=[0.67, 1.5]", "aug.point_shift=0.2"):
        assert config_hash(resolve(PretrainConfig, "cpu-fp32", [override], group="pretrain")) != config_hash(cpu)
    assert config_hash(resolve(PretrainConfig, "cpu-fp32", ["aug.point_scale=[1, 1]"], group="pretrain")) == config_hash(cpu)


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


def test_resume_from_another_folder_finds_a_relative_dataset_through_run_json(tmp_path, monkeypatch):
    # the run was started in `project/` with --data data/mn40; resumed from elsewhere without --data
    project = tmp_path / "project"
    (project / "data" / "mn40").mkdir(parents=True)
    run = project / "runs" / "a"
    run.mkdir(parents=True)
    save_config(resolve(PretrainConfig, "smoke", group="pretrain").with_paths("data/mn40", "runs/a"), run / "config.yaml")
    (run / "run.json").write_text(json.dumps({"dataset": str(project / "data" / "mn40")}))
    monkeypatch.chdir(project)  # from where it was started: the saved path as it is
    assert resolve_pretrain_config(None, [], run="runs/a", resume=True).data.path == "data/mn40"
    monkeypatch.chdir(tmp_path)  # from elsewhere: run.json's absolute folder
    assert resolve_pretrain_config(None, [], run=run, resume=True).data.path == str(project / "data" / "mn40")
    (run / "run.json").write_text(json.dumps({"dataset": str(tmp_path / "gone")}))  # nothing better known
    assert resolve_pretrain_config(None, [], run=run, resume=True).data.path == "data/mn40"


@pytest.mark.parametrize("text, problem", [("model:\n  kk: 3\n", "unknown config key(s) model.kk"),
                                           ("iterations: [1\n", "invalid YAML (line 2"),
                                           ("iterations: -4\n", "iterations")])
def test_broken_saved_config_is_named_once(tmp_path, text, problem):
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve_pretrain_config(None, [], run=tmp_path, resume=True)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'config.yaml'}: ") and problem in msg
    assert msg.count("config.yaml") == 1


def test_paths_are_set_by_with_paths_required_to_run_and_free_to_change_on_resume(tmp_path):
    cfg = resolve(PretrainConfig, "smoke", group="pretrain")
    with pytest.raises(ConfigError, match=r"data\.path, out: required"):
        cfg.require_paths()
    cfg.with_paths(out="r").require_paths(data=False)
    moved = cfg.with_paths(data=tmp_path / "ds", out="r")
    assert moved.data.path == str(tmp_path / "ds") and moved.out == "r" and cfg.data.path == ""
    assert config_hash(moved) == config_hash(cfg) and config_diff(cfg, moved) == []


def test_cpu_fp32_is_the_cpu_preset_without_bf16_on_its_own_schedule_and_nothing_else():
    cpu = to_dict(resolve(PretrainConfig, "cpu", group="pretrain"))
    fp32 = to_dict(resolve(PretrainConfig, "cpu-fp32", group="pretrain"))
    assert (cpu["amp"], fp32["amp"]) == ("auto", "off")  # auto: bf16 where the CPU has it natively
    assert (cpu["model"]["point_init"], fp32["model"]["point_init"]) == ("kaiming", "default")
    assert (cpu["iterations"], fp32["iterations"]) == (3000, 2000)
    # cpu: the validated 4,000-step schedule (decay at 2,600) stopped at 3,000; cpu-fp32 decays at 65 %
    assert (cpu["optim"]["step_size"], fp32["optim"]["step_size"]) == (2600, 1300)
    same = {**fp32, "amp": "auto", "iterations": 3000, "model": {**fp32["model"], "point_init": "kaiming"},
            "optim": {**fp32["optim"], "step_size": 2600}}
    assert same == cpu
