"""The networks of pre-training in one module, with their optimiser and precision settings.

* :class:`XModalNet` – Fimg, Fp and Ff as one ``nn.Module`` (one DDP wrapper for the three);
* :func:`build_training_model` – the module of a :class:`PretrainConfig`, global BatchNorm
  under ``torchrun``, on its device;
* :func:`build_optimizer` – SGD with the step schedule of §4.1;
* :func:`autocast_dtype` – the mixed-precision dtype a config asks for on a device.
"""

from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple, Optional

import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models.batchnorm import hold_batchnorm_stats
from xmodal.train.checkpoint import NETS, architecture_from_config, build_networks
from xmodal.train.config import PretrainConfig
from xmodal.train.distributed import DistContext, convert_batchnorm
from xmodal.utils.device import cpu_has_native_bf16

__all__ = ["XModalOutput", "XModalNet", "build_training_model", "build_optimizer", "autocast_dtype", "autocast"]

log = logging.getLogger(__name__)


class XModalOutput(NamedTuple):
    """What :class:`XModalNet` computes for one batch (None where not computed)."""

    #: (3B, D_img) image features, rows ``[img1 batch, img2 batch, img3 batch]``
    f_img: torch.Tensor
    #: (B, D_pts) point features
    f_pts: Optional[torch.Tensor] = None
    #: Ff's logits: (B, 3, 2) for the paper's three pairs of each sample, or (3B, B, 2) for every pair
    logits: Optional[torch.Tensor] = None
    #: (3B, P) and (B, P) unit-length projections (``model.projection_dim`` > 0)
    z_img: Optional[torch.Tensor] = None
    z_pts: Optional[torch.Tensor] = None
    #: (B, P) projection of the second copy of each cloud (``points2`` given)
    z_pts2: Optional[torch.Tensor] = None
    #: (B, D_pts, N) Fp's per-point features before the max-pool, of the first copy of each cloud
    #: (``point_map=True``)
    pts_map: Optional[torch.Tensor] = None


