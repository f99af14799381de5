"""One optimisation step of pre-training (Algorithm 1 of the paper).

A step takes a batch of ``B`` samples ``(p, img1, img2, img3, y = (1, 1, 0))``
(:mod:`xmodal.train.sampler`), and

1. encodes the ``3B`` images in one forward pass of Fimg -> ``f1, f2, f3`` (B, 512) each
   (BatchNorm sees all three sets together) and the clouds with Fp -> ``fp`` (B, 512);
2. scores (image, cloud) pairs with Ff: the three pairs of each sample (``loss.cross_pairs:
   sample``, the paper) or every pair of the batch (``batch``, ``batch-bce``);
3. minimises ``L = L_triplet(f1, f2, f3) + β L_cross`` (Eq. 1-3; ``loss.mode`` drops either
   term for the paper's ablations) with SGD and a step LR schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from xmodal.errors import ConfigError
from xmodal.losses import (
    batch_cross_modal_loss,
    batch_pair_bce,
    channel_decorrelation,
    cross_modal_loss,
    pair_accuracy,
    pair_scores,
    triplet_loss,
)
from xmodal.train.augment import crop_resize_flip
from xmodal.train.config import PretrainConfig
from xmodal.train.distributed import DistContext, all_reduce_mean
from xmodal.train.model import autocast
from xmodal.train.trust import apply_trust_ratio_, trust_params
from xmodal.transforms import images_to_tensor

__all__ = ["LOSS_PARTS", "OPTIONAL_TERMS", "StepDiverged", "Stepper", "sample_logits", "batch_positives", "pooled_view_rows",
           "unwrap_model"]

#: what a step reports, in this order (means over the processes); ``nce``, ``point_nce`` and
#: ``decor`` are the ``loss.projected_nce``, ``loss.point_nce`` and ``loss.point_decorrelation``
#: terms (0 when off)
LOSS_PARTS = ("loss", "triplet", "cross", "cm_acc", "nce", "point_nce", "decor")
#: the parts above that only some configurations compute, with the loss weight that turns each on
OPTIONAL_TERMS = {"nce": "projected_nce", "point_nce": "point_nce", "decor": "point_decorrelation"}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside ``model``'s ``torch.compile`` and ``DistributedDataParallel`` wrappers
    (``model`` itself when it has none)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class StepDiverged(Exception):
    """A loss part of step ``step`` is NaN/inf (raised before the optimiser step)."""

    def __init__(self, step: int, part: str, value: float):
        super().__init__(f"step {step}: {part} = {value}")
        self.step, self.part, self.value = step, part, value


def sample_logits(all_logits: Tensor) -> Tensor:
    """The paper's three pairs of each sample out of all-pairs logits: ``(3B, B, 2) -> (B, 3, 2)``.

    Image row ``j*B + i`` is view ``j`` of sample ``i``; its pair with cloud ``i`` is the
    pair ``(img_j(i), p(i))`` of Eq. 2.
    """
    m, b, _ = all_logits.shape
    i = torch.arange(b, device=all_logits.device)
    rows = torch.arange(m // b, device=all_logits.device)[:, None] * b + i[None, :]  # (3, B)
    return all_logits[rows, i[None, :].expand_as(rows)].transpose(0, 1)


def batch_positives(objects: Tensor, negatives: Tensor) -> Tensor:
    """``(3B, B)`` bool: image row ``m`` (img1, img2 of ``objects``, img3 of ``negatives``) shows cloud ``b``'s object."""
    image_objects = torch.cat([objects, objects, negatives])
    return image_objects[:, None] == objects[None, :]


