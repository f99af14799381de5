"""End-to-end: the demo pipeline (prepare -> pretrain -> evaluate) at a tiny size."""

from __future__ import annotations

import json

import pytest

from xmodal.config import apply_overrides, load_config
from xmodal.data.prepare_config import PrepareConfig
from xmodal.demo import demo
from xmodal.demo_config import DemoConfig
from xmodal.errors import ConfigError
from xmodal.eval.config import EvaluateConfig


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    cfg = DemoConfig(
        out=tmp_path / "demo",
        workers=1,
        source="builtin:shapes?train=3&test=2",
        views=4,
        points=128,
        image_size=32,
        pretrain_preset="smoke",
    )
    report = demo(apply_overrides(cfg, ["partseg.epochs=1", "partseg.num_points=64", "partseg.fractions=[0.2, 1.0]",
                                        "svm.cs=[0.01, 1.0]"]), progress=False)
    assert report.is_file()
    text = report.read_text()
    for table in ("Table 1", "Table 2", "Table 3", "Table 4"):
        assert table in text
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    for key in ("pretext.cm_accuracy", "svm3d.accuracy", "retrieval3d.top1", "svm2d.accuracy.1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert "baseline.random.svm3d.accuracy" in metrics
    assert any(k.startswith("partseg.finetune.") for k in metrics)
    # each stage's resolved config beside its output, the demo's in its folder
    root = tmp_path / "demo"
    assert load_config(DemoConfig, root / "demo.yaml").partseg.epochs == 1
    assert load_config(PrepareConfig, root / "data" / "prepare.yaml").points == 128
    ecfg = load_config(EvaluateConfig, root / "report" / "evaluate.yaml")
    assert (ecfg.partseg.num_points, ecfg.partseg.fractions, ecfg.baseline) == (64, [0.2, 1.0], "random")
    # every stage resumes: a second call finds everything done and rewrites only the report
    run_files = sorted(p.name for p in (tmp_path / "demo" / "run").iterdir())
    demo(DemoConfig(out=tmp_path / "demo", workers=1, source="builtin:shapes?train=3&test=2", views=4, points=128,
                    image_size=32, pretrain_preset="smoke", tasks=["svm"]), progress=False)
    assert sorted(p.name for p in (tmp_path / "demo" / "run").iterdir()) == run_files
    assert load_config(EvaluateConfig, root / "report" / "evaluate.yaml").tasks == ["svm"]


def test_demo_config_defaults_and_the_stage_configs_it_builds(tmp_path):
    from xmodal.demo import evaluate_config, prepare_config, pretrain_overrides

    cfg = DemoConfig(out=tmp_path / "d", seed=7, points=128, iterations=30, pretrain_overrides=["optim.lr=0.01"])
    cfg.validate()
    DemoConfig().validate()  # the defaults are valid (out is checked when the demo runs)
    p = prepare_config(cfg)
    assert p.out == str(tmp_path / "d" / "data")
    assert (p.seed, p.points, p.views, p.image_size, p.workers) == (7, 128, 12, 64, 2)
    assert pretrain_overrides(cfg) == ["seed=7", "optim.lr=0.01", "iterations=30"]
    e = evaluate_config(cfg)
    e.validate()
    assert (e.run, e.data, e.out) == tuple(str(tmp_path / "d" / s) for s in ("run", "data", "report"))
    assert e.seed == 7 and e.baseline == "random" and e.views == [1, 4, 8, 12]
    assert e.fewshot.settings == [(5, 1), (5, 5)] and e.fewshot.query == 3
    assert (e.partseg.epochs, e.partseg.batch_size, e.partseg.num_points) == (5, 16, 128)  # 256 capped at points


def test_demo_config_overrides_keep_the_demo_defaults_of_a_section():
    from xmodal.config import resolve

    cfg = resolve(DemoConfig, None, ["partseg.epochs=1", "fewshot.query=2"])
    assert (cfg.partseg.epochs, cfg.partseg.num_points, cfg.partseg.batch_size) == (1, 256, 16)
    assert cfg.fewshot.settings == [(5, 1), (5, 5)] and cfg.fewshot.query == 2
    with pytest.raises(ConfigError, match="^eval_views"):
        apply_overrides(cfg, ["eval_views=[0]"])
    with pytest.raises(ConfigError, match="unknown evaluation task"):
        apply_overrides(cfg, ["tasks=[nope]"])
    with pytest.raises(ConfigError, match="out"):
        demo(cfg)


def test_demo_cli_print_config(tmp_path, capsys):
    import yaml

    from xmodal.cli import main
    from xmodal.config import from_dict

    code = main(["-q", "demo", "--out", str(tmp_path / "d"), "--workers", "1", "--seed", "2", "partseg.epochs=2",
                 "--print-config"])
    assert code == 0
    cfg = from_dict(DemoConfig, yaml.safe_load(capsys.readouterr().out))
    assert (cfg.out, cfg.workers, cfg.seed, cfg.iterations, cfg.partseg.epochs) == (str(tmp_path / "d"), 1, 2, None, 2)
    assert not (tmp_path / "d").exists()
