"""Configuration schema machinery: dataclasses, YAML presets, ``key=value`` overrides.

Each stage declares its settings as (nested) dataclasses. A run's settings are
resolved in this order, later wins:

1. the dataclass defaults,
2. a preset YAML file (``configs/<group>/<name>.yaml``, shipped inside the
   package) or any YAML file path,
3. ``key=value`` overrides from the command line, with dotted keys for nested
   fields (``optim.lr=0.01``); values are parsed as YAML (``true``, ``1e-3``,
   ``[1, 2]``).

Unknown keys are rejected with the list of valid ones, so a typo never goes
silently unused. The resolved config is written next to every run
(:func:`save_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import reprlib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, TypeVar

import yaml

from xmodal.errors import ConfigError
from xmodal.utils.io import atomic_write

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "from_dict",
    "check_keys",
    "to_dict",
    "apply_overrides",
    "parse_overrides",
    "load_preset",
    "list_presets",
    "resolve",
    "save_config",
    "load_config",
    "paths_to_str",
    "require_fields",
    "check_device",
]


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _short_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, 60, 60
    return r


#: bounded ``repr`` of a value in an error message (a YAML file may nest aliases exponentially)
_short = _short_repr().repr


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain nested dict (JSON/YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a parsed value against a field's annotated type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {_short(value)} does not match {tp}")
    if origin is typing.Literal:
        options = typing.get_args(tp)
        if isinstance(value, bool) and value not in options:
            # YAML 1.1 reads a bare off / no / on / yes as a boolean: give the option back its name
            words = ("off", "no", "false") if value is False else ("on", "yes", "true")
            value = next((w for w in words if w in options), value)
        if not isinstance(value, (str, int, float, bool, type(None))) or value not in options:
            raise ConfigError(f"{key}: {_short(value)} is not one of {list(options)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp) or (Any,)
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis:  # tuple[X, Y]: exactly that many
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {_short(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_short(value)}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_short(value)}")
        return from_dict(tp, value, _prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {_short(value)}")
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept plain numeric text
        try:
            value = int(value) if tp is int else float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return value
    if tp is str:
        if isinstance(value, (list, dict, set, tuple)):
            raise ConfigError(f"{key}: expected a text value, got {_short(value)}")
        return value if isinstance(value, str) else str(value)
    return value


def _field_default(cls, name: str) -> Any:
    """The default value of field ``name`` of dataclass ``cls`` (None when it has none)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _refuse_unknown(cls: type, data: dict, prefix: str) -> dict:
    """The field types of ``cls``; a :class:`ConfigError` listing the keys of ``data`` it lacks."""
    types_ = _field_types(cls)
    unknown = sorted(map(str, set(data) - set(types_)))
    if unknown:
        guesses = [g for u in unknown for g in _guesses(cls, u, prefix)]
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            + (f"did you mean {' or '.join(dict.fromkeys(guesses))}? " if guesses else "")
            + f"valid keys here: {', '.join(prefix + k for k in types_)}"
        )
    return types_


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls``, nested sections included."""
    keys = []
    for name, tp in _field_types(cls).items():
        keys.append(prefix + name)
        if _is_dataclass_type(tp):
            keys += _all_keys(tp, prefix + name + ".")
    return keys


def _guesses(cls: type, key: str, prefix: str) -> list[str]:
    """Keys of ``cls`` a mistyped ``key`` may have meant: a nested key ending in it (``lr`` ->
    ``optim.lr``), else close spellings at this level (``iteratons`` -> ``iterations``)."""
    keys = _all_keys(cls)
    nested = [prefix + k for k in keys if k.endswith("." + key)]
    if nested:
        return nested
    return [prefix + k for k in difflib.get_close_matches(key, [k for k in keys if "." not in k], n=2, cutoff=0.75)]


def check_keys(cls: type, data: dict | None, *, _prefix: str = "") -> None:
    """Refuse, as :func:`from_dict` would, a key of the nested dict ``data`` that ``cls`` (or one of
    its nested sections) lacks, without checking or converting any value."""
    if not isinstance(data, dict):
        return
    _refuse_unknown(cls, data, _prefix)
    for name, value in data.items():
        default = _field_default(cls, name)
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            check_keys(type(default), value, _prefix=f"{_prefix}{name}.")


def from_dict(cls: type[T], data: dict | None, *, _prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (partial) nested dict; missing keys keep defaults."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{_prefix.rstrip('.') or 'config'}: expected a mapping, got {_short(data)}")
    data = dict(data or {})
    types_ = _refuse_unknown(cls, data, _prefix)
    kwargs = {}
    for name, tp in types_.items():
        if name in data:
            value = data[name]
            default = _field_default(cls, name)
            if isinstance(value, dict) and dataclasses.is_dataclass(default):
                # a partial nested section completes the field's own default, which may differ
                # from its class's defaults (``field(default_factory=lambda: Section(epochs=5))``)
                value = _deep_merge(to_dict(default), value)
            kwargs[name] = _coerce(value, tp, _prefix + name)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def parse_overrides(items: Iterable[str]) -> dict:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict with YAML-parsed values."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            raise ConfigError(f"override {_short(item)}: cannot parse value ({type(exc).__name__}: "
                              f"{_short(str(exc))})") from None
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 leaves "1e-3" as text
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _deep_merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(cfg: T, overrides: dict | Iterable[str]) -> T:
    """Return a new config with ``overrides`` (a nested dict or ``key=value`` strings) applied."""
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    return from_dict(type(cfg), _deep_merge(to_dict(cfg), overrides))


def _preset_dir(group: str):
    return resources.files("xmodal") / "configs" / group


def list_presets(group: str) -> list[str]:
    """Names of the YAML presets shipped for ``group`` (e.g. ``"pretrain"``)."""
    d = _preset_dir(group)
    if not d.is_dir():
        return []
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


#: top-level key of a preset naming the preset it extends (its values apply first)
INHERIT_KEY = "inherit"


def load_preset(group: str, name_or_path: str, *, _chain: tuple = ()) -> dict:
    """Load a preset by name (shipped) or by path to a YAML file, as a nested dict.

    A preset may start from another one: ``inherit: paper`` at its top level loads ``paper``
    first and applies this file's values on top (chains allowed, cycles refused).
    """
    if name_or_path in _chain:
        raise ConfigError(f"{group} preset {name_or_path!r} inherits from itself ({' -> '.join(_chain + (name_or_path,))})")
    data, src = _read_preset(group, name_or_path)
    parent = data.pop(INHERIT_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{src}: '{INHERIT_KEY}' must name a preset, got {parent!r}")
    beside = Path(src).parent / parent  # a relative YAML path is the inheriting file's neighbour
    spec = str(beside) if _is_yaml_path(parent) and not Path(parent).is_absolute() and beside.exists() else parent
    try:
        base = load_preset(group, spec, _chain=_chain + (name_or_path,))
    except ConfigError as exc:
        raise ConfigError(f"{src}: '{INHERIT_KEY}: {parent}': {exc}") from exc
    return _deep_merge(base, data)


def _is_yaml_path(spec: str) -> bool:
    return Path(spec).suffix in (".yaml", ".yml")


def _preset_source(group: str, name_or_path: str) -> str:
    """The YAML file of a preset: ``name_or_path`` itself when it is one, else the shipped preset."""
    p = Path(name_or_path)
    if _is_yaml_path(name_or_path):
        if not p.is_file():
            raise ConfigError("no such preset file" if not p.exists() else "not a file", path=p)
        return str(p)
    f = _preset_dir(group) / f"{name_or_path}.yaml"
    if not f.is_file():
        raise ConfigError(
            f"unknown {group} preset {name_or_path!r}; available: {', '.join(list_presets(group)) or 'none'} "
            "(or give a path to a .yaml file)"
        )
    return str(f)


def _read_preset(group: str, name_or_path: str) -> tuple[dict, str]:
    src = _preset_source(group, name_or_path)
    data = _read_yaml(src)
    if not isinstance(data, dict):
        raise ConfigError("a preset must be a mapping at top level", path=src)
    return data, src


def _yaml_problem(exc: Exception) -> str:
    """One line for a YAML error: ``line L, column C: <problem> (<context>)``."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f", {context}" if context else "")


