"""3D part segmentation transfer task (paper §4.5, Table 4).

Three settings, each trained on seeded, category-stratified fractions of the ShapeNet-Part
train split and evaluated once on the test split:

* ``frozen``   — pre-trained Fp, frozen (parameters and BatchNorm statistics); only the new
  layers of :class:`~xmodal.models.partseg.PartSegNet` are trained;
* ``finetune`` — pre-trained Fp, every layer trained ("unfrozen" in Table 4);
* ``scratch``  — the same architecture with a freshly initialised Fp, every layer trained
  (the supervised baseline [37]).

Optimisation follows §4.1: Adam, learning rate 0.003, multiplied by 0.1 every 20 epochs
(``step_epochs``/``gamma``). Cross-entropy over all parts; at evaluation the prediction of a
point is the arg-max over the parts of its object's category only (the benchmark protocol).
The number of epochs is not given in the paper; it is a setting, like every other choice of
the protocol (:class:`~xmodal.eval.config.PartSegConfig`, ``partseg.*`` of an evaluation). The
val split is never used to choose anything (it can be logged with ``val_every``).

Metrics (:func:`partseg_metrics`, the standard ShapeNet-Part definitions): for each shape, the
IoU of every part of *its* category (a part absent from both the prediction and the ground
truth counts as IoU 1), averaged over those parts; *instance mIoU* is the mean over shapes,
*class mIoU* the mean over the categories present of the mean over that category's shapes;
*overall accuracy* is the fraction of points labelled correctly. For data sampled from
meshes (Labeled PSB, ``builtin:shapes``) also the mesh-segmentation literature's *face
labelling accuracy* (:func:`face_labelling_accuracy`): each face takes the prediction of the
sampled point nearest its centroid, and the correctly labelled fraction of the surface area is
averaged over the test shapes.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from scipy.spatial import cKDTree

from xmodal.data.shapenetpart import PartSegSplit, ShapeFaces, load_partseg, stratified_subset
from xmodal.errors import PartSegError
from xmodal.eval.config import PARTSEG_FRACTIONS as FRACTIONS
from xmodal.eval.config import PARTSEG_SETTINGS as SETTINGS
from xmodal.eval.config import PartSegConfig
from xmodal.eval.context import TEST, TRAIN
from xmodal.utils.device import default_device

__all__ = [
    "SETTINGS",
    "METRICS",
    "FRACTIONS",
    "shape_ious",
    "partseg_metrics",
    "face_labelling_accuracy",
    "mean_face_accuracy",
    "short_categories",
    "restrict_predictions",
    "reinitialize",
    "train_partseg",
    "predict_partseg",
    "evaluate_partseg",
    "run_partseg",
    "PartSegResume",
    "partseg_task",
    "percent_key",
]

log = logging.getLogger(__name__)

#: metric keys of each setting and fraction (``face_accuracy`` only for data sampled from meshes)
METRICS = ("oa", "class_miou", "instance_miou", "face_accuracy")
_PRETRAINED_SETTINGS = ("frozen", "finetune")


# ---------------------------------------------------------------------------------------
# metrics (numpy)
# ---------------------------------------------------------------------------------------


def _check_arrays(pred, seg, category):
    pred = np.asarray(pred)
    seg = np.asarray(seg)
    category = np.asarray(category).reshape(-1)
    if pred.shape != seg.shape or pred.ndim != 2:
        raise ValueError(f"pred and seg must both be (n, N), got {pred.shape} and {seg.shape}")
    if category.shape[0] != pred.shape[0]:
        raise ValueError(f"category has {category.shape[0]} entries for {pred.shape[0]} shapes")
    return pred, seg, category


def shape_ious(pred: np.ndarray, seg: np.ndarray, category: np.ndarray, category_parts: Sequence[Sequence[int]]) -> np.ndarray:
    """Mean part IoU of every shape: ``(n,)`` float64.

    pred, seg: (n, N) global part ids; category: (n,). For shape ``i`` the IoU is taken over
    the parts of ``category_parts[category[i]]``; a part absent from both prediction and
    ground truth has IoU 1.
    """
    pred, seg, category = _check_arrays(pred, seg, category)
    out = np.zeros(pred.shape[0], dtype=np.float64)
    for c in np.unique(category):
        if not 0 <= c < len(category_parts):
            raise ValueError(f"category id {c} has no entry in category_parts ({len(category_parts)} categories)")
        rows = np.flatnonzero(category == c)
        p, g = pred[rows], seg[rows]
        ious = []
        for part in category_parts[int(c)]:
            pp, gg = p == part, g == part
            inter = np.count_nonzero(pp & gg, axis=1)
            union = np.count_nonzero(pp | gg, axis=1)
            ious.append(np.where(union == 0, 1.0, inter / np.maximum(union, 1)))
        out[rows] = np.mean(ious, axis=0)
    return out


def partseg_metrics(
    pred: np.ndarray,
    seg: np.ndarray,
    category: np.ndarray,
    category_parts: Sequence[Sequence[int]],
    *,
    category_names: Optional[Sequence[str]] = None,
) -> dict:
    """ShapeNet-Part metrics of predictions ``pred`` (n, N) against ``seg`` (n, N).

    Returns ``{"oa", "class_miou", "instance_miou", "per_category": {name: mIoU}}`` (floats in
    [0, 1]; ``per_category`` covers the categories present, keyed by ``category_names`` or the
    category index as a string).
    """
    pred, seg, category = _check_arrays(pred, seg, category)
    if pred.shape[0] == 0:
        raise PartSegError("no shapes to evaluate (the split is empty)")
    ious = shape_ious(pred, seg, category, category_parts)
    per_cat = {}
    for c in np.unique(category):
        name = str(category_names[int(c)]) if category_names is not None else str(int(c))
        per_cat[name] = float(ious[category == c].mean())
    return {
        "oa": float(np.mean(pred == seg)),
        "class_miou": float(np.mean(list(per_cat.values()))),
        "instance_miou": float(ious.mean()),
        "per_category": per_cat,
    }


def face_labelling_accuracy(
    points: np.ndarray, pred: np.ndarray, centroids: np.ndarray, areas: np.ndarray, face_labels: np.ndarray
) -> float:
    """Area-weighted face labelling accuracy of one shape from its point predictions.

    Each face takes the prediction of the point nearest its centroid (Euclidean); the result
    is ``sum(area_f * [pred_f == label_f]) / sum(area_f)``.

    Args:
        points: (N, 3) the sampled points.
        pred: (N,) predicted part of each point.
        centroids: (F, 3) face centroids, in the frame of ``points``.
        areas: (F,) face areas (any common unit), not all zero.
        face_labels: (F,) true part of each face.

    Returns:
        The accuracy in [0, 1].
    """
    points = np.asarray(points, dtype=np.float64)
    pred = np.asarray(pred).reshape(-1)
    centroids = np.asarray(centroids, dtype=np.float64)
    areas = np.asarray(areas, dtype=np.float64).reshape(-1)
    face_labels = np.asarray(face_labels).reshape(-1)
    if points.ndim != 2 or points.shape[1] != 3 or pred.shape[0] != points.shape[0] or points.shape[0] == 0:
        raise ValueError(f"points must be (N, 3) with N >= 1 and pred (N,), got {points.shape} and {pred.shape}")
    if centroids.ndim != 2 or centroids.shape[1] != 3 or areas.shape[0] != centroids.shape[0] \
            or face_labels.shape[0] != centroids.shape[0]:
        raise ValueError(
            f"centroids (F, 3), areas (F,) and face_labels (F,) must agree, got {centroids.shape}, "
            f"{areas.shape}, {face_labels.shape}"
        )
    total = areas.sum()
    if not total > 0:
        raise ValueError("the faces have no area")
    _, nearest = cKDTree(points).query(centroids, k=1)
    return float(areas[pred[nearest] == face_labels].sum() / total)


def mean_face_accuracy(points: np.ndarray, pred: np.ndarray, faces: Sequence[ShapeFaces]) -> float:
    """:func:`face_labelling_accuracy` averaged over shapes: points (n, N, 3), pred (n, N), ``faces`` (n,)."""
    if len(faces) != len(pred) or len(faces) == 0:
        raise ValueError(f"need one ShapeFaces per shape: {len(faces)} for {len(pred)} shapes")
    return float(np.mean([
        face_labelling_accuracy(p, q, f.centroids, f.areas, f.labels) for p, q, f in zip(points, pred, faces)
    ]))


def short_categories(category: np.ndarray, fraction: float) -> np.ndarray:
    """Categories that ``fraction`` would leave without a training shape (``round(fraction * n_c) == 0``);
    :func:`~xmodal.data.shapenetpart.stratified_subset` gives each of them one. category: (n,) ->
    sorted (k,) int64."""
    cats, counts = np.unique(np.asarray(category).reshape(-1), return_counts=True)
    return cats[np.round(fraction * counts) < 1].astype(np.int64)


def restrict_predictions(logits: np.ndarray, category: np.ndarray, category_parts: Sequence[Sequence[int]]) -> np.ndarray:
    """Arg-max over the parts of each shape's own category: logits (n, P, N) -> pred (n, N) int64."""
    logits = np.asarray(logits)
    category = np.asarray(category).reshape(-1)
    if logits.ndim != 3 or logits.shape[0] != category.shape[0]:
        raise ValueError(f"logits must be (n, P, N) with n = {category.shape[0]}, got {logits.shape}")
    mask = np.zeros((len(category_parts), logits.shape[1]), dtype=bool)
    for c, parts in enumerate(category_parts):
        mask[c, list(parts)] = True
    masked = np.where(mask[category][:, :, None], logits, -np.inf)
    return masked.argmax(axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------
# training / inference (torch)
# ---------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def _fork_rng(device):
    """A context that restores the global torch RNG(s) afterwards (CPU + the CUDA device used)."""
    torch = _torch()
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def reinitialize(module, *, seed: int = 0):
    """A copy of ``module`` with every parameter and buffer freshly initialised (seeded).

    Calls ``reset_parameters`` of every sub-module that has one (PyTorch's own initialisers,
    which also reset BatchNorm statistics); raises when a parameter is not covered by one.
    """
    torch = _torch()
    fresh = copy.deepcopy(module)
    covered = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
                covered.update(id(p) for p in m.parameters())
    missing = [n for n, p in fresh.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"cannot re-initialise parameters {missing[:5]} (no reset_parameters); pass encoder_factory")
    return fresh


def _augment(points, gen):
    """DGCNN's ShapeNet-Part augmentation: anisotropic scaling U(2/3, 3/2) and translation U(-0.2, 0.2)."""
    torch = _torch()
    b = points.shape[0]
    scale = torch.empty(b, 1, 3).uniform_(2.0 / 3.0, 1.5, generator=gen).to(points.device)
    shift = torch.empty(b, 1, 3).uniform_(-0.2, 0.2, generator=gen).to(points.device)
    return points * scale + shift


def _category_mask(category_parts, num_parts: int, device):
    torch = _torch()
    mask = torch.zeros(len(category_parts), num_parts, dtype=torch.bool)
    for c, parts in enumerate(category_parts):
        mask[c, list(parts)] = True
    return mask.to(device)


def predict_partseg(model, split: PartSegSplit, category_parts: Sequence[Sequence[int]], *, batch_size: int = 32, device=None) -> np.ndarray:
    """Predicted global part ids ``(n, N)`` int64 of ``split`` (arg-max over each shape's
    category parts), with ``model`` in eval mode."""
    torch = _torch()
    device = default_device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    mask = None
    out = np.empty((split.n, split.num_points), dtype=np.int64)
    try:
        with torch.no_grad():
            for a in range(0, split.n, batch_size):
                pts = torch.from_numpy(split.points[a : a + batch_size]).to(device)
                cat = torch.from_numpy(split.category[a : a + batch_size]).to(device)
                logits = model(pts, cat)  # (B, P, N)
                if mask is None:
                    mask = _category_mask(category_parts, logits.shape[1], device)
                logits = logits.masked_fill(~mask[cat].unsqueeze(-1), float("-inf"))
                out[a : a + batch_size] = logits.argmax(dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def evaluate_partseg(model, split: PartSegSplit, category_parts, *, category_names=None, batch_size: int = 32, device=None) -> dict:
    """:func:`partseg_metrics` of ``model`` on ``split``, plus ``face_accuracy``
    (:func:`mean_face_accuracy`) when the split keeps its meshes' faces."""
    pred = predict_partseg(model, split, category_parts, batch_size=batch_size, device=device)
    metrics = partseg_metrics(pred, split.seg, split.category, category_parts, category_names=category_names)
    if split.faces is not None:
        metrics["face_accuracy"] = mean_face_accuracy(split.points, pred, split.faces)
    return metrics


def _epoch_batches(n: int, batch_size: int, gen) -> list:
    """Shuffled index batches; a trailing batch of one shape is dropped (BatchNorm needs 2)."""
    torch = _torch()
    if n == 1:
        return [torch.zeros(2, dtype=torch.long)]  # a single shape: a batch of it twice
    perm = torch.randperm(n, generator=gen)
    batches = list(perm.split(batch_size))
    if batches[-1].numel() == 1:  # n >= 2, so there is an earlier batch
        batches.pop()
    return batches


def _train_epoch(model, opt, data: tuple, cfg: PartSegConfig, gen) -> dict:
    """One epoch over ``data`` = (points, seg, category) tensors; ``{"loss", "acc"}`` averaged over points."""
    torch = _torch()
    import torch.nn.functional as F

    points, seg, cat = data
    tot_loss = tot_correct = tot_points = 0.0
    for idx in _epoch_batches(points.shape[0], cfg.batch_size, gen):
        idx = idx.to(points.device)
        pts = points[idx]
        if cfg.augment:
            pts = _augment(pts, gen)
        logits = model(pts, cat[idx])
        target = seg[idx]
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            tot_loss += float(loss) * target.numel()
            tot_correct += float((logits.argmax(1) == target).sum())
            tot_points += target.numel()
    return {"loss": tot_loss / tot_points, "acc": tot_correct / tot_points}


def train_partseg(
    model,
    train: PartSegSplit,
    cfg: Optional[PartSegConfig] = None,
    *,
    seed: int = 0,
    device=None,
    progress: bool = True,
    desc: str = "partseg",
    log_path: Optional[str | os.PathLike] = None,
    val: Optional[PartSegSplit] = None,
    category_parts: Optional[Sequence[Sequence[int]]] = None,
) -> list[dict]:
    """Train ``model`` (a :class:`~xmodal.models.partseg.PartSegNet`) on ``train``.

    ``cfg`` (default :class:`~xmodal.eval.config.PartSegConfig`) gives the optimisation: Adam on
    the parameters that require gradients, StepLR(``step_epochs``, ``gamma``) per epoch,
    point-wise cross-entropy, ``epochs`` epochs of ``batch_size``. Shuffling and augmentation
    are seeded; dropout draws from the global torch RNG (callers fork and seed it, as
    :func:`run_partseg` does). With ``val`` and ``cfg.val_every > 0`` the val metrics are
    logged every ``val_every`` epochs (logging only). Returns the per-epoch records (also
    appended to ``log_path``, a JSON-lines file).
    """
    torch = _torch()
    from tqdm.auto import tqdm

    from xmodal.utils.io import append_jsonl

    cfg = PartSegConfig() if cfg is None else cfg
    if train.n == 0:
        raise PartSegError("the training split is empty")
    device = default_device(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(cfg.step_epochs)), gamma=cfg.gamma)
    data = tuple(torch.from_numpy(a).to(device) for a in (train.points, train.seg, train.category))
    gen = torch.Generator().manual_seed(int(seed))
    history = []
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        t0 = time.perf_counter()
        rec = {"epoch": epoch + 1, **_train_epoch(model, opt, data, cfg, gen), "lr": opt.param_groups[0]["lr"],
               "n_train": train.n, "time": time.perf_counter() - t0}
        sched.step()
        if val is not None and val.n and cfg.val_every > 0 and (epoch + 1) % cfg.val_every == 0:
            if category_parts is None:
                raise ValueError("val logging needs category_parts")
            m = evaluate_partseg(model, val, category_parts, batch_size=max(cfg.batch_size, 16), device=device)
            rec.update({f"val_{k}": v for k, v in m.items() if k != "per_category"})
        history.append(rec)
        if log_path is not None:
            append_jsonl(log_path, rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}")
    bar.close()
    model.eval()
    return history


# ---------------------------------------------------------------------------------------
# the Table 4 protocol
# ---------------------------------------------------------------------------------------


def percent_key(fraction: float) -> str:
    """``0.02 -> "2"``, ``0.2 -> "20"``, ``1.0 -> "100"``, ``0.025 -> "2.5"``."""
    return f"{round(float(fraction) * 100, 6):g}"


def _pretrained_encoder(run: Any):
    """(point encoder or None, LoadedRun or None) of ``run``: None, a point encoder module,
    a :class:`xmodal.api.LoadedRun`, or a run folder (read with :func:`xmodal.api.load_run`)."""
    from xmodal.api import LoadedRun, load_run  # the API layer loads torch and the models

    torch = _torch()
    if run is None:
        return None, None
    if isinstance(run, torch.nn.Module):
        return run, None
    if isinstance(run, LoadedRun):
        return run.point_encoder, run
    if isinstance(run, (str, os.PathLike)):
        loaded = load_run(run, device="cpu")
        return loaded.point_encoder, loaded
    raise TypeError(f"run must be a run directory, a LoadedRun, a point encoder module or None, not {type(run).__name__}")


def _scratch_encoder(pretrained, loaded, encoder_factory, seed: int):
    """A freshly initialised Fp for the ``scratch`` setting (seeded): from ``encoder_factory``,
    else the run's own architecture, else ``pretrained`` re-initialised, else the default DGCNN."""
    from xmodal.models.registry import create_point_encoder

    torch = _torch()
    if encoder_factory is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return encoder_factory()
    if loaded is not None:
        return loaded.at_random_init(seed=seed, device="cpu").point_encoder
    if pretrained is not None:
        return reinitialize(pretrained, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_point_encoder("dgcnn")


class _Encoders:
    """Where each setting's Fp comes from: a copy of the pre-trained one, or a fresh one."""

    def __init__(self, run: Any, encoder_factory: Optional[Callable[[], Any]]):
        self.pretrained, self.loaded = _pretrained_encoder(run)
        self.factory = encoder_factory
        self.state = None
        if self.pretrained is not None:
            self.state = {k: v.detach().cpu().clone() for k, v in self.pretrained.state_dict().items()}
        # an Fp pre-trained with frozen BatchNorm statistics (finetune_point_bn decides how it is fine-tuned)
        self.held_bn = self.loaded is not None and self.loaded.config.model.freeze_point_bn

    def runnable(self, settings: Sequence[str]) -> list[str]:
        """``settings`` less those that need a pre-trained Fp when there is none."""
        if self.pretrained is not None:
            return list(settings)
        skipped = [s for s in settings if s in _PRETRAINED_SETTINGS]
        if skipped:
            log.info("no pre-trained run: skipping part-segmentation settings %s", skipped)
        return [s for s in settings if s not in _PRETRAINED_SETTINGS]

    def for_setting(self, setting: str, seed: int):
        """A fresh Fp for ``setting``: the scratch encoder, or a copy of the pre-trained one."""
        if setting == "scratch":
            return _scratch_encoder(self.pretrained, self.loaded, self.factory, seed)
        encoder = copy.deepcopy(self.pretrained).cpu()
        encoder.load_state_dict(self.state)
        return encoder


def _subset_record(pct: str, fraction: float, train_all: PartSegSplit, n_train: int, category_names) -> dict:
    """``partseg.<pct>.n_train`` and ``partseg.<pct>.one_per_category`` of one training fraction."""
    short = short_categories(train_all.category, fraction)
    if short.size:
        log.warning(
            "partseg %s%%: the fraction would leave %d categories without a labelled shape (%s); "
            "each takes one shape (%d training shapes)",
            pct, short.size, ", ".join(str(category_names[c]) for c in short[:5]) + (", ..." if short.size > 5 else ""),
            n_train,
        )
    return {f"partseg.{pct}.n_train": int(n_train), f"partseg.{pct}.one_per_category": bool(short.size)}


class _Table4:
    """One Table 4 protocol run: trains and tests one setting on one training subset at a time."""

    def __init__(self, cfg: PartSegConfig, data, encoders: _Encoders, *, seed: int, device, progress: bool,
                 log_dir: Optional[Path]):
        self.cfg, self.data, self.encoders = cfg, data, encoders
        self.seed, self.device, self.progress, self.log_dir = seed, device, progress, log_dir

    def _log_path(self, setting: str, pct: str) -> Optional[Path]:
        if self.log_dir is None:
            return None
        path = self.log_dir / f"partseg_{setting}_{pct}.jsonl"
        path.unlink(missing_ok=True)
        return path

    def run(self, setting: str, pct: str, sub: PartSegSplit) -> dict:
        """Metrics of ``setting`` trained on ``sub`` and tested on the test split."""
        torch = _torch()
        from xmodal.models.partseg import PartSegNet
        from xmodal.utils.io import append_jsonl

        cfg, data, seed = self.cfg, self.data, self.seed
        log_path = self._log_path(setting, pct)
        with _fork_rng(self.device):
            torch.manual_seed(seed)
            encoder = self.encoders.for_setting(setting, seed)
            torch.manual_seed(seed)
            model = PartSegNet(
                encoder, data.num_parts, data.num_categories,
                use_category=cfg.use_category, dropout=cfg.dropout, freeze_encoder=(setting == "frozen"),
                freeze_encoder_bn=(setting == "finetune" and self.encoders.held_bn
                                   and cfg.finetune_point_bn == "pretraining"),
            )
            train_partseg(
                model, sub, cfg, seed=seed, device=self.device, progress=self.progress,
                desc=f"partseg {setting} {pct}%", log_path=log_path, val=data.splits.get("val"),
                category_parts=data.category_parts,
            )
        test = data.split("test")
        metrics = evaluate_partseg(
            model, test, data.category_parts, category_names=data.category_names,
            batch_size=cfg.eval_batch_size, device=self.device,
        )
        if log_path is not None:
            append_jsonl(log_path, {"split": "test", "n_test": test.n, **metrics})
        log.info(
            "partseg %s %s%%: oa %.4f class mIoU %.4f instance mIoU %.4f (train %d, test %d)",
            setting, pct, metrics["oa"], metrics["class_miou"], metrics["instance_miou"], sub.n, test.n,
        )
        return metrics


@dataclass
class PartSegResume:
    """Running Table 4 one cell (a setting trained on a fraction) at a time, resumably."""

    #: metrics (``METRICS``) of the cells finished earlier, by ``"<setting>/<percent>"``; not run again
    done: dict = field(default_factory=dict)
    #: called before each cell still to run (may raise to stop between cells)
    before_cell: Optional[Callable[[], None]] = None
    #: called after each cell run with its ``"<setting>/<percent>"`` and metrics
    after_cell: Optional[Callable[[str, dict], None]] = None


def _cell(table: "_Table4", setting: str, pct: str, sub: PartSegSplit, resume: Optional[PartSegResume]) -> dict:
    """The metrics of one cell: from ``resume.done``, or trained and tested now."""
    key = f"{setting}/{pct}"
    if resume is not None and key in resume.done:
        log.info("partseg %s%%: %s already evaluated; not trained again", pct, setting)
        return dict(resume.done[key])
    if resume is not None and resume.before_cell is not None:
        resume.before_cell()
    metrics = table.run(setting, pct, sub)
    metrics = {k: float(metrics[k]) for k in METRICS if k in metrics}
    if resume is not None and resume.after_cell is not None:
        resume.after_cell(key, metrics)
    return metrics


def run_partseg(
    cfg: Optional[PartSegConfig],
    run: Any,
    data: Any,
    *,
    seed: int = 0,
    device=None,
    progress: bool = True,
    log_dir: Optional[str | os.PathLike] = None,
    encoder_factory: Optional[Callable[[], Any]] = None,
    resume: Optional[PartSegResume] = None,
) -> dict:
    """Table 4: train and test :class:`~xmodal.models.partseg.PartSegNet` per setting and fraction.

    Args:
        cfg: the protocol (:class:`~xmodal.eval.config.PartSegConfig`; None: its defaults):
            settings (subset of ``("frozen", "finetune", "scratch")``), fractions of the train
            split (seeded, stratified by category; the same subset for every setting; a category
            the fraction would leave without a shape takes one, :func:`short_categories`, and the
            results say so), the optimisation (§4.1 defaults), ``num_points`` (resample every
            shape to this many points, seeded; None keeps the data's).
        run: a run directory (pre-trained Fp via :func:`xmodal.api.load_run`), a ``LoadedRun``,
            a point-encoder module, or None (then only ``scratch`` runs; the others are skipped).
        data: anything :func:`xmodal.data.shapenetpart.load_partseg` accepts; needs ``train``
            and ``test`` splits.
        seed: seeds the subsets, the head and scratch-encoder initialisation, shuffling,
            augmentation and dropout.
        device: torch device (default: cuda when available).
        progress: progress bars.
        log_dir: when given, per-epoch records go to ``partseg_<setting>_<percent>.jsonl``,
            followed by one final ``{"split": "test", ...}`` record with per-category mIoU.
        encoder_factory: no-argument callable building a fresh encoder for ``scratch``
            (default: :meth:`xmodal.api.LoadedRun.at_random_init`, the run's architecture, else a
            re-initialised copy of the pre-trained encoder, else the default DGCNN).
        resume: cells finished earlier (not trained again) and hooks around each cell
            (:class:`PartSegResume`); the ``partseg`` task uses it to resume a stopped evaluation.

    Returns:
        ``{"partseg.<setting>.<percent>.<metric>": float}`` with metric in ``oa``,
        ``class_miou``, ``instance_miou`` and, for data sampled from meshes, ``face_accuracy``
        (fractions in [0, 1]) and percent ``2``, ``20``, ``100``; per percent also
        ``partseg.<percent>.n_train`` (int, training shapes) and
        ``partseg.<percent>.one_per_category`` (bool, True when a category took one shape
        because the fraction would have left it none).
    """
    cfg = PartSegConfig() if cfg is None else cfg
    cfg.validate()
    device = default_device(device)
    data = load_partseg(data, num_points=cfg.num_points, seed=seed)
    train_all = data.split("train")
    data.split("test")  # both splits are needed: fail before any training
    encoders = _Encoders(run, encoder_factory)
    settings = encoders.runnable(cfg.settings)
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    table = _Table4(cfg, data, encoders, seed=seed, device=device, progress=progress,
                    log_dir=None if log_dir is None else Path(log_dir))
    results: dict[str, Any] = {}
    for fraction in cfg.fractions:
        pct = percent_key(fraction)
        sub = train_all.subset(stratified_subset(train_all.category, fraction, seed=seed))
        results.update(_subset_record(pct, fraction, train_all, sub.n, data.category_names))
        for setting in settings:
            metrics = _cell(table, setting, pct, sub, resume)
            results.update({f"partseg.{setting}.{pct}.{k}": metrics[k] for k in METRICS if k in metrics})
    return results


def partseg_task(ctx) -> None:
    """The ``partseg`` task (Table 4) on the run: :func:`run_partseg` with ``cfg.partseg`` on
    ``cfg.partseg_data``, or on the dataset itself when it has part labels; per-epoch logs in
    ``OUT/partseg/``. Each finished cell is saved (``ctx.save_partial``) and the job may stop
    between cells (``ctx.check_stop``); a stopped evaluation resumes at the first cell not done."""
    target = ctx.cfg.partseg_data
    if target is None:
        store = ctx.store
        has_parts = store.part_names is not None and all(
            store.split(s).has_point_labels for s in (TRAIN, TEST) if s in store.splits
        )
        if not has_parts:
            ctx.skip("partseg", f"{ctx.cfg.data} has no part labels; pass partseg_data (e.g. a ShapeNet-Part folder)")
            return
        target = store
    cells = dict(ctx.partial.get("cells") or {})

    def after_cell(key: str, metrics: dict) -> None:
        cells[key] = metrics
        ctx.save_partial({"cells": cells})

    resume = PartSegResume(done=dict(cells), before_cell=ctx.check_stop, after_cell=after_cell)
    res = run_partseg(ctx.cfg.partseg, ctx.loaded, target, seed=ctx.seed, device=ctx.device, progress=ctx.progress,
                      log_dir=ctx.out / "partseg", resume=resume)
    for k, v in res.items():
        ctx.put(k, v)
