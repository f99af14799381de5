"""Settings of self-supervised pre-training (:class:`PretrainConfig`).

The schema is a tree of dataclasses resolved by :mod:`xmodal.config`:
dataclass defaults <- a preset (``configs/pretrain/*.yaml``: ``paper``, ``paper-stable``,
``cpu``, ``cpu-fp32``, ``cpu-long``, ``demo``, ``smoke``) <- ``key=value`` overrides (``optim.lr=0.01``). The
defaults are the paper's §4.1 settings with every option beyond the paper off; the presets say
why they differ.

Choices the paper leaves open
-----------------------------
* ``loss.margin`` (α of Eq. 1) = 1.0. The triplet loss uses *squared* Euclidean
  distances of un-normalised 512-d ResNet features. At initialisation
  ``d(a,p) ≈ d(a,n)`` so the loss starts at ≈ α; α = 1 is the customary default
  (``torch.nn.TripletMarginLoss``, FaceNet-style losses) and the pair distances
  the paper reports for Fimg-CM-CV (Table 1: mPD 2.56 vs 4.33, i.e. squared
  distances ≈ 6.6 vs 18.7) are well past it, so α = 1 does not saturate.
* ``loss.beta`` (β of Eq. 3) = 1.0. Summed over the three pairs the
  cross-entropy starts at 3·ln 2 ≈ 2.1 and the triplet term at ≈ α = 1, so
  β = 1 keeps both terms of the same order; the paper gives no reason to favour
  either.
* Image crops: ``aug.crop_scale`` = (0.5, 1.0) of the image area with aspect
  ratio in (3/4, 4/3), then resized back to ``data.image_size``. The renders are
  object-centred, so crops much smaller than half the image would mostly cut
  the object away (torchvision's ImageNet default of 0.08 is too aggressive).
* Point jitter: Gaussian σ = 0.02 *without* clipping (``aug.jitter_clip: null``),
  as §4.1 describes it; set ``aug.jitter_clip=0.05`` for DGCNN's clipped jitter.
* Point/image sizes that differ from the stored ones: points are reduced to
  ``data.num_points`` by a seeded random subset drawn per step
  (``data.point_subsample: random``; ``fps`` takes a fixed farthest-point subset
  per object instead), images are resized with antialiased bilinear
  ``torch.nn.functional.interpolate``. Fewer stored points than asked is an error.

Options beyond the paper (each off in ``paper``; the measurements behind them are in
``docs/EXPERIMENTS.md``)
--------------------------------------------------------------------------------------
* ``model.pair_input_norm`` ("none" = the paper): "batch" standardises each of Ff's two input
  features per channel (``BatchNorm1d`` without parameters) before the concatenation. The
  encoders' features are non-negative with large norms, which can kill Ff's hidden ReLUs in the
  first steps; Fp, which learns only through Ff, then gets no gradient.
* ``model.freeze_point_bn`` (false = the paper): Fp's BatchNorm layers keep their initial
  statistics (mean 0, variance 1) and learn only their scale and shift; the encoder then behaves
  identically in training and evaluation.
* ``model.point_init`` ("default" = the reference code's PyTorch initialisation): "kaiming"
  initialises Fp's convolutions with He normal for LeakyReLU(0.2). Under frozen BatchNorm
  statistics the default's weights shrink every EdgeConv block's output about 7x, so the last two
  blocks feed the global feature almost nothing and learn ~75x slower than the first.
* ``loss.cross_pairs`` ("sample" = the paper): Ff trained on every (image, cloud) pair of the
  batch instead of the three pairs of each sample.
* ``loss.projected_nce`` with ``model.projection_dim`` (0 = the paper): a contrastive term between
  image and point features projected into one space.
* ``loss.point_nce`` (0 = the paper): a cross-view term for Fp on two augmented copies of each cloud.
* ``loss.point_decorrelation`` (0 = the paper): a term on the correlation between different
  channels of Fp's per-point features before the max-pool.
* ``loss.nce_pool_views`` (false): ``projected_nce`` pairs each cloud with the mean of its
  object's two view embeddings instead of with each view.
* ``aug.point_scale`` / ``aug.point_shift`` ((1, 1) / 0 = the paper's rotation and jitter only):
  each cloud also scaled per axis and moved, as DGCNN and CrossPoint train their point encoders.
* ``val.*`` (off): a learning curve on held-out training objects (:class:`ValConfig`).
* ``optim.name`` ("sgd" = the paper): "adamw" trains every network with AdamW instead.
* ``optim.point_lr_scale`` (1 = the paper's single learning rate): Fp's learning rate relative
  to the other networks'.
* ``optim.point_trust`` (0 = the paper's plain SGD): each Fp weight tensor's gradient rescaled to
  a fixed fraction of its norm before the step (LARS's layer-wise trust ratio), so the deep
  EdgeConv blocks get gradients at the first block's scale.
* ``optim.average_from`` (0 = the paper's last-step weights): the exported networks are the mean of
  the weights sampled every ``optim.average_every`` steps from that step on (weight averaging).
* ``amp`` ("off" = the paper's float32): mixed precision.
* ``compile`` (off): ``torch.compile`` of the training forward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from xmodal.config import ConfigError, apply_overrides, from_dict, load_preset, require_fields, resolve, to_dict

__all__ = [
    "ModelConfig",
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "AugConfig",
    "ValConfig",
    "PretrainConfig",
    "RESUME_MUTABLE_KEYS",
    "config_hash",
    "config_diff",
    "resolve_pretrain_config",
]

log = logging.getLogger(__name__)

#: loss modes = the paper's ablation rows: both correspondences, cross-modality only, cross-view only
LOSS_MODES = ("cm-cv", "cm", "cv")
#: pair sets of the cross-modality loss (``loss.cross_pairs``)
CROSS_PAIRS = ("sample", "batch", "batch-bce")

#: dotted keys that may change between a run and its ``--resume`` (they do not change the result
#: of a step, or, for ``iterations``, only extend the schedule)
RESUME_MUTABLE_KEYS = frozenset(
    {"iterations", "checkpoint_every", "device", "data.workers", "data.prefetch_factor", "compile",
     "data.path", "out"}
)


@dataclass
class ModelConfig:
    """Architectures (names from :mod:`xmodal.models.registry`)."""

    image_encoder: str = "resnet18"
    point_encoder: str = "dgcnn"
    #: neighbours of DGCNN's k-NN graph (passed only to DGCNN-type point encoders)
    k: int = 20
    #: hidden width of the pair classifier Ff (paper: 256)
    pair_hidden: int = 256
    #: parameter-free normalisation of each feature before Ff: "none" (the paper's Ff literally,
    #: the default), "batch" or "layer"; see the module docstring
    pair_input_norm: str = "none"
    #: keep Fp's BatchNorm layers in eval mode while pre-training: their statistics stay at the
    #: initial mean 0 / variance 1 and each layer is a learnable per-channel scale and shift
    #: ("frozen BatchNorm"); false = ordinary BatchNorm (the paper). See the module docstring
    freeze_point_bn: bool = False
    #: size of the shared space of Ff's projection heads (0 = none, the paper); needed by
    #: ``loss.projected_nce``
    projection_dim: int = 0
    #: initialisation of Fp's convolution weights: "default" (PyTorch's, the reference DGCNN
    #: code's) or "kaiming" (He normal for LeakyReLU; with ``freeze_point_bn`` nothing else keeps
    #: the deep blocks' activations at the scale of the first's). See the module docstring
    point_init: str = "default"

    def validate(self) -> None:
        if not self.image_encoder or not self.point_encoder:
            raise ConfigError("model.image_encoder and model.point_encoder must be non-empty names")
        if self.k < 1:
            raise ConfigError(f"model.k must be >= 1, got {self.k}")
        if self.pair_hidden < 1:
            raise ConfigError(f"model.pair_hidden must be >= 1, got {self.pair_hidden}")
        if self.projection_dim < 0:
            raise ConfigError(f"model.projection_dim must be >= 0, got {self.projection_dim}")
        from xmodal.models.dgcnn import POINT_INITS
        from xmodal.models.heads import PAIR_INPUT_NORMS
        from xmodal.models.registry import is_dgcnn

        if self.point_init not in POINT_INITS:
            raise ConfigError(f"model.point_init must be one of {list(POINT_INITS)}, got {self.point_init!r}")
        if self.point_init != "default" and not is_dgcnn(self.point_encoder):
            raise ConfigError(f"model.point_init applies to DGCNN point encoders, not {self.point_encoder!r}")
        if self.pair_input_norm not in PAIR_INPUT_NORMS:
            raise ConfigError(
                f"model.pair_input_norm must be one of {list(PAIR_INPUT_NORMS)}, got {self.pair_input_norm!r}"
            )


@dataclass
class DataConfig:
    """What the networks see and how batches are loaded."""

    #: the dataset folder written by ``xmodal prepare`` (``--data``; a resume may name a copy,
    #: see ``allow_other_data`` of :func:`~xmodal.train.trainer.pretrain`)
    path: str = ""
    #: side of the (square) images fed to Fimg; stored images of another size are resized
    image_size: int = 224
    #: points per cloud fed to Fp; must not exceed the stored number
    num_points: int = 2048
    #: how to reduce stored clouds to ``num_points``: fresh seeded random subset every step,
    #: or a fixed farthest-point subset per object
    point_subsample: Literal["random", "fps"] = "random"
    #: the split trained on (never the test split)
    split: str = "train"
    #: DataLoader worker processes that prefetch whole batches (0: load in the training process)
    workers: int = 2
    #: batches each worker prepares ahead
    prefetch_factor: int = 2

    def validate(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8, got {self.image_size}")
        if self.num_points < 2:
            raise ConfigError(f"data.num_points must be >= 2, got {self.num_points}")
        if self.split == "test":
            raise ConfigError("data.split must not be 'test': pre-training never looks at the test split")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")


@dataclass
class LossConfig:
    """L_self = L_triplet + β L_cross (Eq. 3); ``mode`` selects the paper's ablation rows."""

    #: "cm-cv": both losses; "cm": cross-modality only; "cv": cross-view (triplet) only
    mode: Literal["cm-cv", "cm", "cv"] = "cm-cv"
    #: α, the triplet margin of Eq. 1 (on squared distances); see the module docstring
    margin: float = 1.0
    #: β, the weight of the cross-modality loss in Eq. 3; see the module docstring
    beta: float = 1.0
    #: which (image, cloud) pairs Ff is trained on: "sample" = the three pairs of each sample
    #: with the binary cross-entropy of Eq. 2 (the paper); "batch" = every pair of the batch,
    #: scored by Ff and trained with a softmax cross-entropy over the other clouds of the batch
    #: for each image and over the other images for each cloud (B-1 negatives per positive;
    #: :func:`xmodal.losses.batch_cross_modal_loss`); "batch-bce" = every pair of the batch with
    #: the binary cross-entropy, positives and negatives weighted equally
    cross_pairs: Literal["sample", "batch", "batch-bce"] = "sample"
    #: weight of a second cross-modality term (0 = off, the paper): InfoNCE between the image and
    #: point features projected into one space by Ff's projection heads (``model.projection_dim``),
    #: cosine similarity over ``temperature``, every pair of the batch (the cross-modal term of
    #: CrossPoint, Afham et al. 2022)
    projected_nce: float = 0.0
    #: weight of a cross-view term for the point encoder (0 = off, the paper, where only Fimg has
    #: one): each cloud is drawn twice with its own subset, rotation and jitter, and InfoNCE on
    #: their projections (Ff's point projection head, ``model.projection_dim``) must pair the two
    #: copies of each cloud among the batch's (the intra-modal term of CrossPoint); Fp then runs on
    #: 2B clouds per step
    point_nce: float = 0.0
    #: weight of a redundancy-reduction term for the point encoder (0 = off, the paper): the mean
    #: squared correlation between different channels of Fp's per-point features before its
    #: max-pool, over every point of the batch's clouds (under torchrun: of each process's share,
    #: averaged) (:func:`xmodal.losses.channel_decorrelation`; Barlow Twins' off-diagonal term on
    #: one set of features); needs a point encoder with ``forward_features`` (DGCNN)
    point_decorrelation: float = 0.0
    #: which image projections ``projected_nce`` pairs with the clouds: False (each view its own
    #: anchor: a cloud must pick both views of its object among the batch's 3B images) or True
    #: (the two views of a sample averaged and renormalised into one object embedding, so a cloud
    #: is aligned with its object as the views together show it; the negative views stay single)
    nce_pool_views: bool = False
    #: temperature of ``projected_nce`` and ``point_nce``
    temperature: float = 0.1

    def validate(self) -> None:
        if self.mode not in LOSS_MODES:
            raise ConfigError(f"loss.mode must be one of {list(LOSS_MODES)}, got {self.mode!r}")
        if self.cross_pairs not in CROSS_PAIRS:
            raise ConfigError(f"loss.cross_pairs must be one of {list(CROSS_PAIRS)}, got {self.cross_pairs!r}")
        if self.projected_nce < 0:
            raise ConfigError(f"loss.projected_nce must be >= 0, got {self.projected_nce}")
        if self.point_nce < 0:
            raise ConfigError(f"loss.point_nce must be >= 0, got {self.point_nce}")
        if self.point_decorrelation < 0:
            raise ConfigError(f"loss.point_decorrelation must be >= 0, got {self.point_decorrelation}")
        if not self.temperature > 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.margin < 0:
            raise ConfigError(f"loss.margin must be >= 0, got {self.margin}")
        if self.beta < 0:
            raise ConfigError(f"loss.beta must be >= 0, got {self.beta}")

    @property
    def use_cross_view(self) -> bool:
        return self.mode in ("cm-cv", "cv")

    @property
    def use_cross_modal(self) -> bool:
        return self.mode in ("cm-cv", "cm")


