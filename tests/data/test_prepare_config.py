"""PrepareConfig: defaults, validation naming the key, overrides, the CLI mapping, prepare.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from xmodal.cli import build_parser, main
from xmodal.config import apply_overrides, from_dict, load_config, to_dict
from xmodal.data.prepare_config import PrepareConfig
from xmodal.errors import ConfigError
from xmodal.utils.lock import LOCK_NAME


def test_defaults_are_valid_and_documented():
    cfg = PrepareConfig()
    cfg.validate()
    assert (cfg.views, cfg.points, cfg.image_size, cfg.workers, cfg.seed) == (12, 2048, 224, 1, 0)
    assert (cfg.chunk_size, cfg.test_ratio, cfg.oversample) == (32, 0.2, 8)
    assert cfg.grayscale and cfg.render_points and not cfg.overwrite
    assert from_dict(PrepareConfig, {}) == cfg


@pytest.mark.parametrize(
    "override, key",
    [("views=-1", "views"), ("points=0", "points"), ("image_size=8", "image_size"), ("workers=0", "workers"),
     ("chunk_size=0", "chunk_size"), ("oversample=0", "oversample"), ("test_ratio=1.0", "test_ratio"),
     ("points=2.5", "points"), ("grayscale=3", "grayscale")],
)
def test_a_bad_value_is_rejected_naming_its_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}\b"):
        apply_overrides(PrepareConfig(), [override])


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        apply_overrides(PrepareConfig(), ["view=3"])
    assert "view" in str(exc.value) and "render_points" in str(exc.value) and "oversample" in str(exc.value)


def test_paths_become_strings():
    cfg = PrepareConfig(source=Path("/data/x"), out=Path("ds"))
    assert cfg.source == "/data/x" and cfg.out == "ds"
    assert to_dict(cfg)["out"] == "ds"


def test_prepare_needs_a_source_and_an_output(tmp_path):
    from xmodal.data.prepare import prepare

    with pytest.raises(ConfigError, match="source"):
        prepare(PrepareConfig(out=tmp_path / "ds"))
    with pytest.raises(ConfigError, match="out"):
        prepare(PrepareConfig(source="builtin:shapes"))
    assert not (tmp_path / "ds").exists()


def test_cli_flags_map_onto_the_config(tmp_path, capsys):
    argv = ["prepare", "--source", "builtin:shapes", "--out", str(tmp_path / "ds"), "--views", "3", "--points", "64",
            "--image-size", "32", "--workers", "2", "--seed", "5", "--chunk-size", "8", "--test-ratio", "0.3", "--rgb",
            "--overwrite", "oversample=4", "render_points=false", "--print-config"]
    assert main(["-q", *argv]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    want = PrepareConfig(source="builtin:shapes", out=str(tmp_path / "ds"), views=3, points=64, image_size=32,
                         workers=2, seed=5, chunk_size=8, test_ratio=0.3, grayscale=False, overwrite=True,
                         oversample=4, render_points=False)
    assert printed == to_dict(want)


def test_cli_without_optional_flags_gives_the_defaults(capsys):
    assert main(["-q", "prepare", "--source", "s", "--out", "o", "--print-config"]) == 0
    import yaml

    assert yaml.safe_load(capsys.readouterr().out) == to_dict(PrepareConfig(source="s", out="o"))
    args = build_parser().parse_args(["prepare", "--source", "s", "--out", "o", "views=2"])
    assert args.overrides == ["views=2"]


def test_cli_override_wins_over_a_flag_and_bad_keys_fail_clearly(capsys):
    assert main(["-q", "prepare", "--source", "s", "--out", "o", "--views", "3", "views=5", "--print-config"]) == 0
    assert "views: 5" in capsys.readouterr().out
    assert main(["-q", "prepare", "--source", "s", "--out", "o", "viewz=5", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "viewz" in err and "valid keys" in err and "Traceback" not in err


def test_prepare_writes_its_resolved_config_beside_the_dataset(tmp_path):
    import xmodal.data.builtin  # noqa: F401  (fails, not skips, if broken)
    from xmodal.data.prepare import CONFIG_NAME, prepare

    cfg = PrepareConfig(source="builtin:shapes?train=1&test=0", out=tmp_path / "ds", views=0, points=32, chunk_size=64)
    prepare(cfg, progress=False)
    saved = load_config(PrepareConfig, tmp_path / "ds" / CONFIG_NAME)
    assert saved == cfg and saved.out == str(tmp_path / "ds")
    # written atomically: no temporary left (only the output lock of xmodal.utils.lock)
    assert [p.name for p in (tmp_path / "ds").glob(".*")] == [LOCK_NAME]
