"""Tests for xmodal.config: defaults <- preset <- key=value overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from xmodal.config import (
    ConfigError,
    apply_overrides,
    check_device,
    check_keys,
    from_dict,
    list_presets,
    load_config,
    load_preset,
    parse_overrides,
    paths_to_str,
    require_fields,
    resolve,
    save_config,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 0.1
    momentum: float = 0.9


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    device: Optional[str] = None
    flag: bool = False
    optim: Optim = field(default_factory=Optim)

    def validate(self):
        if self.steps <= 0:
            raise ConfigError(f"steps must be > 0, got {self.steps}")


def test_parse_overrides_nested_and_yaml_values():
    d = parse_overrides(["optim.lr=1e-3", "sizes=[3, 4]", "flag=true", "name=abc"])
    assert d == {"optim": {"lr": 1e-3}, "sizes": [3, 4], "flag": True, "name": "abc"}


def test_parse_overrides_rejects_missing_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_apply_overrides_and_types():
    cfg = apply_overrides(Cfg(), ["optim.lr=0.5", "steps=3", "mode=b", "device=cuda"])
    assert cfg.optim.lr == 0.5 and cfg.steps == 3 and cfg.mode == "b" and cfg.device == "cuda"
    assert cfg.optim.momentum == 0.9  # untouched sibling keeps its value


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key"),
        ("steps=abc", "expected an integer"),
        ("mode=c", "is not one of"),
        ("flag=3", "expected true/false"),
        ("steps=0", "steps must be > 0"),
    ],
)
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Cfg(), [override])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as exc:
        from_dict(Cfg, {"optim": {"lrr": 1}})
    assert "optim.lr" in str(exc.value)


def test_save_load_roundtrip(tmp_path):
    cfg = apply_overrides(Cfg(), ["optim.lr=0.25", "sizes=[7]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Cfg, tmp_path / "c.yaml") == cfg
    assert to_dict(cfg)["optim"]["lr"] == 0.25


def test_resolve_from_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "preset.yaml"
    p.write_text("steps: 5\noptim:\n  lr: 0.01\n")
    cfg = resolve(Cfg, str(p), ["optim.lr=0.02"])
    assert cfg.steps == 5 and cfg.optim.lr == 0.02


def test_unknown_preset_names_available(tmp_path):
    with pytest.raises(ConfigError, match="unknown pretrain preset"):
        load_preset("pretrain", "does-not-exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_preset("pretrain", str(bad))


def test_broken_yaml_is_one_line_with_its_position(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("optim:\n  lr: [0.1, 0.2\nsteps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_preset("pretrain", str(bad))
    text = str(info.value)
    assert text.startswith(f"{bad}: invalid YAML (line 3, column 6: expected ',' or ']'") and "\n" not in text


def test_unknown_key_of_a_preset_names_the_preset_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("steps: 5\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        resolve(Cfg, str(p))
    assert str(info.value).startswith(f"{p}: unknown config key(s) optim.lrr; did you mean optim.lr? "
                                      "valid keys here: optim.lr")
    # a mistyped override is the command line's, not the preset's
    p.write_text("steps: 5\n")
    with pytest.raises(ConfigError) as info:
        resolve(Cfg, str(p), ["optim.lrr=1"])
    assert str(info.value).startswith("unknown config key(s) optim.lrr")


def test_check_keys_walks_nested_sections_without_checking_values():
    check_keys(Cfg, {"steps": "not a number", "optim": {"lr": -5}})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) optim\.x"):
        check_keys(Cfg, {"optim": {"x": 1}})


def test_shipped_pretrain_presets_present():
    assert {"paper", "cpu", "smoke"} <= set(list_presets("pretrain"))


@dataclass
class Outer:
    out: str = ""
    #: a section whose default differs from its class's defaults
    optim: Optim = field(default_factory=lambda: Optim(lr=0.5))

    def __post_init__(self):
        paths_to_str(self, "out")


def test_a_partial_section_completes_the_fields_own_default(tmp_path):
    cfg = from_dict(Outer, {"optim": {"momentum": 0.5}})
    assert cfg.optim == Optim(lr=0.5, momentum=0.5)  # lr from the field's default, not Optim's 0.1
    assert resolve(Outer, None, ["optim.momentum=0.25"]).optim.lr == 0.5
    assert from_dict(Outer, {}).optim.lr == 0.5


def test_paths_to_str_and_require_fields(tmp_path):
    from pathlib import Path

    cfg = Outer(out=Path(tmp_path) / "x")
    assert cfg.out == str(tmp_path / "x")
    save_config(cfg, tmp_path / "o.yaml")  # plain strings dump as YAML
    assert load_config(Outer, tmp_path / "o.yaml") == cfg
    require_fields(cfg, "out")
    with pytest.raises(ConfigError, match="^out: required"):
        require_fields(Outer(), "out")
    # a dotted name is a field of a nested section
    require_fields(Outer(), "optim.lr")
    with pytest.raises(ConfigError, match="^name, optim.lr: required") as info:
        require_fields(Cfg(name="", optim=Optim(lr=None)), "name", "steps", "optim.lr", hint="give them")
    assert info.value.hint == "give them"


@pytest.mark.parametrize("device, ok", [("auto", True), ("cpu", True), ("cuda", True), ("cuda:1", True),
                                         ("gpu", False), ("cuda:x", False)])
def test_check_device(device, ok):
    if ok:
        check_device("device", device)
    else:
        with pytest.raises(ConfigError, match="^device must be"):
            check_device("device", device)


def test_literal_option_named_like_a_yaml_boolean():
    """`amp=off` on the command line: YAML reads `off` as False; the option keeps its name."""
    from xmodal.train.config import PretrainConfig

    assert resolve(PretrainConfig, None, ["amp=off"]).amp == "off"
    with pytest.raises(ConfigError, match="amp: True is not one of"):
        resolve(PretrainConfig, None, ["amp=yes"])


def test_a_mistyped_key_gets_a_guess():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) lr; did you mean optim.lr\? valid keys here: name"):
        from_dict(Cfg, {"lr": 0.5})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) stpes; did you mean steps\?"):
        from_dict(Cfg, {"stpes": 5})
    with pytest.raises(ConfigError) as info:
        from_dict(Cfg, {"zzz": 5})
    assert "did you mean" not in str(info.value)


def test_a_preset_inherits_a_relative_path_from_beside_itself(tmp_path, monkeypatch):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "base.yaml").write_text("steps: 7\nname: base\n")
    (tmp_path / "u" / "child.yaml").write_text("inherit: base.yaml\nname: child\n")
    monkeypatch.chdir(tmp_path)  # not the files' folder
    assert load_preset("pretrain", "u/child.yaml") == {"steps": 7, "name": "child"}
    (tmp_path / "u" / "orphan.yaml").write_text("inherit: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"u/orphan.yaml: 'inherit: nowhere.yaml': nowhere.yaml: no such preset file"):
        load_preset("pretrain", "u/orphan.yaml")
    with pytest.raises(ConfigError, match=r"nofile.yaml: no such preset file"):
        load_preset("pretrain", "./nofile.yaml")


def test_the_presets_mirrored_at_the_top_of_the_repository_are_the_shipped_ones():
    from pathlib import Path

    from xmodal.config import _preset_dir

    mirror = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
    if not mirror.is_dir():
        pytest.skip("not a source checkout")
    shipped = {p.name: p.read_bytes() for p in Path(str(_preset_dir("pretrain"))).glob("*.yaml")}
    assert shipped and {p.name: p.read_bytes() for p in mirror.glob("*.yaml")} == shipped