#: the values of ``optim.name``
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class OptimConfig:
    """SGD (paper §4.1) or AdamW, with a step learning-rate schedule stepped every iteration."""

    #: the optimizer: "sgd" (the paper: SGD with ``momentum``) or "adamw" (AdamW, Loshchilov &
    #: Hutter 2019, betas (0.9, 0.999), decoupled ``weight_decay``; ``momentum`` is not used), the
    #: optimizer CrossPoint and OcCo pre-train their point encoders with. Either way the step
    #: schedule below applies
    name: str = "sgd"
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: multiply the learning rate by ``gamma`` every ``step_size`` iterations
    step_size: int = 40_000
    gamma: float = 0.1
    #: learning rate of Fp relative to the others (1 = one learning rate, the paper). Fp learns
    #: only through Ff, and its gradients are about ten times smaller relative to its weights than
    #: Fimg's (docs/EXPERIMENTS.md)
    point_lr_scale: float = 1.0
    #: LARS-style trust ratio for Fp (0 = off, the paper): before each step every Fp weight
    #: tensor's gradient is rescaled to ``point_trust`` times the tensor's norm (momentum and weight
    #: decay then act as usual), so the deep EdgeConv blocks are not left ~75x behind the first
    #: (:mod:`xmodal.train.trust`)
    point_trust: float = 0.0
    #: weight averaging (0 = off, the paper: the run exports its last step's weights): from this
    #: step on, the weights every ``average_every`` steps, and the last step's, are averaged, and
    #: the run exports that mean (stochastic weight averaging, :mod:`xmodal.train.averaging`)
    average_from: int = 0
    #: steps between two samples of the average
    average_every: int = 200

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if self.name != "sgd" and self.point_trust > 0:
            raise ConfigError("optim.point_trust rescales the gradient before an SGD step; "
                              f"optim.name={self.name} divides that scale away, so it needs optim.name=sgd")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.step_size < 1:
            raise ConfigError(f"optim.step_size must be >= 1, got {self.step_size}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"optim.gamma must be in (0, 1], got {self.gamma}")
        if not self.point_lr_scale > 0:
            raise ConfigError(f"optim.point_lr_scale must be > 0, got {self.point_lr_scale}")
        if not self.point_trust >= 0:
            raise ConfigError(f"optim.point_trust must be >= 0 (0 = off), got {self.point_trust}")
        if self.average_from < 0:
            raise ConfigError(f"optim.average_from must be >= 0 (0 = off), got {self.average_from}")
        if self.average_every < 1:
            raise ConfigError(f"optim.average_every must be >= 1, got {self.average_every}")


@dataclass
class AugConfig:
    """Data augmentation of §4.1 (see :mod:`xmodal.train.augment`)."""

    enabled: bool = True
    #: random resized crop: area fraction range of the crop window
    crop_scale: tuple[float, float] = (0.5, 1.0)
    #: random resized crop: aspect-ratio (width / height) range, sampled log-uniformly
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    #: probability of a horizontal flip of each image
    hflip_p: float = 0.5
    #: rotate each cloud by a uniform angle in [0, 2π) about the dataset's up axis
    rotate: bool = True
    #: σ of the Gaussian jitter added to every point coordinate (0 disables)
    jitter_sigma: float = 0.02
    #: clip the jitter to ±jitter_clip (None: no clipping, as §4.1 describes)
    jitter_clip: Optional[float] = None
    #: range of a per-axis scale factor of each cloud, drawn uniformly after the rotation and
    #: jitter (beyond the paper; (1, 1) = off, the paper; DGCNN and CrossPoint train with
    #: (2/3, 3/2)); each copy of ``loss.point_nce`` draws its own
    point_scale: tuple[float, float] = (1.0, 1.0)
    #: each cloud moved by an offset uniform in ±point_shift per axis, after the scale (beyond the
    #: paper; 0 = off; 0.2 in DGCNN and CrossPoint)
    point_shift: float = 0.0

    def validate(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"aug.crop_scale must satisfy 0 < lo <= hi <= 1, got {list(self.crop_scale)}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"aug.crop_ratio must satisfy 0 < lo <= hi, got {list(self.crop_ratio)}")
        if not 0 <= self.hflip_p <= 1:
            raise ConfigError(f"aug.hflip_p must be in [0, 1], got {self.hflip_p}")
        if self.jitter_sigma < 0:
            raise ConfigError(f"aug.jitter_sigma must be >= 0, got {self.jitter_sigma}")
        if self.jitter_clip is not None and self.jitter_clip <= 0:
            raise ConfigError(f"aug.jitter_clip must be > 0 or null, got {self.jitter_clip}")
        lo, hi = self.point_scale
        if not 0 < lo <= hi:
            raise ConfigError(f"aug.point_scale must satisfy 0 < lo <= hi, got {list(self.point_scale)}")
        if self.point_shift < 0:
            raise ConfigError(f"aug.point_shift must be >= 0, got {self.point_shift}")

    @property
    def scales_points(self) -> bool:
        """Whether clouds are scaled or moved (``point_scale`` other than (1, 1), or ``point_shift`` > 0)."""
        return tuple(float(x) for x in self.point_scale) != (1.0, 1.0) or self.point_shift > 0


@dataclass
class ValConfig:
    """A learning curve on held-out training objects (off unless ``every`` > 0).

    A seeded, class-stratified ``fraction`` of the training split is set aside and never
    trained on. Every ``every`` steps (and before the first) the frozen encoders embed it and
    :mod:`xmodal.train.validation` records a cross-validated linear-SVM accuracy and
    leave-one-out retrieval (top-1, top-5, mAP) for the point features and for image features
    max-pooled over ``views`` views, as ``val.*`` keys in ``metrics.jsonl``. The class labels are
    read only to score the curve; nothing in training depends on them, and no checkpoint is
    chosen by it. The test split is never touched.
    """

    #: steps between two validations; 0 = off
    every: int = 0
    #: fraction of each class of the training split held out (and excluded from training)
    fraction: float = 0.1
    #: views per object pooled for the image curve (capped at the stored views); 0 = points only
    views: int = 12
    #: folds of the cross-validated SVM accuracy (reduced for classes with fewer members)
    folds: int = 3
    #: the SVM's C grid. Shorter than the evaluation's (``xmodal.eval.svm.DEFAULT_CS``) because a
    #: curve point must be cheap: the large-C fits dominate the cost, and cross-validation chose C
    #: in 1e-3..1e-1 for every encoder measured so far (docs/EXPERIMENTS.md)
    Cs: tuple[float, ...] = (0.001, 0.01, 0.1)

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"val.every must be >= 0 (0 = off), got {self.every}")
        if not 0 < self.fraction < 1:
            raise ConfigError(f"val.fraction must be in (0, 1), got {self.fraction}")
        if self.views < 0:
            raise ConfigError(f"val.views must be >= 0, got {self.views}")
        if self.folds < 2:
            raise ConfigError(f"val.folds must be >= 2, got {self.folds}")
        if not self.Cs or any(not c > 0 for c in self.Cs):
            raise ConfigError(f"val.Cs must be positive numbers, got {list(self.Cs)}")

    @property
    def enabled(self) -> bool:
        return self.every > 0


@dataclass
class PretrainConfig:
    """Everything that determines a pre-training run (defaults: paper §4.1)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    val: ValConfig = field(default_factory=ValConfig)
    #: total optimisation steps
    iterations: int = 120_000
    #: global mini-batch size B (objects per step, split evenly over distributed processes)
    batch_size: int = 32
    #: write one metrics record (averaged over the window) every ``log_every`` steps
    log_every: int = 1
    #: save ``checkpoints/last.*`` every ``checkpoint_every`` steps (and at the end)
    checkpoint_every: int = 1000
    seed: int = 0
    #: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N" (under torchrun: cuda:LOCAL_RANK)
    device: str = "auto"
    #: mixed precision: "off" (float32, the default), "auto" (what the device computes natively: on
    #: CUDA bf16 when supported, else fp16; on the CPU bf16 where it has native bfloat16, else
    #: float32), "bf16" (CUDA or CPU autocast) or "fp16" (CUDA, with a gradient scaler). What a run
    #: used is in its run.json ("amp")
    amp: Literal["auto", "bf16", "fp16", "off"] = "off"
    #: run the training forward through ``torch.compile`` (fused kernels; a speed option that
    #: changes results only by float rounding). The first steps pay the compilation (about a
    #: minute on 2 CPU cores); see docs/EXPERIMENTS.md for the measured gain
    compile: bool = False
    #: the run folder to write (``--out``)
    out: str = ""

    def with_paths(self, data: "str | os.PathLike | None" = None, out: "str | os.PathLike | None" = None
                   ) -> "PretrainConfig":
        """A copy with the dataset folder (``data.path``) and/or the run folder (``out``) set."""
        cfg = self
        if data is not None:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data)))
        if out is not None:
            cfg = dataclasses.replace(cfg, out=str(out))
        return cfg

    def require_paths(self, *, data: bool = True) -> None:
        """Raise :class:`ConfigError` unless ``out`` (and, with ``data=True``, ``data.path``) is given."""
        require_fields(self, *(("data.path", "out") if data else ("out",)), hint="--data / --out on the command line")

    def validate(self) -> None:
        for sec in (self.model, self.data, self.loss, self.optim, self.aug, self.val):
            sec.validate()
        uses_projection = self.loss.projected_nce > 0 or self.loss.point_nce > 0
        if uses_projection != (self.model.projection_dim > 0):
            raise ConfigError(
                "loss.projected_nce or loss.point_nce > 0 needs model.projection_dim > 0 and the other way round "
                f"(got loss.projected_nce={self.loss.projected_nce}, loss.point_nce={self.loss.point_nce}, "
                f"model.projection_dim={self.model.projection_dim})"
            )
        if self.loss.nce_pool_views and self.loss.projected_nce <= 0:
            raise ConfigError("loss.nce_pool_views=true changes the projected_nce term: it needs loss.projected_nce > 0")
        if uses_projection and not self.loss.use_cross_modal:
            raise ConfigError("loss.projected_nce and loss.point_nce need the point encoder: use loss.mode cm-cv or cm")
        if self.loss.point_decorrelation > 0 and not self.loss.use_cross_modal:
            raise ConfigError("loss.point_decorrelation needs the point encoder: use loss.mode cm-cv or cm")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be >= 1, got {self.iterations}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be >= 1, got {self.log_every}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.checkpoint_every % self.log_every:
            raise ConfigError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every ({self.log_every}) "
                "so that a resumed run continues the metrics log at a record boundary"
            )
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"amp must be one of auto, bf16, fp16, off; got {self.amp!r}")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


#: fields added after runs had been saved, with the value that reproduces those runs: a field at
#: that value is left out of :func:`config_hash`, so a run saved before the field existed keeps its
#: hash and resumes. A new field joins this table (a test pins the hash of the defaults)
HASH_NEUTRAL_VALUES: dict[str, Any] = {"model.point_init": "default", "optim.point_trust": 0.0,
                                       "optim.average_from": 0, "optim.average_every": 200,
                                       "loss.nce_pool_views": False, "aug.point_scale": [1.0, 1.0],
                                       "aug.point_shift": 0.0, "loss.point_decorrelation": 0.0,
                                       "optim.name": "sgd"}


def config_hash(cfg: PretrainConfig) -> str:
    """SHA-256 (16 hex digits) of the settings that must not change on resume.

    Keys in :data:`RESUME_MUTABLE_KEYS` are excluded, and so are the keys of
    :data:`HASH_NEUTRAL_VALUES` while they hold their neutral value.
    """
    flat = {k: v for k, v in _flatten(to_dict(cfg)).items()
            if k not in RESUME_MUTABLE_KEYS and not (k in HASH_NEUTRAL_VALUES and HASH_NEUTRAL_VALUES[k] == v)}
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(old: PretrainConfig | dict, new: PretrainConfig | dict, *, ignore=RESUME_MUTABLE_KEYS) -> list[str]:
    """Human-readable ``key: old -> new`` lines for the settings that differ."""
    a = _flatten(old if isinstance(old, dict) else to_dict(old))
    b = _flatten(new if isinstance(new, dict) else to_dict(new))
    lines = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            lines.append(f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}")
    return lines


def resolve_pretrain_config(
    preset: str | None = None,
    overrides=(),
    *,
    run: str | Path | None = None,
    resume: bool = False,
) -> PretrainConfig:
    """The config of a ``pretrain`` invocation.

    Fresh run: dataclass defaults <- ``preset`` (name or YAML path) <- ``overrides``.
    With ``resume=True`` and an existing ``RUN/config.yaml``: the saved config is the
    base and ``overrides`` are applied on top (typically ``iterations=...`` to extend a
    run); a ``preset`` is then ignored (a warning is logged), since the run's settings
    are fixed. Changes other than :data:`RESUME_MUTABLE_KEYS` are rejected later by the
    trainer, with the list of differing keys.
    """
    if resume and run is not None and (Path(run) / "config.yaml").is_file():
        path = Path(run) / "config.yaml"
        if preset:
            log.warning("resuming %s: using its saved config.yaml; preset %r is ignored", run, preset)
        try:
            base = from_dict(PretrainConfig, load_preset("pretrain", str(path)))
        except ConfigError as exc:
            if exc.path is not None:  # the error names the file already
                raise
            raise ConfigError(exc.problem, path=path, hint=exc.hint) from exc
        return apply_overrides(_findable_dataset(base, Path(run)), overrides)
    return resolve(PretrainConfig, preset, overrides, group="pretrain")


def _findable_dataset(cfg: PretrainConfig, run: Path) -> PretrainConfig:
    """``cfg`` (a run's saved config) with its dataset folder as ``RUN/run.json`` records it, absolute,
    when the saved one is relative and not found from here (the run was started in another folder)."""
    saved = cfg.data.path
    if not saved or Path(saved).is_absolute() or Path(saved).exists():
        return cfg
    try:
        recorded = json.loads((run / "run.json").read_text(encoding="utf-8")).get("dataset")
    except (OSError, ValueError, AttributeError):
        return cfg
    if not isinstance(recorded, str) or not Path(recorded).is_dir():
        return cfg
    log.info("%s: its dataset %r is relative to the folder the run was started in; using %s (run.json)",
             run, saved, recorded)
    return cfg.with_paths(data=recorded)