class XModalNet(nn.Module):
    """Fimg, Fp and Ff in one module.

    ``forward(images (3B, C, S, S), points (B, N, 3) or None) -> XModalOutput``; the image rows
    are ``[img1 batch, img2 batch, img3 batch]``. ``logits`` are Ff's outputs:

    * ``cross_pairs="sample"`` (the paper): ``(B, 3, 2)``, the pairs ``(img_j(i), p(i))``;
    * ``"batch"`` / ``"batch-bce"``: ``(3B, B, 2)``, every pair ``(image m, cloud b)``
      (:meth:`xmodal.models.heads.PairClassifier.pair_logits`).

    When Ff has projection heads, ``z_img`` / ``z_pts`` are the projected features; ``points2``
    (B, N, 3), a second copy of each cloud, goes through Fp with ``points`` and gives ``z_pts2``.
    ``points=None`` skips Fp and Ff (cross-view-only training). ``point_map=True`` also returns
    Fp's per-point features before its max-pool (``pts_map``; Fp must have ``forward_features``
    returning them as ``"point"``, as :class:`~xmodal.models.dgcnn.DGCNN` does).

    ``freeze_point_bn=True`` keeps every BatchNorm layer of Fp in eval mode even when the
    module is put in train mode (``model.freeze_point_bn``): their running statistics are
    neither used from the batch nor updated; their affine parameters still train.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        point_encoder: nn.Module,
        pair_classifier: nn.Module,
        *,
        freeze_point_bn: bool = False,
        cross_pairs: str = "sample",
        point_map: bool = False,
    ):
        super().__init__()
        if point_map and not callable(getattr(point_encoder, "forward_features", None)):
            raise ConfigError(f"{type(point_encoder).__name__} has no forward_features: its per-point features "
                              "(loss.point_decorrelation) cannot be read; use the dgcnn point encoder")
        self.point_map = bool(point_map)
        self.image_encoder = image_encoder
        self.point_encoder = point_encoder
        self.pair_classifier = pair_classifier
        self.freeze_point_bn = bool(freeze_point_bn)
        self.all_pairs = cross_pairs != "sample"
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_point_bn:
            hold_batchnorm_stats(self.point_encoder)
        return self

    def forward(self, images: torch.Tensor, points: Optional[torch.Tensor] = None,
                points2: Optional[torch.Tensor] = None) -> XModalOutput:
        f_img = self.image_encoder(images)
        if points is None:
            return XModalOutput(f_img)
        b = points.shape[0]
        both = points if points2 is None else torch.cat([points, points2])  # both copies in one pass of Fp
        pts_map = None
        if self.point_map:
            feats = self.point_encoder.forward_features(both)
            f_both, pts_map = feats["global"], feats["point"][:b]
        else:
            f_both = self.point_encoder(both)
        f_pts, f_pts2 = (f_both, None) if points2 is None else f_both.split(b)
        ff = self.pair_classifier
        if self.all_pairs:
            logits = ff.pair_logits(f_img, f_pts)
        else:  # rows j*B + i pair img_j(i) with p(i)
            logits = ff(f_img, f_pts.repeat(3, 1)).view(3, b, -1).transpose(0, 1)
        z_img = z_pts = z_pts2 = None
        if getattr(ff, "projection_dim", 0) > 0:
            if f_pts2 is None:
                z_img, z_pts = ff.project(f_img, f_pts)
            else:  # the point head sees both copies in one batch (its BatchNorm statistics too)
                z_img, z_both = ff.project(f_img, torch.cat([f_pts, f_pts2]))
                z_pts, z_pts2 = z_both.split(b)
        return XModalOutput(f_img, f_pts, logits, z_img, z_pts, z_pts2, pts_map)

    def networks(self) -> dict[str, nn.Module]:
        """``{"image_encoder", "point_encoder", "pair_classifier"}`` (the modules themselves)."""
        return {name: getattr(self, name) for name in NETS}


def build_training_model(cfg: PretrainConfig, ctx: DistContext) -> XModalNet:
    """The :class:`XModalNet` of ``cfg``, seeded with ``cfg.seed``, in train mode on ``ctx.device``.

    Under ``torchrun`` every BatchNorm layer is made global (:func:`convert_batchnorm`; the fused
    EdgeConv reduces its own statistics across processes).
    """
    nets = build_networks(architecture_from_config(cfg), seed=cfg.seed)
    net = XModalNet(
        nets["image_encoder"],
        nets["point_encoder"],
        nets["pair_classifier"],
        freeze_point_bn=cfg.model.freeze_point_bn,
        cross_pairs=cfg.loss.cross_pairs,
        point_map=cfg.loss.point_decorrelation > 0,
    )
    net = convert_batchnorm(net, ctx.device, ctx.world_size).to(ctx.device)
    return net.train()


def build_optimizer(cfg: PretrainConfig, net: XModalNet):
    """``(SGD, StepLR)`` of §4.1 with ``cfg.optim``'s values; the schedule steps every iteration.

    ``optim.name="adamw"`` builds AdamW (betas (0.9, 0.999), decoupled ``weight_decay``) in
    SGD's place, with the same groups and schedule.

    With ``optim.point_lr_scale`` != 1, Fp's parameters form a second parameter group whose
    learning rate is ``lr * point_lr_scale`` (group 0 keeps ``lr``).
    """
    o = cfg.optim
    if o.point_lr_scale == 1:
        groups = [{"params": list(net.parameters())}]
    else:
        fp = {id(p) for p in net.point_encoder.parameters()}
        groups = [
            {"params": [p for p in net.parameters() if id(p) not in fp]},
            {"params": list(net.point_encoder.parameters()), "lr": o.lr * o.point_lr_scale},
        ]
    if o.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_size, gamma=o.gamma)


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` ("auto", "bf16", "fp16", "off") on ``device``; None = float32.

    "auto" is the mixed precision the device computes natively: on CUDA bf16 where supported, else
    fp16; on the CPU bf16 where it has native bfloat16 instructions (``avx512_bf16`` / ``amx_bf16``,
    :func:`~xmodal.utils.device.cpu_has_native_bf16`), else float32 -- there CPU bf16 autocast is
    emulated and the `cpu` preset's step was measured 8.6x *slower* than float32
    (docs/EXPERIMENTS.md). "bf16" runs CPU autocast in bfloat16 regardless (a warning where it is
    emulated); "fp16" is not offered on the CPU (a warning, then float32).
    """
    if amp == "off":
        return None
    if device.type != "cuda":
        native = cpu_has_native_bf16()
        if amp == "auto":
            log.info("amp=auto: %s", "bf16 autocast (this CPU has native bfloat16)" if native else
                     "float32 (no native bfloat16 on this CPU, where bf16 autocast would be emulated and slower)")
            return torch.bfloat16 if native else None
        if amp == "bf16":
            if native is False:
                log.warning("amp=bf16 on a CPU without native bfloat16 (no avx512_bf16 / amx_bf16): autocast "
                            "is emulated and much slower than float32 (8.6x for the cpu preset's step on one "
                            "such CPU); amp=auto or amp=off trains in float32 here")
            return torch.bfloat16
        if amp == "fp16":
            log.warning("amp=fp16 is ignored on %s: use amp=bf16 for mixed precision on the CPU", device)
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(dtype: Optional[torch.dtype], device: torch.device):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
