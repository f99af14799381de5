"""Feature API: load a pre-trained run and extract image / point-cloud features.

>>> from xmodal.api import load_run, extract_image_features, extract_point_features
>>> run = load_run("runs/paper")                       # encoders.* of a finished run
>>> f2d = extract_image_features(run.image_encoder, images)   # images: (n, S, S) uint8 -> (n, 512)
>>> f3d = extract_point_features(run.point_encoder, points)   # points: (n, N, 3) -> (n, 512)

Weights are read with ``safetensors`` (never pickle). Inputs go through
:mod:`xmodal.transforms` exactly as in pre-training; images of another size than the
run's are resized like the training sampler does (antialiased bilinear).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from xmodal.config import from_dict, load_config
from xmodal.train.augment import resize_images
from xmodal.train.checkpoint import (
    CheckpointError,
    architecture_from_config,
    build_networks,
    load_checkpoint,
    load_networks,
    read_encoders,
)
from xmodal.train.config import PretrainConfig
from xmodal.transforms import images_to_tensor, points_to_tensor
from xmodal.utils.device import module_device

__all__ = [
    "LoadedRun",
    "load_run",
    "random_init_run",
    "load_encoders",
    "extract_image_features",
    "extract_point_features",
]

log = logging.getLogger(__name__)

#: attribute set on a loaded image encoder: the image side it was trained on
IMAGE_SIZE_ATTR = "xmodal_image_size"


@dataclass
class LoadedRun:
    """The networks of a run, in eval mode, with what is needed to feed them.

    image_encoder: Fimg, ``(B, C, S, S) -> (B, 512)``; point_encoder: Fp, ``(B, N, 3) -> (B, 512)``;
    pair_classifier: Ff, ``((B, 512), (B, 512)) -> (B, 2)``; config: the run's
    :class:`PretrainConfig`; image_size / num_points: the input sizes trained on; up_axis:
    the dataset's up axis; step: optimisation steps of these weights; source: ``"final"``
    (encoders.*), ``"last"`` (the last checkpoint) or ``"random"`` (:func:`random_init_run`).
    """

    image_encoder: nn.Module
    point_encoder: nn.Module
    pair_classifier: nn.Module
    config: PretrainConfig
    image_size: int
    num_points: int
    up_axis: str = "z"
    step: int = 0
    source: str = "final"
    path: Optional[Path] = None

    @property
    def device(self) -> torch.device:
        return module_device(self.image_encoder)

    def to(self, device) -> "LoadedRun":
        """Move the three networks to ``device`` (in place); returns self."""
        for m in (self.image_encoder, self.point_encoder, self.pair_classifier):
            m.to(device)
        return self


def _finish(nets: dict, cfg: PretrainConfig, *, image_size, num_points, up_axis, step, source, path, device) -> LoadedRun:
    for m in nets.values():
        m.to(device).eval()
    setattr(nets["image_encoder"], IMAGE_SIZE_ATTR, int(image_size))
    return LoadedRun(
        image_encoder=nets["image_encoder"],
        point_encoder=nets["point_encoder"],
        pair_classifier=nets["pair_classifier"],
        config=cfg,
        image_size=int(image_size),
        num_points=int(num_points),
        up_axis=str(up_axis),
        step=int(step),
        source=source,
        path=path,
    )


def load_run(run, device="cpu", *, prefer: Literal["final", "last"] = "final") -> LoadedRun:
    """Load a run folder's Fimg, Fp and Ff (eval mode) on ``device``.

    prefer: ``"final"`` reads ``encoders.safetensors`` and falls back to the last
    checkpoint when the run has not finished; ``"last"`` reads the last checkpoint
    (falling back to the encoders).

    Raises:
        FileNotFoundError: ``run`` is not a folder or holds neither file.
        CheckpointError: a file that cannot be read or does not fit its architecture.
    """
    if prefer not in ("final", "last"):
        raise ValueError(f"prefer must be 'final' or 'last', got {prefer!r}")
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run folder")
    has_final = (run / "encoders.json").is_file() and (run / "encoders.safetensors").is_file()
    order = ("final", "last") if prefer == "final" else ("last", "final")
    for what in order:
        if what == "final" and has_final:
            meta, tensors = read_encoders(run)
            cfg = _config_of(run, meta.get("config"))
            nets = load_networks(meta["architecture"], tensors, source=run / "encoders.safetensors")
            return _finish(
                nets, cfg, image_size=meta["image_size"], num_points=meta["num_points"],
                up_axis=meta.get("up_axis", "z"), step=meta.get("step", 0), source="final", path=run, device=device,
            )
        if what == "last":
            ckpt = load_checkpoint(run)
            if ckpt is None:
                continue
            st = ckpt.state
            if "architecture" not in st:
                raise CheckpointError(f"{ckpt.path}: the checkpoint does not record its architecture")
            cfg = _config_of(run, None)
            nets = load_networks(st["architecture"], ckpt.tensors, prefix="model/", source=ckpt.path)
            return _finish(
                nets, cfg, image_size=st["image_size"], num_points=st["num_points"],
                up_axis=st.get("up_axis", "z"), step=ckpt.step, source="last", path=run, device=device,
            )
    raise FileNotFoundError(
        f"{run}: neither encoders.safetensors/encoders.json nor checkpoints/last.safetensors; "
        "is this a folder written by 'xmodal pretrain'?"
    )


def _config_of(run: Path, embedded: Optional[dict]) -> PretrainConfig:
    if embedded is not None:
        return from_dict(PretrainConfig, embedded)
    path = run / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; cannot tell the run's settings")
    return load_config(PretrainConfig, path)


def random_init_run(config=None, seed: int = 0, device="cpu") -> LoadedRun:
    """The architecture of ``config`` at random initialisation (evaluation's random baseline).

    config: a :class:`PretrainConfig`, a :class:`LoadedRun` (its config and up axis are
    used), a run folder, or None (the default config). ``seed`` fixes the weights (the
    global RNG is untouched).
    """
    up_axis = "z"
    if isinstance(config, LoadedRun):
        up_axis, config = config.up_axis, config.config
    elif isinstance(config, (str, Path)):
        run = Path(config)
        config = _config_of(run, None)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            up_axis = json.loads((run / "run.json").read_text())["manifest"]["up_axis"] or "z"
    cfg = config if config is not None else PretrainConfig()
    if not isinstance(cfg, PretrainConfig):
        raise TypeError(f"config must be a PretrainConfig, LoadedRun, run folder or None; got {type(cfg).__name__}")
    nets = build_networks(architecture_from_config(cfg), seed=seed)
    return _finish(
        nets, cfg, image_size=cfg.data.image_size, num_points=cfg.data.num_points,
        up_axis=up_axis, step=0, source="random", path=None, device=device,
    )


def load_encoders(run, device="cpu", **kwargs) -> tuple[nn.Module, nn.Module]:
    """``(image_encoder, point_encoder)`` of a run, in eval mode (see :func:`load_run`)."""
    r = load_run(run, device=device, **kwargs)
    return r.image_encoder, r.point_encoder


# --------------------------------------------------------------------------- extraction


@contextlib.contextmanager
def _eval_on(encoder: nn.Module, device):
    """Put ``encoder`` in eval mode on ``device`` for the block; restore its train flag after."""
    was_training = encoder.training
    dev = torch.device(device) if device is not None else module_device(encoder)
    encoder.to(dev)
    encoder.eval()
    try:
        with torch.inference_mode():
            yield dev
    finally:
        encoder.train(was_training)


def extract_image_features(
    encoder: nn.Module,
    images,
    *,
    batch_size: int = 64,
    device=None,
    image_size: Optional[int] = None,
) -> np.ndarray:
    """Global image features: images ``(n, S, S)`` (or ``(n, S, S, 3)``) uint8 -> ``(n, D)`` float32.

    Batched, in eval mode under ``torch.inference_mode`` (the encoder's train flag is
    restored afterwards). device: where to run (default: the encoder's device; the encoder
    is moved there). image_size: resize to this side first (default: the size a
    :func:`load_run` encoder was trained on, else no resize).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    imgs = images if isinstance(images, torch.Tensor) else np.asarray(images)
    if imgs.dtype not in (np.uint8, torch.uint8):
        raise TypeError(f"images must be uint8, got {imgs.dtype}")
    if imgs.ndim not in (3, 4):
        raise ValueError(f"images must be (n, S, S) or (n, S, S, 3), got shape {tuple(imgs.shape)}")
    size = image_size if image_size is not None else getattr(encoder, IMAGE_SIZE_ATTR, None)
    out = []
    with _eval_on(encoder, device) as dev:
        for s in range(0, len(imgs), batch_size):
            chunk = imgs[s : s + batch_size]
            if size is not None:
                chunk = resize_images(chunk, int(size))
            f = encoder(images_to_tensor(chunk, device=dev))
            out.append(f.float().cpu().numpy())
    if not out:
        return np.zeros((0, int(getattr(encoder, "out_dim", 512))), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def extract_point_features(encoder: nn.Module, points, *, batch_size: int = 32, device=None) -> np.ndarray:
    """Global point-cloud features: points ``(n, N, 3)`` float -> ``(n, D)`` float32.

    Batched, in eval mode under ``torch.inference_mode`` (train flag restored afterwards);
    device: where to run (default: the encoder's device; the encoder is moved there).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pts = points if isinstance(points, torch.Tensor) else np.asarray(points, dtype=np.float32)
    if pts.ndim != 3 or pts.shape[-1] != 3:
        raise ValueError(f"points must be (n, N, 3), got shape {tuple(pts.shape)}")
    out = []
    with _eval_on(encoder, device) as dev:
        for s in range(0, len(pts), batch_size):
            f = encoder(points_to_tensor(pts[s : s + batch_size], device=dev))
            out.append(f.float().cpu().numpy())
    if not out:
        return np.zeros((0, int(getattr(encoder, "out_dim", 512))), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)
