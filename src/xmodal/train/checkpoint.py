"""Checkpoints and final encoder files of a pre-training run (safetensors + JSON, no pickle).

Files in a run folder ``RUN``::

    RUN/checkpoints/last.safetensors   # model weights + optimizer state tensors (flat names)
    RUN/checkpoints/last.json          # step, scheduler/optimizer/scaler non-tensor state, config hash
    RUN/encoders.safetensors           # final Fimg, Fp, Ff weights
    RUN/encoders.json                  # their architecture (names + kwargs), image size, points, up axis

Tensor names: ``model/<net>/<state-dict key>`` and ``optim/<param index>/<state key>``
in checkpoints (and ``average/<net>/<state-dict key>``, the averaged networks of
:mod:`xmodal.train.averaging`, with weight averaging on), ``<net>/<state-dict key>`` in the
encoder file, where ``<net>`` is ``image_encoder``, ``point_encoder`` or ``pair_classifier``.

Torn pairs: each file is written atomically, the safetensors first, then the JSON,
and the safetensors metadata carries a copy of the JSON state. A crash between the
two writes leaves a JSON whose ``step`` disagrees with the weights'; :func:`load_checkpoint`
detects it and trusts the state embedded in the (newer) weights file, so nothing is
lost and weights are never paired with another step's optimizer state.

Random state: the trainer derives every random number of step ``s`` from
``(seed, s, rank)`` (data in :mod:`xmodal.train.sampler`, torch's RNG re-seeded per
step), so a checkpoint needs no RNG state to resume exactly.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from xmodal.errors import CheckpointError
from xmodal.models.registry import is_dgcnn
from xmodal.utils.io import atomic_path, read_json, write_json

__all__ = [
    "NETS",
    "write_safetensors",
    "CHECKPOINT_DIR",
    "CheckpointError",
    "Checkpoint",
    "architecture_from_config",
    "build_networks",
    "checkpoint_paths",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_step",
    "restore_checkpoint",
    "save_encoders",
    "read_encoders",
    "state_tensors",
    "load_state_tensors",
]

log = logging.getLogger(__name__)

NETS = ("image_encoder", "point_encoder", "pair_classifier")
CHECKPOINT_DIR = "checkpoints"
ENCODERS_FORMAT = "xmodal-encoders"
CHECKPOINT_FORMAT = "xmodal-checkpoint"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- architecture


def architecture_from_config(cfg) -> dict:
    """Names and constructor kwargs of Fimg, Fp and Ff for a :class:`PretrainConfig`.

    Returns ``{"image_encoder": {"name", "kwargs"}, "point_encoder": {...},
    "pair_classifier": {"kwargs"}}``; the pair classifier's feature sizes are filled in by
    :func:`build_networks` from the encoders' ``out_dim``.
    """
    m = cfg.model
    point_kw = {}
    if is_dgcnn(m.point_encoder):
        point_kw["k"] = int(m.k)
        if m.point_init != "default":  # only when set: the architecture of older runs reads the same
            point_kw["init"] = str(m.point_init)
    pair_kw = {"hidden": int(m.pair_hidden), "input_norm": str(m.pair_input_norm)}
    if m.projection_dim > 0:
        pair_kw["projection_dim"] = int(m.projection_dim)
    return {
        "image_encoder": {"name": m.image_encoder, "kwargs": {}},
        "point_encoder": {"name": m.point_encoder, "kwargs": point_kw},
        "pair_classifier": {"kwargs": pair_kw},
    }


def build_networks(arch: dict, *, seed: Optional[int] = None, point_overrides: Optional[dict] = None) -> dict[str, nn.Module]:
    """Instantiate ``{"image_encoder", "point_encoder", "pair_classifier"}`` on the CPU.

    arch: as returned by :func:`architecture_from_config` (or stored in ``encoders.json``);
    its ``pair_classifier.kwargs`` gain ``img_dim``/``pts_dim`` (the encoders' ``out_dim``)
    in place. seed: initialise under ``torch.manual_seed(seed)`` inside a forked RNG (the
    caller's global RNG is left untouched); None: use the global RNG. point_overrides:
    extra kwargs for the point encoder that do not change its weights (e.g. ``fast=False``).
    """
    from xmodal.models.heads import PairClassifier
    from xmodal.models.registry import create_image_encoder, create_point_encoder

    def _build():
        img = create_image_encoder(arch["image_encoder"]["name"], **arch["image_encoder"].get("kwargs", {}))
        pkw = dict(arch["point_encoder"].get("kwargs", {}))
        pkw.update(point_overrides or {})
        pts = create_point_encoder(arch["point_encoder"]["name"], **pkw)
        ff_kw = dict(arch["pair_classifier"].get("kwargs", {}))
        ff_kw.setdefault("img_dim", int(getattr(img, "out_dim", 512)))
        ff_kw.setdefault("pts_dim", int(getattr(pts, "out_dim", 512)))
        arch["pair_classifier"]["kwargs"] = ff_kw
        return {"image_encoder": img, "point_encoder": pts, "pair_classifier": PairClassifier(**ff_kw)}

    if seed is None:
        return _build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _build()


# --------------------------------------------------------------------------- tensors


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def state_tensors(nets: dict[str, nn.Module], prefix: str = "", names=NETS) -> dict[str, torch.Tensor]:
    """Flat ``{prefix<net>/<key>: tensor}`` (CPU, contiguous, unshared) of the state dicts of the
    nets named ``names`` (the three networks by default)."""
    out = {}
    for name in names:
        for k, v in _unwrap(nets[name]).state_dict().items():
            out[f"{prefix}{name}/{k}"] = v.detach().to("cpu", copy=True).contiguous()
    return out


def load_state_tensors(nets: dict[str, nn.Module], tensors: dict[str, torch.Tensor], prefix: str, source: Path, *,
                       names=NETS, what: str = "weights") -> None:
    """Load the ``prefix<net>/<key>`` entries of ``tensors`` into the nets named ``names`` (strict);
    :class:`CheckpointError` naming ``source`` and ``what`` (the kind of weights) where they do not fit."""
    for name in names:
        pre = f"{prefix}{name}/"
        sd = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        try:
            _unwrap(nets[name]).load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: {what} of {name} do not fit the architecture: {exc}") from exc


def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = val.detach().to("cpu", copy=True).contiguous()
            else:
                plain.setdefault(str(idx), {})[key] = val
    return tensors, {"state": plain, "param_groups": sd["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, st in meta.get("state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------------- checkpoints


def checkpoint_paths(run: str | Path) -> tuple[Path, Path]:
    """``(RUN/checkpoints/last.safetensors, RUN/checkpoints/last.json)``."""
    d = Path(run) / CHECKPOINT_DIR
    return d / "last.safetensors", d / "last.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``step``, its JSON ``state`` and all ``tensors`` (CPU)."""

    step: int
    state: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)
    path: Path = Path()


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with two guarantees it lacks.

    * The same tensors and metadata give the same bytes in every process: safetensors writes
      the metadata in hash-map order, which changes between processes, so the header is
      rewritten with the metadata keys sorted (the same JSON, the same length).
    * A failed write (a full disk, an I/O error) is an :class:`OSError`, which
      :func:`~xmodal.utils.io.atomic_path` reports as a ``WriteError`` naming the file;
      safetensors raises its own error type, which is not one.
    """
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
        _sort_safetensors_metadata(path)
    except OSError:
        raise
    except Exception as exc:  # safetensors' SafetensorError (a Rust I/O error, as text)
        text = str(exc)
        code = errno.ENOSPC if "No space left" in text else errno.EIO
        raise OSError(code, f"{os.strerror(code)} ({text})", str(path)) from exc


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header of the safetensors file ``path`` in place with ``__metadata__``'s keys
    sorted (left as it is should the re-encoded header not have the same length)."""
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
        header = json.loads(raw.decode("utf-8"))
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        old = raw.rstrip(b" ")
        if new == old or len(new) != len(old):
            return
        fh.seek(8)
        fh.write(new + b" " * (n - len(new)))


def save_checkpoint(
    run: str | Path,
    *,
    step: int,
    nets: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    scaler=None,
    extra: Optional[dict] = None,
    extra_tensors: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write ``RUN/checkpoints/last.safetensors`` then ``last.json`` (each atomically).

    ``extra``: JSON-serialisable entries stored in the state (config hash, architecture,
    elapsed time, ...); ``extra_tensors``: more tensors for the weights file, under names of
    their own (the averaged networks' ``average/...``). Returns the JSON path.
    """
    wpath, jpath = checkpoint_paths(run)
    tensors = state_tensors(nets, prefix="model/")
    otensors, ometa = _split_optimizer(optimizer)
    tensors.update(otensors)
    clash = set(tensors) & set(extra_tensors or {})
    if clash:
        raise ValueError(f"extra_tensors would overwrite {sorted(clash)[:3]}")
    tensors.update(extra_tensors or {})
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "weights": wpath.name,
        "optimizer": ometa,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if (scaler is not None and scaler.is_enabled()) else None,
        "rng": "stateless: step s draws from seeds derived from (seed, s, rank)",
    }
    state.update(extra or {})
    blob = json.dumps(state, default=_jsonable)
    with atomic_path(wpath, suffix=".safetensors") as tmp:
        write_safetensors(tensors, tmp, {"format": "pt", "step": str(int(step)), "xmodal_state": blob})
    write_json(jpath, json.loads(blob))
    return jpath


def _jsonable(o: Any):
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable in checkpoint state: {type(o).__name__}")


def load_checkpoint(run: str | Path) -> Optional[Checkpoint]:
    """Read ``RUN/checkpoints/last.*``; None when the run has no checkpoint yet.

    A torn pair (JSON from another step than the weights, or missing JSON) is repaired
    from the state embedded in the weights file, with a warning.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    wpath, jpath = checkpoint_paths(run)
    if not wpath.exists():
        if jpath.exists():
            raise CheckpointError(f"{jpath}: its weights file {wpath.name} is missing; the checkpoint cannot be used")
        return None
    try:
        with safe_open(str(wpath), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(wpath))
    except Exception as exc:  # safetensors raises its own error types
        raise _unreadable(wpath, exc) from exc
    if "xmodal_state" not in meta:
        raise CheckpointError(f"{wpath}: not an xmodal checkpoint (no embedded state)")
    embedded = _checked_state(meta["xmodal_state"], wpath)
    state = embedded
    if jpath.exists():
        try:
            js = _checked_state(jpath.read_bytes(), jpath)
        except (CheckpointError, OSError) as exc:
            log.warning("%s; using the state embedded in %s", exc, wpath)
            js = None
        if js is not None and js["step"] != embedded["step"]:
            log.warning(
                "%s says step %s but %s holds step %s (a torn checkpoint write); using the weights' own state",
                jpath, js.get("step"), wpath, embedded["step"],
            )
        elif js is not None:
            state = js
    else:
        log.warning("%s is missing; using the state embedded in %s", jpath, wpath)
    return Checkpoint(step=int(state["step"]), state=state, tensors=tensors, path=wpath)


def _checked_state(blob: "str | bytes", path: Path) -> dict:
    """A checkpoint's JSON state (``last.json``, or the copy embedded in the weights): an
    object with an integer ``step`` >= 0, else :class:`CheckpointError` naming ``path``."""
    try:
        state = json.loads(blob)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deeply
        raise CheckpointError(f"{path}: the checkpoint state is not valid JSON ({type(exc).__name__})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: the checkpoint state must be an object with an integer 'step' >= 0")
    return state


def restore_checkpoint(ckpt: Checkpoint, *, nets, optimizer=None, scheduler=None, scaler=None, device=None) -> None:
    """Load a :class:`Checkpoint` into networks, optimizer, scheduler and grad scaler."""
    load_state_tensors(nets, ckpt.tensors, "model/", ckpt.path)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(_join_optimizer(ckpt.tensors, ckpt.state["optimizer"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{ckpt.path}: optimizer state does not fit: {exc}") from exc
    if scheduler is not None and ckpt.state.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt.state["scheduler"])
    if scaler is not None and scaler.is_enabled() and ckpt.state.get("scaler") is not None:
        scaler.load_state_dict(ckpt.state["scaler"])


# --------------------------------------------------------------------------- encoders


def save_encoders(run: str | Path, *, nets: dict[str, nn.Module], info: dict) -> tuple[Path, Path]:
    """Write ``RUN/encoders.safetensors`` then ``RUN/encoders.json``.

    info: JSON entries (``architecture``, ``image_size``, ``num_points``, ``up_axis``, ``step``,
    ``config``...) stored in ``encoders.json``.
    """
    run = Path(run)
    wpath, jpath = run / "encoders.safetensors", run / "encoders.json"
    meta = {"format": ENCODERS_FORMAT, "format_version": FORMAT_VERSION, "weights": wpath.name}
    meta.update(info)
    with atomic_path(wpath, suffix=".safetensors") as tmp:
        write_safetensors(state_tensors(nets), tmp, {"format": "pt", "step": str(info.get("step", ""))})
    write_json(jpath, json.loads(json.dumps(meta, default=_jsonable)))
    return wpath, jpath


def read_encoders(run: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(encoders.json content, tensors)`` of a finished run."""
    from safetensors.torch import load_file

    run = Path(run)
    wpath, jpath = run / "encoders.safetensors", run / "encoders.json"
    if not jpath.exists() or not wpath.exists():
        raise CheckpointError(f"{run}: no encoders.json/encoders.safetensors (the run has not finished)")
    try:
        meta = read_json(jpath)
    except ValueError as exc:
        raise CheckpointError(f"{jpath}: unreadable ({getattr(exc, 'problem', exc)})") from exc
    fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if fmt != ENCODERS_FORMAT:
        raise CheckpointError(f"{jpath}: not an xmodal encoders file (format={str(fmt)[:40]!r})")
    from safetensors import safe_open

    try:
        with safe_open(str(wpath), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(wpath))
    except Exception as exc:  # safetensors raises its own error types
        raise _unreadable(wpath, exc) from exc
    # save_encoders writes the weights, then the JSON: a save stopped between the two leaves new
    # weights beside the JSON of an earlier save (of a run since extended); the weights name their step
    held, said = header.get("step", ""), meta.get("step")
    if held != "" and said is not None and held != str(said):
        raise CheckpointError(
            f"{wpath}: holds the weights of step {held}, but {jpath.name} describes step {said} (a save was "
            "stopped between the two files)",
            hint="finish the run again with 'xmodal pretrain --out RUN --resume', which writes both",
        )
    return meta, tensors


def checkpoint_step(run: str | Path) -> Optional[int]:
    """The step of ``RUN/checkpoints/last.json`` without reading the weights; None when there is no
    readable one (:func:`load_checkpoint` is the careful reader)."""
    path = checkpoint_paths(run)[1]
    try:
        return int(_checked_state(path.read_bytes(), path)["step"])
    except (OSError, CheckpointError):
        return None


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    """The error for a weights file safetensors cannot read; a pickle (``torch.save``) is named as such."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        head = b""
    if head[:1] == b"\x80" or head == b"PK\x03\x04":
        return CheckpointError(f"{path}: a pickle / torch.save file, not safetensors (xmodal never unpickles weights)")
    return CheckpointError(f"{path}: not a readable safetensors file ({exc})")


def load_networks(meta_arch: dict, tensors: dict[str, torch.Tensor], *, prefix: str = "", source: Path = Path()) -> dict[str, nn.Module]:
    """Build the nets of an architecture dict and load their weights (strict)."""
    nets = build_networks(json.loads(json.dumps(meta_arch)))
    load_state_tensors(nets, tensors, prefix, source)
    return nets
