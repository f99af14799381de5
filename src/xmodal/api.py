"""Feature API: load a pre-trained run and extract image / point-cloud features.

>>> from xmodal.api import load_run, extract_image_features, extract_point_features
>>> run = load_run("runs/paper")                       # encoders.* of a finished run
>>> f2d = extract_image_features(run.image_encoder, images)   # images: (n, S, S) uint8 -> (n, 512)
>>> f3d = extract_point_features(run.point_encoder, points)   # points: (n, N, 3) -> (n, 512)

Weights are read with ``safetensors`` (never pickle). Inputs go through
:mod:`xmodal.transforms` exactly as in pre-training; images of another size than the
run's are resized like the training sampler does (antialiased bilinear), colour images given
to an encoder trained on grey renders are turned into their luminance as the renderer shades
grey, and clouds can be centred and scaled into the unit sphere as ``xmodal prepare`` stores
them (``normalize=True``; without it a warning says when they are far from it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import reprlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from xmodal.config import from_dict, load_config
from xmodal.data.geometry import normalize_unit_sphere
from xmodal.data.render import to_grayscale
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
#: attribute set on a loaded image encoder: whether it was trained on grey renders (None: not recorded)
GRAYSCALE_ATTR = "xmodal_grayscale"
#: largest image side and cloud size a run file may declare (features are computed at that size)
MAX_IMAGE_SIZE = 4096
MAX_NUM_POINTS = 1 << 20

#: encoders already warned about an input (by kind): each warning is given once per encoder, not per call
_WARNED: dict[str, "weakref.WeakSet[nn.Module]"] = {"grey": weakref.WeakSet(), "frame": weakref.WeakSet()}


def _warn_once(kind: str, encoder: nn.Module, msg: str, *args) -> None:
    if encoder not in _WARNED[kind]:
        _WARNED[kind].add(encoder)
        log.warning(msg + " (said once per encoder)", *args)


@dataclass
class LoadedRun:
    """The networks of a run, in eval mode, with what is needed to feed them.

    image_encoder: Fimg, ``(B, C, S, S) -> (B, 512)``; point_encoder: Fp, ``(B, N, 3) -> (B, 512)``;
    pair_classifier: Ff, ``((B, 512), (B, 512)) -> (B, 2)``; config: the run's
    :class:`PretrainConfig`; image_size / num_points: the input sizes trained on; up_axis:
    the dataset's up axis; grayscale: whether Fimg was trained on grey renders (None for a
    run written before this was recorded and without its ``run.json``, and for
    :func:`random_init_run` unless given); step: optimisation steps of these weights; source: ``"final"``
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
    grayscale: Optional[bool] = None
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
        """The same networks (this run's config, up axis and image colour) at random initialisation,
        on ``device`` (default: this run's): the random-init baseline of an evaluation, fed as the run is."""
        return random_init_run(self.config, seed=seed, device=self.device if device is None else device,
                               up_axis=self.up_axis, grayscale=self.grayscale)


def _finish(nets: dict, cfg: PretrainConfig, info: dict, *, source, path, device,
            later_checkpoint: Optional[int] = None) -> LoadedRun:
    """The :class:`LoadedRun` of ``nets`` on ``device``; info: ``{image_size, num_points, up_axis,
    step, grayscale}`` (:func:`_run_info`)."""
    dev = machine_device(device)
    for m in nets.values():
        m.to(dev).eval()
    image_size, grayscale = info["image_size"], info.get("grayscale")
    setattr(nets["image_encoder"], IMAGE_SIZE_ATTR, int(image_size))
    setattr(nets["image_encoder"], GRAYSCALE_ATTR, grayscale)
    return LoadedRun(
        image_encoder=nets["image_encoder"],
        point_encoder=nets["point_encoder"],
        pair_classifier=nets["pair_classifier"],
        config=cfg,
        image_size=int(image_size),
        num_points=int(info["num_points"]),
        up_axis=str(info["up_axis"]),
        step=int(info["step"]),
        source=source,
        path=path,
        later_checkpoint=later_checkpoint,
        grayscale=grayscale,
    )