def pooled_view_rows(z_img: Tensor, objects: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
    """The image side of ``loss.nce_pool_views``: each sample's two views as one object embedding.

    Args:
        z_img: (3B, D) unit-length image embeddings, rows ``[img1; img2; img3]`` (see
            :func:`sample_logits`).
        objects: (B,) the object of each sample (its cloud, img1 and img2).
        negatives: (B,) the object img3 of each sample shows.

    Returns:
        ``rows`` (2B, D): ``normalize(z1 + z2)`` of each sample, then the img3 rows unchanged;
        ``positive`` (2B, B) bool: row ``m`` shows the object of cloud ``b``.
    """
    b = objects.shape[0]
    if z_img.ndim != 2 or z_img.shape[0] != 3 * b:
        raise ValueError(f"z_img must be (3B, D) with B = {b}, got {tuple(z_img.shape)}")
    pooled = nn.functional.normalize(z_img[:b] + z_img[b : 2 * b], dim=1)
    rows = torch.cat([pooled, z_img[2 * b :]])
    ids = torch.cat([objects, negatives]).to(z_img.device)
    return rows, ids[:, None] == objects.to(z_img.device)[None, :]


@dataclass
class Stepper:
    """Runs training steps of ``model`` (an :class:`XModalNet`, possibly inside DDP).

    ``amp_dtype``: the autocast dtype (None: float32); ``scaler``: a CUDA grad scaler for fp16;
    ``trust``: the tensors whose gradients :func:`~xmodal.train.trust.apply_trust_ratio_` rescales
    to ``cfg.optim.point_trust`` times their norm before each step; ``None`` (the default) takes
    Fp's weights (:func:`~xmodal.train.trust.trust_params` of the model's ``point_encoder``,
    through DDP and ``torch.compile`` wrappers) when ``optim.point_trust > 0``, else none.
    Calling it with a batch and its 1-based step number returns the :data:`LOSS_PARTS`
    values (floats, averaged over processes) or raises :class:`StepDiverged`.
    """

    model: nn.Module
    cfg: PretrainConfig
    ctx: DistContext
    optimizer: torch.optim.Optimizer
    scheduler: Any
    amp_dtype: Optional[torch.dtype] = None
    scaler: Any = None
    trust: Optional[Sequence[Tensor]] = None

    def __post_init__(self) -> None:
        if self.trust is None:
            on = self.cfg.optim.point_trust > 0
            self.trust = trust_params(unwrap_model(self.model).point_encoder) if on else ()

    def _inputs(self, batch: dict) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        device, nb = self.ctx.device, self.ctx.device.type == "cuda"
        images = batch["images"].to(device, non_blocking=nb)  # (3, b, S, S[, 3]) uint8
        b = images.shape[1]
        x = images_to_tensor(images.reshape((3 * b,) + tuple(images.shape[2:])))  # (3b, C, S, S)
        if self.cfg.aug.enabled:
            boxes = batch["boxes"].reshape(3 * b, 4).to(device)
            x = crop_resize_flip(x, boxes, batch["flip"].reshape(3 * b).to(device), self.cfg.data.image_size)
        points = batch["points"].to(device, non_blocking=nb) if self.cfg.loss.use_cross_modal else None
        points2 = batch["points2"].to(device, non_blocking=nb) if "points2" in batch else None
        return x, points, points2

    def _losses(self, batch: dict, out) -> tuple[Tensor, ...]:
        """The :data:`LOSS_PARTS` of an :class:`XModalOutput`; only ``loss`` carries gradient."""
        loss_cfg = self.cfg.loss
        f_img = out.f_img.float()
        b = f_img.shape[0] // 3
        f1, f2, f3 = f_img[:b], f_img[b : 2 * b], f_img[2 * b :]
        trip = triplet_loss(f1, f2, f3, margin=loss_cfg.margin)
        zero = trip.new_zeros(())
        if out.logits is None:  # cross-view only: Fp and Ff are not run
            return trip, trip.detach(), zero, zero, zero, zero, zero
        logits = out.logits.float()
        labels = batch["labels"].to(self.ctx.device)
        pos = None
        if loss_cfg.cross_pairs == "sample":
            per_sample = logits
            cross = cross_modal_loss(logits, labels)
        else:
            per_sample = sample_logits(logits)
            scores = pair_scores(logits)
            pos = batch_positives(batch["objects"], batch["negatives"]).to(self.ctx.device)
            cross = batch_cross_modal_loss(scores, pos) if loss_cfg.cross_pairs == "batch" else batch_pair_bce(scores, pos)
        loss = (trip if loss_cfg.use_cross_view else zero) + loss_cfg.beta * cross
        nce = pnce = decor = zero
        if loss_cfg.projected_nce > 0:
            z_img, nce_pos = out.z_img.float(), pos
            if loss_cfg.nce_pool_views:
                z_img, nce_pos = pooled_view_rows(z_img, batch["objects"], batch["negatives"])
            elif nce_pos is None:
                nce_pos = batch_positives(batch["objects"], batch["negatives"]).to(self.ctx.device)
            sims = z_img @ out.z_pts.float().t() / loss_cfg.temperature
            nce = batch_cross_modal_loss(sims, nce_pos)
            loss = loss + loss_cfg.projected_nce * nce
        if loss_cfg.point_nce > 0:  # the two copies of cloud i pair with each other among the batch's
            sims = out.z_pts.float() @ out.z_pts2.float().t() / loss_cfg.temperature
            pnce = batch_cross_modal_loss(sims, torch.eye(b, dtype=torch.bool, device=sims.device))
            loss = loss + loss_cfg.point_nce * pnce
        if loss_cfg.point_decorrelation > 0:  # over every point of the batch's clouds: (B*N, D)
            if out.pts_map is None:
                raise ConfigError("loss.point_decorrelation needs Fp's per-point features: build the model with "
                                  "XModalNet(..., point_map=True), as build_training_model does")
            rows = out.pts_map.transpose(1, 2).reshape(-1, out.pts_map.shape[1])
            decor = channel_decorrelation(rows)
            loss = loss + loss_cfg.point_decorrelation * decor
        return (loss, trip.detach(), cross.detach(), pair_accuracy(per_sample, labels), nce.detach(), pnce.detach(),
                decor.detach())

    def _backward(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        scaled = self.scaler is not None and self.scaler.is_enabled()
        (self.scaler.scale(loss) if scaled else loss).backward()
        if self.trust:
            if scaled:  # the ratio needs the true gradients; scaler.step() will not unscale twice
                self.scaler.unscale_(self.optimizer)
            apply_trust_ratio_(self.trust, self.cfg.optim.point_trust)
        if scaled:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()

    def __call__(self, batch: dict, step: int) -> list[float]:
        x, points, points2 = self._inputs(batch)
        with autocast(self.amp_dtype, self.ctx.device):
            out = self.model(x, points, points2)
        loss, *parts = self._losses(batch, out)
        with torch.no_grad():
            vec = all_reduce_mean(torch.stack([loss.detach(), *parts]).float(), self.ctx)
        parts = [float(v) for v in vec.cpu()]
        for name in ("triplet", "cross", "loss"):  # the part that went bad first, then the total
            value = parts[LOSS_PARTS.index(name)]
            if not math.isfinite(value):
                raise StepDiverged(step, name, value)
        self._backward(loss)
        return parts
