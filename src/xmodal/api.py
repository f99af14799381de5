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
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from xmodal.config import from_dict, load_config
from xmodal.errors import ConfigError, MissingInputError
from xmodal.train.augment import resize_images
from xmodal.train.checkpoint import (
    NETS,
    CheckpointError,
    architecture_from_config,
    build_networks,
    checkpoint_step,
    load_checkpoint,
    load_networks,
    read_encoders,
)
from xmodal.train.config import PretrainConfig
from xmodal.transforms import images_to_tensor, points_to_tensor
from xmodal.utils.device import machine_device, module_device

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
#: largest image side and cloud size a run file may declare (features are computed at that size)
MAX_IMAGE_SIZE = 4096
MAX_NUM_POINTS = 1 << 20


@dataclass
class LoadedRun:
    """The networks of a run, in eval mode, with what is needed to feed them.

    image_encoder: Fimg, ``(B, C, S, S) -> (B, 512)``; point_encoder: Fp, ``(B, N, 3) -> (B, 512)``;
    pair_classifier: Ff, ``((B, 512), (B, 512)) -> (B, 2)``; config: the run's
    :class:`PretrainConfig`; image_size / num_points: the input sizes trained on; up_axis:
    the dataset's up axis; step: optimisation steps of these weights; source: ``"final"``
    (encoders.*), ``"last"`` (the last checkpoint) or ``"random"`` (:func:`random_init_run`);
    later_checkpoint: the step of a last checkpoint past these ``final`` encoders (the run was
    extended and has not finished), else None.
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
    later_checkpoint: Optional[int] = None

    @property
    def device(self) -> torch.device:
        return module_device(self.image_encoder)

    def to(self, device) -> "LoadedRun":
        """Move the three networks to ``device`` (in place); returns self."""
        for m in (self.image_encoder, self.point_encoder, self.pair_classifier):
            m.to(device)
        return self

    def at_random_init(self, seed: int = 0, device=None) -> "LoadedRun":
        """The same networks (this run's config and up axis) at random initialisation, on
        ``device`` (default: this run's): the random-init baseline of an evaluation."""
        return random_init_run(self.config, seed=seed, device=self.device if device is None else device,
                               up_axis=self.up_axis)


def _finish(nets: dict, cfg: PretrainConfig, *, image_size, num_points, up_axis, step, source, path, device,
            later_checkpoint: Optional[int] = None) -> LoadedRun:
    dev = machine_device(device)
    for m in nets.values():
        m.to(dev).eval()
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
        later_checkpoint=later_checkpoint,
    )


def load_run(run, device="cpu", *, prefer: Literal["final", "last"] = "final") -> LoadedRun:
    """Load a run folder's Fimg, Fp and Ff (eval mode) on ``device``.

    prefer: ``"final"`` reads ``encoders.safetensors`` and falls back to the last
    checkpoint when the run has not finished; ``"last"`` reads the last checkpoint
    (falling back to the encoders). With weight averaging (``optim.average_from``) the
    encoders are the averaged networks and the checkpoint's are the training weights.

    Raises:
        MissingInputError: ``run`` is not a folder or holds neither file (a FileNotFoundError).
        CheckpointError: a file that cannot be read, is inconsistent or does not fit its architecture.
        ConfigError: ``device`` is not a device this machine has (e.g. CUDA on a CPU-only machine).
    """
    if prefer not in ("final", "last"):
        raise ValueError(f"prefer must be 'final' or 'last', got {prefer!r}")
    run = Path(run)
    if not run.is_dir():
        raise MissingInputError("not a run folder", path=run)
    has_final = (run / "encoders.json").is_file() and (run / "encoders.safetensors").is_file()
    order = ("final", "last") if prefer == "final" else ("last", "final")
    for what in order:
        if what == "final" and has_final:
            meta, tensors = read_encoders(run)
            arch, info = _run_info(meta, run / "encoders.json")
            cfg = _config_of(run, meta.get("config"), run / "encoders.json")
            nets = _load_checked(arch, tensors, "", run / "encoders.safetensors", run / "encoders.json")
            later = _later_checkpoint(run, int(info["step"]))
            return _finish(nets, cfg, **info, source="final", path=run, device=device, later_checkpoint=later)
        if what == "last":
            ckpt = load_checkpoint(run)
            if ckpt is None:
                continue
            state_file = ckpt.path.with_suffix(".json")
            arch, info = _run_info({**ckpt.state, "step": ckpt.step}, state_file)
            cfg = _config_of(run, None)
            nets = _load_checked(arch, ckpt.tensors, "model/", ckpt.path, state_file)
            return _finish(nets, cfg, **info, source="last", path=run, device=device)
    raise MissingInputError(
        "not a run folder written by 'xmodal pretrain' "
        "(neither encoders.safetensors/encoders.json nor checkpoints/last.safetensors)", path=run,
    )


def _later_checkpoint(run: Path, step: int) -> Optional[int]:
    """The step of the last checkpoint when it is past the encoders' ``step`` (the run was extended,
    ``--resume iterations=...``, and has not finished, so the encoders are the earlier run's: a
    warning says so), else None."""
    later = checkpoint_step(run)
    if later is None or later <= step:
        return None
    log.warning("%s: encoders.safetensors holds step %d, but the last checkpoint is at step %d (the run was "
                "extended and has not finished): these are step %d's networks; finish it with 'xmodal "
                "pretrain --out %s --resume', or read the checkpoint with load_run(..., prefer='last')",
                run, step, later, step, run)
    return later


def _run_info(meta: dict, path: Path) -> tuple[dict, dict]:
    """What ``encoders.json`` or a checkpoint's state says about the networks, checked: the
    ``architecture``, and ``{image_size, num_points, up_axis, step}``."""
    arch = meta.get("architecture")
    if not _is_architecture(arch):
        raise CheckpointError(f"'architecture' must map {', '.join(NETS)} to {{'name': text, 'kwargs': {{...}}}} "
                              "(no name for the pair classifier)", path=path)
    info = {"image_size": meta.get("image_size"), "num_points": meta.get("num_points"),
            "up_axis": meta.get("up_axis", "z"), "step": meta.get("step", 0)}
    for key, hi in (("image_size", MAX_IMAGE_SIZE), ("num_points", MAX_NUM_POINTS), ("step", None)):
        v = info[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (key != "step") or (hi is not None and v > hi):
            raise CheckpointError(f"'{key}' must be an integer in [{int(key != 'step')}, {hi or 'inf'}], "
                                  f"got {reprlib.repr(v)}", path=path)
    if info["up_axis"] not in ("x", "y", "z"):
        raise CheckpointError(f"'up_axis' must be 'x', 'y' or 'z', got {reprlib.repr(info['up_axis'])}", path=path)
    return arch, info


def _is_architecture(arch) -> bool:
    """Whether ``arch`` has the layout of :func:`~xmodal.train.checkpoint.architecture_from_config`."""
    if not isinstance(arch, dict) or not all(isinstance(arch.get(n), dict) for n in NETS):
        return False
    named = all(isinstance(arch[n].get("name"), str) for n in NETS[:2])
    return named and all(isinstance(arch[n].get("kwargs", {}), dict) for n in NETS)


def _load_checked(arch: dict, tensors: dict[str, torch.Tensor], prefix: str, source: Path, arch_from: Path) -> dict:
    """The networks of ``arch`` (read from ``arch_from``) with the weights of ``source``, built
    only once the architecture is known to fit them: it is first built on the ``meta`` device
    (no memory), so an architecture that would allocate more than the weights file holds is
    refused before anything is allocated."""
    try:
        with torch.device("meta"):
            dry = build_networks(json.loads(json.dumps(arch)))
    except (ConfigError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"the architecture cannot be built ({type(exc).__name__}: {exc})",
                              path=arch_from) from exc
    for name in NETS:
        pre = prefix + name + "/"
        for key, want in dry[name].state_dict().items():
            have = tensors.get(pre + key)
            if have is None or tuple(have.shape) != tuple(want.shape):
                got = "missing" if have is None else f"of shape {tuple(have.shape)}"
                raise CheckpointError(f"weights of {name} do not fit the architecture: {pre + key} is {got}, "
                                      f"expected {tuple(want.shape)}", path=source)
            if have.is_floating_point() and not bool(torch.isfinite(have).all()):
                raise CheckpointError(f"{pre + key} holds NaN or infinite values", path=source)
    return load_networks(arch, tensors, prefix=prefix, source=source)


def _config_of(run: Path, embedded: Optional[dict], where: Optional[Path] = None) -> PretrainConfig:
    if embedded is not None:
        try:
            if not isinstance(embedded, dict):
                raise ConfigError(f"expected a mapping, got {type(embedded).__name__}")
            return from_dict(PretrainConfig, embedded)
        except ConfigError as exc:
            raise CheckpointError(f"'config' is not a valid pre-training config: {exc}", path=where) from exc
    path = run / "config.yaml"
    if not path.is_file():
        raise MissingInputError("missing; cannot tell the run's settings", path=path)
    return load_config(PretrainConfig, path)


def random_init_run(config: Optional[PretrainConfig] = None, *, seed: int = 0, device="cpu",
                    up_axis: str = "z") -> LoadedRun:
    """The architecture of ``config`` (default: ``PretrainConfig()``, the paper's) at random
    initialisation: evaluation's random baseline. ``seed`` fixes the weights (the global RNG is
    untouched). For the baseline of a loaded run use :meth:`LoadedRun.at_random_init`; for a run
    folder, ``load_run(folder).at_random_init()``.
    """
    cfg = config if config is not None else PretrainConfig()
    if not isinstance(cfg, PretrainConfig):
        raise TypeError(f"config must be a PretrainConfig or None, got {type(cfg).__name__}")
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
    dev = machine_device(device) if device is not None else module_device(encoder)
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