def _read_yaml(path: "str | os.PathLike") -> Any:
    """The YAML document in ``path`` ({} when empty).

    Raises:
        ConfigError: naming the file: not UTF-8, not YAML, or nested too deeply to parse.
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return yaml.safe_load(raw.decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", path=path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML ({_yaml_problem(exc)})", path=path) from None
    except RecursionError:
        raise ConfigError("YAML nested too deeply to read", path=path) from None
    except ValueError as exc:  # a value YAML's constructors refuse (an integer of over 4300 digits, a date)
        raise ConfigError(f"unreadable YAML value ({exc})", path=path) from None


def resolve(cls: type[T], preset: str | None = None, overrides: Iterable[str] | dict = (), *, group: str = "") -> T:
    """Defaults <- preset <- overrides, validated."""
    data: dict = {}
    if preset:
        data = load_preset(group, preset)
        try:
            check_keys(cls, data)
        except ConfigError as exc:  # the key is the preset's (or a preset's it inherits): name the file
            raise ConfigError(exc.problem, path=_preset_source(group, preset), hint=exc.hint) from None
    ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return from_dict(cls, _deep_merge(data, ov))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    with atomic_write(path) as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


def load_config(cls: type[T], path: str | Path) -> T:
    """The config ``cls`` saved in the YAML file ``path`` (by :func:`save_config`).

    Raises:
        ConfigError: naming the file: unreadable YAML, or a value the config refuses.
        OSError: the file cannot be opened.
    """
    data = _read_yaml(path)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(str(exc), path=path, hint=exc.hint) from exc


def paths_to_str(cfg: Any, *names: str) -> None:
    """Replace path-like values (``pathlib.Path``) of ``cfg``'s fields ``names`` by ``str``.

    Called from a config's ``__post_init__`` so that ``Config(out=Path(...))`` holds plain
    strings, as a config read from YAML does, and can be saved with :func:`save_config`.
    """
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, os.PathLike):
            setattr(cfg, name, os.fspath(value))


def require_fields(cfg: Any, *names: str, hint: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` (with ``hint``) naming every field of ``names`` that is empty
    (``""`` or None); a dotted name (``data.path``) is a field of a nested section.

    Inputs and outputs of a stage (``source``, ``out``, ...) have no default, yet a config
    without them is valid (it can be printed, nested or completed later); the stage calls
    this before it runs.
    """
    missing = [n for n in names if functools.reduce(getattr, n.split("."), cfg) in ("", None)]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required, but not given", hint=hint)


def check_device(key: str, device: str) -> None:
    """``device`` must be ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; else a :class:`ConfigError` naming ``key``."""
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{key} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