def load_run(run, device="cpu", *, prefer: Literal["final", "last"] = "final") -> LoadedRun:
    """Load a run folder's Fimg, Fp and Ff (eval mode) on ``device``.

    prefer: ``"final"`` reads ``encoders.safetensors`` and falls back to the last
    checkpoint when the run has not finished (with a warning naming its step: these are networks
    in the middle of training); ``"last"`` reads the last checkpoint
    (falling back to the encoders). With weight averaging (``optim.average_from``) the
    encoders are the averaged networks and the checkpoint's are the training weights.

    Raises:
        MissingInputError: ``run`` is not a folder or holds neither file (a FileNotFoundError).
        CheckpointError: a file that cannot be read, is inconsistent or does not fit its architecture.
        ConfigError: ``device`` is not a device this machine has (e.g. CUDA on a CPU-only machine).
    """
    if prefer not in ("final", "last"):
        raise ValueError(f"prefer must be 'final' or 'last', got {prefer!r}")
    run = Path(run).expanduser()
    if not run.is_dir():
        raise MissingInputError("not a run folder", path=run)
    finals = [run / "encoders.json", run / "encoders.safetensors"]
    has_final = all(f.is_file() for f in finals)
    order = ("final", "last") if prefer == "final" else ("last", "final")
    for what in order:
        if what == "final" and has_final:
            meta, tensors = read_encoders(run)
            arch, info = _run_info(meta, run / "encoders.json")
            info["grayscale"] = _grayscale_of(run, info["grayscale"])
            cfg = _config_of(run, meta.get("config"), run / "encoders.json")
            nets = _load_checked(arch, tensors, "", run / "encoders.safetensors", run / "encoders.json")
            later = _later_checkpoint(run, int(info["step"]))
            return _finish(nets, cfg, info, source="final", path=run, device=device, later_checkpoint=later)
        if what == "last":
            ckpt = load_checkpoint(run)
            if ckpt is None:
                continue
            state_file = ckpt.path.with_suffix(".json")
            arch, info = _run_info({**ckpt.state, "step": ckpt.step}, state_file)
            info["grayscale"] = _grayscale_of(run, info["grayscale"])
            cfg = _config_of(run, None)
            nets = _load_checked(arch, ckpt.tensors, "model/", ckpt.path, state_file)
            if prefer == "final":
                total = cfg.iterations
                log.warning("%s has not finished (no encoders.safetensors): these are the networks of its last "
                            "checkpoint, step %d%s, in the middle of training; finish it with 'xmodal pretrain "
                            "--out %s --resume'", run, ckpt.step, f" of {total}" if total else "", run)
            return _finish(nets, cfg, info, source="last", path=run, device=device)
    one = [f.name for f in finals if f.is_file()]
    if len(one) == 1:
        missing = next(f.name for f in finals if not f.is_file())
        raise MissingInputError(f"holds {one[0]} but not {missing}, and no checkpoints/last.safetensors to fall "
                                "back on (copied in part?)", path=run)
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
    ``architecture``, and ``{image_size, num_points, up_axis, step, grayscale}`` (``grayscale``
    None where it is not recorded: written before it was)."""
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
    info["grayscale"] = meta.get("grayscale")
    if info["grayscale"] is not None and not isinstance(info["grayscale"], bool):
        raise CheckpointError(f"'grayscale' must be true or false, got {reprlib.repr(info['grayscale'])}", path=path)
    return arch, info


def _grayscale_of(run: Path, recorded: Optional[bool]) -> Optional[bool]:
    """Whether the run's images were grey: as its encoders or checkpoint record it, else (a run
    written before they did) as ``run.json`` describes its dataset, else None."""
    if recorded is not None:
        return recorded
    try:
        value = json.loads((run / "run.json").read_text())["manifest"]["grayscale"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, bool) else None


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
                    up_axis: str = "z", grayscale: Optional[bool] = None) -> LoadedRun:
    """The architecture of ``config`` (default: ``PretrainConfig()``, the paper's) at random
    initialisation: evaluation's random baseline. ``seed`` fixes the weights (the global RNG is
    untouched). For the baseline of a loaded run use :meth:`LoadedRun.at_random_init`; for a run
    folder, ``load_run(folder).at_random_init()``. grayscale: whether its images are grey renders
    (colour images are then turned into their luminance, as for a run's encoder).
    """
    cfg = config if config is not None else PretrainConfig()
    if not isinstance(cfg, PretrainConfig):
        raise TypeError(f"config must be a PretrainConfig or None, got {type(cfg).__name__}")
    nets = build_networks(architecture_from_config(cfg), seed=seed)
    info = {"image_size": cfg.data.image_size, "num_points": cfg.data.num_points, "up_axis": up_axis, "step": 0,
            "grayscale": grayscale}
    return _finish(nets, cfg, info, source="random", path=None, device=device)


def load_encoders(run, device="cpu", **kwargs) -> tuple[nn.Module, nn.Module]:
    """``(image_encoder, point_encoder)`` of a run, in eval mode (see :func:`load_run`)."""
    r = load_run(run, device=device, **kwargs)
    return r.image_encoder, r.point_encoder


# --------------------------------------------------------------------------- extraction


@contextlib.contextmanager
def _eval_on(encoder: nn.Module, device):
    """Put ``encoder`` in eval mode on ``device`` for the block; restore its train flag after.
    Yields ``(device, dtype)``: where to put the inputs, and the floating dtype of its weights
    (an encoder cast to half precision gets half-precision inputs)."""
    was_training = encoder.training
    dev = machine_device(device) if device is not None else module_device(encoder)
    encoder.to(dev)
    encoder.eval()
    dtype = next((p.dtype for p in encoder.parameters() if p.is_floating_point()), torch.float32)
    try:
        with torch.inference_mode():
            yield dev, dtype
    finally:
        encoder.train(was_training)


def _unwrapped(encoder: nn.Module) -> nn.Module:
    """The network inside ``nn.DataParallel`` / ``DistributedDataParallel`` (whose attributes,
    such as the trained image size, are the inner module's)."""
    while isinstance(encoder, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        encoder = encoder.module
    return encoder


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _empty_features(encoder: nn.Module) -> np.ndarray:
    return np.zeros((0, int(getattr(_unwrapped(encoder), "out_dim", 512))), dtype=np.float32)


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
    :func:`load_run` encoder was trained on, else no resize). Colour images given to a
    :func:`load_run` encoder trained on grey renders (``LoadedRun.grayscale``) are turned into
    their luminance first (:func:`xmodal.data.render.to_grayscale`, the weights the renderer
    shades grey with), and a warning says so (once per encoder).
    """
    batch_size = _check_batch_size(batch_size)
    imgs = images if isinstance(images, torch.Tensor) else np.asarray(images)
    if imgs.dtype not in (np.uint8, torch.uint8):
        raise TypeError(f"images must be uint8 (0-255), got {imgs.dtype}")
    if imgs.ndim not in (3, 4):
        raise ValueError(f"images must be (n, S, S) or (n, S, S, 3), got shape {tuple(imgs.shape)}")
    inner = _unwrapped(encoder)
    size = image_size if image_size is not None else getattr(inner, IMAGE_SIZE_ATTR, None)
    grey = imgs.ndim == 4 and imgs.shape[-1] == 3 and getattr(inner, GRAYSCALE_ATTR, None) is True
    if grey:
        _warn_once("grey", inner, "the image encoder was trained on grey renders: colour images are turned into "
                   "their luminance first")
    out = []
    with _eval_on(encoder, device) as (dev, dtype):
        for s in range(0, len(imgs), batch_size):
            chunk = imgs[s : s + batch_size]
            if grey:
                chunk = to_grayscale(chunk.cpu().numpy() if isinstance(chunk, torch.Tensor) else chunk)
            if size is not None:
                chunk = resize_images(chunk, int(size))
            f = encoder(images_to_tensor(chunk, device=dev, dtype=dtype))
            out.append(f.float().cpu().numpy())
    if not out:
        return _empty_features(encoder)
    return np.concatenate(out).astype(np.float32, copy=False)


def extract_point_features(encoder: nn.Module, points, *, batch_size: int = 32, device=None,
                           normalize: bool = False) -> np.ndarray:
    """Global point-cloud features: points ``(n, N, 3)`` float -> ``(n, D)`` float32.

    Batched, in eval mode under ``torch.inference_mode`` (train flag restored afterwards);
    device: where to run (default: the encoder's device; the encoder is moved there). Memory
    grows with ``batch_size * N**2`` (DGCNN's kNN distances) and ``batch_size * N * k`` (its edge
    features): for clouds of many thousand points, lower ``batch_size``.

    The encoders are trained on clouds centred on their mean with their farthest point at
    distance 1, as ``xmodal prepare`` stores them, and oriented with the dataset's up axis
    (``LoadedRun.up_axis``). normalize: centre and scale each cloud so first
    (:func:`xmodal.data.geometry.normalize_unit_sphere`); without it a warning (once per encoder)
    says when some cloud is far from that frame (its mean farther than 0.25 from the origin, or its farthest
    point outside [0.5, 2]), since the features then change with the cloud's position and scale.

    Raises:
        ValueError: a wrongly shaped input, a cloud with NaN or infinite coordinates (named by its
            index), or clouds with fewer points than the encoder's kNN graph needs.
    """
    batch_size = _check_batch_size(batch_size)
    pts = points if isinstance(points, torch.Tensor) else np.asarray(points, dtype=np.float32)
    if pts.ndim != 3 or pts.shape[-1] != 3:
        raise ValueError(f"points must be (n, N, 3), got shape {tuple(pts.shape)}")
    inner = _unwrapped(encoder)
    pts = _checked_clouds(pts, normalize=normalize, encoder=inner)
    k = getattr(inner, "k", None)
    if len(pts) and isinstance(k, int) and pts.shape[1] < k:
        raise ValueError(f"each cloud has {pts.shape[1]} points, but this encoder's kNN graph takes k={k} "
                         f"neighbours per point: give clouds of at least {k} points")
    out = []
    with _eval_on(encoder, device) as (dev, dtype):
        for s in range(0, len(pts), batch_size):
            f = encoder(points_to_tensor(pts[s : s + batch_size], device=dev, dtype=dtype))
            out.append(f.float().cpu().numpy())
    if not out:
        return _empty_features(encoder)
    return np.concatenate(out).astype(np.float32, copy=False)


def _checked_clouds(pts, *, normalize: bool, encoder: nn.Module):
    """``pts`` (n, N, 3), refused where a cloud holds NaN or infinite coordinates, and centred and
    scaled into the unit sphere when ``normalize`` (else a warning when some cloud is far from it)."""
    if len(pts) == 0 or pts.shape[1] == 0:
        return pts
    host = pts.detach().cpu().numpy() if isinstance(pts, torch.Tensor) else pts
    bad = np.flatnonzero(~np.isfinite(host).all(axis=(1, 2)))
    if bad.size:
        raise ValueError(f"{bad.size} of {len(host)} clouds hold NaN or infinite coordinates "
                         f"(indices {reprlib.repr(bad.tolist())})")
    if normalize:
        out, _, _ = normalize_unit_sphere(host.astype(np.float64), strict=False)
        return out.astype(np.float32)
    center = host.mean(axis=1, dtype=np.float64)
    radius = np.linalg.norm(host - center[:, None].astype(host.dtype), axis=2).max(axis=1)
    off = (np.linalg.norm(center, axis=1) > 0.25) | (radius < 0.5) | (radius > 2.0)
    if off.any():
        i = int(np.flatnonzero(off)[0])
        _warn_once("frame", encoder, "%d of %d clouds are not centred and scaled as the encoder was trained (e.g. "
                   "cloud %d: mean at distance %.3g from the origin, farthest point %.3g from the mean; trained: 0 "
                   "and 1): pass normalize=True to extract_point_features to centre and scale them",
                   int(off.sum()), len(host), i, float(np.linalg.norm(center[i])), float(radius[i]))
    return pts
