"""Tests for the command line: parsing, help, and clear errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xmodal.cli import EVAL_TASKS, build_parser, main


def test_help_lists_every_command():
    text = build_parser().format_help()
    for cmd in ("prepare", "show", "pretrain", "evaluate", "demo"):
        assert cmd in text


def test_module_entry_point_version():
    r = subprocess.run([sys.executable, "-m", "xmodal", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("xmodal ")


@pytest.mark.parametrize(
    "argv",
    [
        ["prepare", "--out", "x"],  # --source missing
        ["prepare", "--source", "s", "--out", "x", "--points", "0"],
        ["prepare", "--source", "s", "--out", "x", "--views", "-1"],
        ["evaluate", "--run", "r", "--data", "d", "--out", "o", "--task", "nope"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2


def test_evaluate_accepts_repeated_tasks():
    args = build_parser().parse_args(
        ["evaluate", "--run", "r", "--data", "d", "--out", "o", "--task", "svm", "--task", "retrieval"]
    )
    assert args.task == ["svm", "retrieval"] and set(args.task) <= set(EVAL_TASKS)


def test_pretrain_collects_overrides():
    args = build_parser().parse_args(["pretrain", "--data", "d", "--out", "r", "--preset", "smoke", "optim.lr=0.1", "iterations=3"])
    assert args.overrides == ["optim.lr=0.1", "iterations=3"] and args.preset == "smoke"


def test_overrides_may_follow_an_option(capsys):
    argv = ["-q", "pretrain", "optim.lr=0.125", "--preset", "smoke", "iterations=3", "--data", "d", "out=r",
            "--print-config"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lr: 0.125" in out and "iterations: 3" in out and "path: d" in out and "out: r" in out


@pytest.mark.parametrize("stray", ["--bogus", "plain"])
def test_stray_arguments_are_still_refused(stray, capsys):
    with pytest.raises(SystemExit) as info:
        main(["-q", "pretrain", "iterations=3", "--preset", "smoke", stray, "--print-config"])
    assert info.value.code == 2 and f"unrecognized arguments: {stray}" in capsys.readouterr().err


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    code = main(["-q", "prepare", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "nowhere" in err and "Traceback" not in err


def test_pretrain_bad_override_is_a_clear_error(tmp_path, capsys):
    code = main(["-q", "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--preset", "smoke", "optim.lrr=1", "--print-config"])
    err = capsys.readouterr().err
    assert code == 2 and "optim.lrr" in err


def test_print_config_shows_resolved_values(tmp_path, capsys):
    code = main(["-q", "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--preset", "smoke", "optim.lr=0.125", "--print-config"])
    out = capsys.readouterr().out
    assert code == 0 and "lr: 0.125" in out


def test_pretrain_print_config_needs_no_folders(capsys):
    """`xmodal pretrain --print-config --preset paper` shows §4.1 without a dataset or a run folder."""
    assert main(["-q", "pretrain", "--print-config", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    for line in ("lr: 0.001", "momentum: 0.9", "weight_decay: 0.0005", "step_size: 40000", "iterations: 120000",
                 "batch_size: 32", "num_points: 2048", "image_size: 224", "pair_input_norm: none", "amp: 'off'"):
        assert line in out


def test_pretrain_without_data_or_out_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["-q", "pretrain", "--out", str(tmp_path / "r")])
    assert info.value.code == 2 and "the following arguments are required: --data" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
