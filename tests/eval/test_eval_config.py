"""EvaluateConfig and PartSegConfig: defaults, validation naming the key, overrides, the CLI mapping."""

from __future__ import annotations

import re

import pytest
import yaml

from xmodal.cli import main
from xmodal.config import apply_overrides, from_dict
from xmodal.errors import ConfigError
from xmodal.eval.config import EvaluateConfig, PartSegConfig
from xmodal.eval.svm import DEFAULT_CS


def test_defaults_are_valid_and_the_papers_protocol():
    cfg = EvaluateConfig()
    cfg.validate()
    assert cfg.views == [1, 12, 36, 80] and cfg.retrieval.ks == [1, 5, 10, 20, 50]
    assert cfg.tasks == ["all"] and cfg.baseline is None and cfg.device == "auto"
    assert tuple(cfg.svm.cs) == DEFAULT_CS
    assert cfg.partseg.settings == ["frozen", "finetune", "scratch"] and cfg.partseg.fractions == [0.02, 0.2, 1.0]
    assert (cfg.partseg.lr, cfg.partseg.step_epochs, cfg.partseg.gamma) == (0.003, 20, 0.1)  # §4.1
    assert from_dict(EvaluateConfig, {}) == cfg
    PartSegConfig().validate()


@pytest.mark.parametrize(
    "override, key",
    [
        ("views=[0]", "views"),
        ("tasks=[svn]", "tasks"),
        ("baseline=imagenet", "baseline"),
        ("baseline_seed=abc", "baseline_seed"),
        ("point_subsets=0", "point_subsets"),
        ("point_subsets=1.5", "point_subsets"),
        ("device=gpu", "device"),
        ("svm.cs=[0.0]", "svm.cs"),
        ("svm.solver=sgd", "svm.solver"),
        ("retrieval.ks=[0]", "retrieval.ks"),
        ("fewshot.settings=[[1, 5]]", "fewshot.settings"),
        ("fewshot.query=0", "fewshot.query"),
        ("crossmodal.max_gallery=0", "crossmodal.max_gallery"),
        ("partseg.settings=[bogus]", "partseg.settings"),
        ("partseg.fractions=[1.5]", "partseg.fractions"),
        ("partseg.epochs=0", "partseg.epochs"),
        ("partseg.dropout=1.0", "partseg.dropout"),
        ("partseg.num_points=0", "partseg.num_points"),
    ],
)
def test_a_bad_value_is_rejected_naming_its_key(override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + r"\b"):
        apply_overrides(EvaluateConfig(), [override])


def test_unknown_nested_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        apply_overrides(EvaluateConfig(), ["partseg.epoch=3"])
    assert "partseg.epoch" in str(exc.value) and "partseg.epochs" in str(exc.value)


def test_nested_overrides_keep_their_siblings():
    cfg = apply_overrides(EvaluateConfig(), ["partseg.epochs=5", "fewshot.settings=[[5, 1]]", "svm.cs=[0.1, 1]"])
    assert cfg.partseg.epochs == 5 and cfg.partseg.batch_size == 16
    assert cfg.fewshot.settings == [(5, 1)] and cfg.fewshot.query == 20
    assert cfg.svm.cs == [0.1, 1.0] and cfg.svm.solver == "auto"
    assert apply_overrides(EvaluateConfig(), ["svm.solver=newton"]).svm.cs == list(DEFAULT_CS)


def test_evaluate_needs_run_data_and_out(tmp_path):
    from xmodal.eval.runner import evaluate

    with pytest.raises(ConfigError, match="run, data"):
        evaluate(EvaluateConfig(out=tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_cli_flags_map_onto_the_config(tmp_path, capsys):
    argv = ["-q", "evaluate", "--run", "r", "--data", "d", "--out", "o", "--task", "svm", "--task", "partseg",
            "--baseline", "random", "--partseg-data", str(tmp_path / "snp"), "--partseg-epochs", "3",
            "--partseg-points", "64", "--seed", "4", "--device", "cpu", "partseg.lr=0.01", "--views", "1", "4",
            "--baseline-seed", "7", "--point-subsets", "2", "--print-config"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    want = apply_overrides(
        EvaluateConfig(run="r", data="d", out="o", tasks=["svm", "partseg"], baseline="random", seed=4, device="cpu",
                       views=[1, 4], partseg_data=str(tmp_path / "snp"), baseline_seed=7, point_subsets=2),
        ["partseg.epochs=3", "partseg.num_points=64", "partseg.lr=0.01"],
    )
    assert from_dict(EvaluateConfig, printed) == want


def test_cli_without_optional_flags_gives_the_defaults(capsys):
    assert main(["-q", "evaluate", "--run", "r", "--data", "d", "--out", "o", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert from_dict(EvaluateConfig, printed) == EvaluateConfig(run="r", data="d", out="o")


def test_cli_bad_override_is_a_clear_error(capsys):
    argv = ["-q", "evaluate", "--run", "r", "--data", "d", "--out", "o", "fewshot.querry=3", "--print-config"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "fewshot.querry" in err and "fewshot.query" in err and "Traceback" not in err


def test_finetune_trains_batchnorm_by_default():
    from xmodal.eval.config import PartSegConfig

    assert PartSegConfig().finetune_point_bn == "train"
