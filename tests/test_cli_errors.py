"""The CLI's one-line errors: ``xmodal <cmd>: error: <file or object>: <problem>``, exit code 2,
no traceback (unless ``--verbose``), for failures caused by the user's input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from xmodal.cli import main
from xmodal.data.store import write_store


def _split(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "ids": [f"c{i % 2}/o{i}" for i in range(n)],
        "labels": np.arange(n) % 2,
        "points": rng.normal(size=(n, 32, 3)).astype(np.float32),
        "images": rng.integers(0, 256, size=(n, 2, 16, 16), dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    write_store(root / "test_only", classes=["a", "b"], splits={"test": _split(3)})
    write_store(root / "data", classes=["a", "b"], splits={"train": _split(4), "test": _split(3, 1)})
    (root / "file").write_text("a regular file\n")
    return root


def _run_folder(root, weights: bytes):
    """A run folder whose encoders.json is fine and whose encoders.safetensors holds ``weights``."""
    root.mkdir()
    (root / "encoders.json").write_text(json.dumps({"format": "xmodal-encoders", "format_version": 1}))
    (root / "encoders.safetensors").write_bytes(weights)
    return root


def _error(capsys, argv: list[str], command: str, verbose: bool = False) -> str:
    """Run the CLI, check exit code 2 and the shape of stderr; return the error line."""
    code = main(["-q", *(["--verbose"] if verbose else []), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.rstrip("\n").split("\n")
    if verbose:
        assert lines[0].startswith("Traceback (most recent call last):")
        lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith(f"xmodal {command}: error: ")):]
    else:
        assert "Traceback" not in err
    assert lines[0].startswith(f"xmodal {command}: error: ")
    assert all(ln.startswith("  hint: ") for ln in lines[1:]), err  # at most a hint below the line
    return lines[0]


def test_show_an_index_on_a_dataset_without_train(tree, capsys):
    line = _error(capsys, ["show", str(tree / "test_only"), "--object", "0", "--out", str(tree / "x.png")], "show")
    assert line == (f"xmodal show: error: {tree / 'test_only'}: no split 'train' to take object 0 from "
                    "(splits: test)")


def test_show_an_unknown_object_id(tree, capsys):
    line = _error(capsys, ["show", str(tree / "data"), "--object", "no/such/id", "--out", str(tree / "x.png")], "show")
    assert line.startswith(f"xmodal show: error: {tree / 'data'}: no object 'no/such/id'")
    assert "c0/o0" in line  # suggestions from the dataset


def test_prepare_into_a_path_below_a_file(tree, capsys):
    argv = ["prepare", "--source", "builtin:shapes?train=1&test=0", "--out", str(tree / "file" / "sub"),
            "--views", "1", "--points", "16", "--image-size", "16"]
    line = _error(capsys, argv, "prepare")
    assert f"{tree / 'file'}" in line and "is a file, not a folder" in line
    assert (tree / "file").read_text() == "a regular file\n"


def test_evaluate_into_a_path_below_a_file(tree, capsys):
    argv = ["evaluate", "--run", str(tree / "no_run"), "--data", str(tree / "data"), "--out",
            str(tree / "file" / "sub"), "--task", "svm"]
    line = _error(capsys, argv, "evaluate")
    assert line.startswith(f"xmodal evaluate: error: {tree / 'file'}") and "is a file, not a folder" in line


@pytest.mark.parametrize("kind", ["truncated", "pickle"])
def test_evaluate_a_run_with_unreadable_weights(tree, tmp_path, capsys, kind):
    good = tmp_path / "good.safetensors"
    save_file({"image_encoder/w": torch.zeros(64, 64)}, str(good))
    blob = good.read_bytes()
    weights = blob[: len(blob) // 2] if kind == "truncated" else pickle.dumps({"image_encoder/w": np.zeros(3)})
    run = _run_folder(tmp_path / "run", weights)
    argv = ["evaluate", "--run", str(run), "--data", str(tree / "data"), "--out", str(tmp_path / "report"),
            "--task", "svm"]
    line = _error(capsys, argv, "evaluate")
    problem = "not a readable safetensors file" if kind == "truncated" else "a pickle / torch.save file, not safetensors"
    assert line.startswith(f"xmodal evaluate: error: {run / 'encoders.safetensors'}: {problem}")


def test_verbose_prints_the_traceback_above_the_line(tree, capsys):
    argv = ["show", str(tree / "data"), "--object", "no/such/id", "--out", str(tree / "x.png")]
    line = _error(capsys, argv, "show", verbose=True)
    assert "no object 'no/such/id'" in line


def test_a_bug_is_not_turned_into_a_line(tree, monkeypatch):
    # a plain ValueError from inside a command is a bug: it propagates with its traceback
    import xmodal.data.show as show_mod

    def broken(*args, **kwargs):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(show_mod, "show", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["-q", "show", str(tree / "data"), "--object", "0", "--out", str(tree / "x.png")])


def test_evaluate_without_data_names_it_unless_partseg_data_is_the_one_input(tree, tmp_path, capsys):
    argv = ["evaluate", "--run", str(tree / "no_run"), "--out", str(tmp_path / "report"), "--task", "svm"]
    line = _error(capsys, argv, "evaluate")
    assert "data: required, but not given" in line
    assert not (tmp_path / "report").exists()
    # part segmentation on --partseg-data alone: --data is not asked for (the run is what is missing)
    argv = ["evaluate", "--run", str(tree / "no_run"), "--out", str(tmp_path / "report"), "--task", "partseg",
            "--partseg-data", str(tree / "data")]
    line = _error(capsys, argv, "evaluate")
    assert "data: required" not in line and str(tree / "no_run") in line


def test_an_override_swallowed_by_views_is_named_and_double_dash_works(tmp_path, capsys):
    import yaml

    base = ["-q", "evaluate", "--run", "r", "--data", "d", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        main([*base, "--views", "1", "12", "svm.cs=[0.1]"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --views: 'svm.cs=[0.1]' is a key=value override, not a positive integer" in err
    assert "before --views (or after '--')" in err
    assert main([*base, "--print-config", "--views", "1", "12", "--", "svm.cs=[0.1]"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["views"] == [1, 12] and cfg["svm"]["cs"] == [0.1]
