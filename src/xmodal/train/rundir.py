"""The run folder of a pre-training run: checks before writing, resume, ``run.json``, the metrics log.

Layout (see ``docs/ARCHITECTURE.md``)::

    RUN/config.yaml            resolved settings (written first)
    RUN/run.json               dataset, versions, device, precision, resume history
    RUN/metrics.jsonl          one record per logged step (+ ``val.*`` records)
    RUN/checkpoints/last.*     the latest checkpoint (safetensors + JSON, atomic)
    RUN/encoders.*             the final encoders
"""

from __future__ import annotations

import json
import logging
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

import xmodal
from xmodal.config import load_config, save_config
from xmodal.errors import ConfigError, MissingInputError, OutputExistsError
from xmodal.train.checkpoint import Checkpoint, load_checkpoint
from xmodal.train.config import RESUME_MUTABLE_KEYS, PretrainConfig, config_diff, config_hash
from xmodal.utils.io import atomic_write, read_json, read_jsonl, write_json

__all__ = [
    "RUN_FILES",
    "manifest_summary",
    "data_fingerprint",
    "check_resumable",
    "check_run_dir",
    "check_resume_data",
    "write_run_info",
    "truncate_metrics",
]

log = logging.getLogger(__name__)

#: files and folders that mark a folder as holding a run
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "checkpoints", "encoders.json", "encoders.safetensors")


def manifest_summary(store) -> dict:
    """The dataset facts recorded in ``run.json``."""
    man = store.manifest
    keys = ("counts", "views", "points", "image_size", "grayscale", "up_axis", "source")
    return {"classes": len(man.get("classes", [])), **{k: man.get(k) for k in keys}}


def data_fingerprint(store, split: str, n: int) -> dict:
    """What a resumed run must find again in its dataset (``n``: objects trained on)."""
    return {
        "split": split,
        "n": int(n),
        "views": int(store.views),
        "points": int(store.num_points),
        "image_size": store.image_size,
        "up_axis": store.up_axis,
    }


def _check_fresh(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError("exists and is not a folder", path=out)
    present = [f for f in RUN_FILES if (out / f).exists()]
    if present:
        raise OutputExistsError(
            f"already holds a run ({', '.join(present)})",
            path=out,
            hint="pass --resume to continue it, or choose another --out",
        )


def check_resumable(out: Path) -> Path:
    """The saved config of the run in ``out``; a :class:`MissingInputError` naming ``out`` when
    there is no folder or no run (``config.yaml``) in it."""
    if not out.is_dir():
        raise MissingInputError("no run folder to resume", path=out)
    saved_cfg = out / "config.yaml"
    if not saved_cfg.is_file():
        raise MissingInputError(
            "no run to resume here (no config.yaml)", path=out,
            hint="start a run with `xmodal pretrain` without --resume, or name the run's folder",
        )
    return saved_cfg


def check_run_dir(out: Path, cfg: PretrainConfig, resume: bool) -> Optional[Checkpoint]:
    """Validate the run folder; return the checkpoint to resume from (None for a fresh run).

    A fresh run needs a folder without a run in it. Resuming needs the folder, a saved config
    that differs from ``cfg`` only in :data:`RESUME_MUTABLE_KEYS`, and a checkpoint (if any)
    written with the same settings at a step not past ``cfg.iterations``.
    """
    if not resume:
        _check_fresh(out)
        return None
    saved_cfg = check_resumable(out)
    diff = config_diff(load_config(PretrainConfig, saved_cfg), cfg)
    if diff:
        raise ConfigError(
            f"cannot resume with a different config (only {', '.join(sorted(RESUME_MUTABLE_KEYS))} "
            "may change):\n  " + "\n  ".join(diff),
            path=saved_cfg,
        )
    ckpt = load_checkpoint(out)
    if ckpt is None:
        log.warning("%s: no checkpoint yet (the run stopped before its first): resuming starts from step 0", out)
    else:
        h = ckpt.state.get("config_hash")
        if h is not None and h != config_hash(cfg):
            raise ConfigError(f"was written with another config (hash {h} != {config_hash(cfg)})", path=ckpt.path)
        if ckpt.step > cfg.iterations:
            raise ConfigError(
                f"the run is already at step {ckpt.step} > iterations={cfg.iterations}; resuming can only extend a run",
                path=ckpt.path,
            )
    return ckpt


def check_resume_data(ckpt: Optional[Checkpoint], fingerprint: dict, data, *, out: Path,
                      allow_other_data: bool = False) -> None:
    """Refuse to resume a run on other data than it was trained on.

    The dataset's settings (``fingerprint``: split, object count, views, points, image size,
    up axis) must match the checkpoint's always; the dataset folder must be the one recorded in
    ``run.json`` unless ``allow_other_data`` (a copy moved elsewhere, say).
    """
    if ckpt is None:
        return
    if ckpt.state.get("data") not in (None, fingerprint):
        raise ConfigError(
            f"the run was trained on other data ({ckpt.state['data']}) than {data} ({fingerprint})", path=ckpt.path
        )
    info = out / "run.json"
    recorded = read_json(info).get("dataset") if info.is_file() else None
    here = str(Path(data).resolve())
    if recorded and recorded != here and not allow_other_data:
        raise ConfigError(
            f"the run was trained on {recorded}, not on {here}", path=out,
            hint="pass --data with the run's dataset, or --allow-other-data to continue on this one "
            "(its settings match the run's)",
        )


def write_run_info(out: Path, cfg: PretrainConfig, info: dict, *, resumed_from: Optional[int]) -> None:
    """Write ``config.yaml`` and ``run.json`` (``info`` plus versions; the resume history kept)."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    path = out / "run.json"
    run_info = read_json(path) if (resumed_from is not None and path.exists()) else {}
    before = run_info.get("amp")
    if before is not None and "amp" in info and before != info["amp"]:
        # amp=auto resolves per machine: a run resumed elsewhere can change precision mid-schedule
        def name(amp: str) -> str:
            return "float32" if amp == "off" else amp

        log.warning("%s: trained in %s up to step %s, resumed in %s (amp=%s resolves by device and CPU)", out,
                    name(before), resumed_from, name(info["amp"]), cfg.amp)
    run_info.update(info)
    run_info.update(
        {
            "xmodal_version": xmodal.__version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "config_hash": config_hash(cfg),
        }
    )
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run_info.setdefault("started", now)
    if resumed_from is not None:
        run_info.setdefault("resumed", []).append({"from_step": resumed_from, "time": now, "amp": info.get("amp")})
    write_json(path, run_info)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of ``path`` past ``step`` (a resumed run logs those steps again; -1 drops all)."""
    if not path.exists():
        return
    recs = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    with atomic_write(path) as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
