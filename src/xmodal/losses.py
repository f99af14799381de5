"""Losses of the self-supervised objective (paper §3.3, Algorithm 1).

* cross-view: the triplet loss of Eq. (1) on image features of two views of one object
  (anchor, positive) and one view of another object (negative);
* cross-modality: Eq. (2), the binary cross-entropy of the pair classifier Ff summed over
  the three (image, point cloud) pairs of a sample;
* the combination ``L_self = L_triplet + beta * L_cross`` of Eq. (3), averaged over the batch;
* beyond the paper, two batch-level forms of the cross-modality loss, where Ff scores *every*
  (image, cloud) pair of a batch rather than the three pairs of each sample:
  :func:`batch_cross_modal_loss` (softmax cross-entropy over the batch, the InfoNCE form of
  van den Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018, with
  Ff's log-odds as the critic) and :func:`batch_pair_bce` (binary cross-entropy on every pair,
  positives and negatives weighted equally);
* beyond the paper, :func:`channel_decorrelation`: the mean squared correlation between
  different channels of a set of feature vectors (the redundancy-reduction term of Barlow Twins,
  Zbontar et al. 2021, and VICReg's covariance term, Bardes et al. 2022, on one set of features).

Plain functions carry the maths; :class:`TripletLoss` and :class:`CrossModalLoss` wrap them as
modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "triplet_loss",
    "cross_modal_loss",
    "pair_accuracy",
    "self_supervised_loss",
    "pair_scores",
    "batch_cross_modal_loss",
    "batch_pair_bce",
    "channel_decorrelation",
    "TripletLoss",
    "CrossModalLoss",
    "BatchCrossModalLoss",
    "ChannelDecorrelationLoss",
]

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0,
                 reduction: str = "mean") -> Tensor:
    """Triplet loss with squared Euclidean distances (Eq. 1).

    ``L = max(||a - p||^2 - ||a - n||^2 + margin, 0)`` per sample. The loss comes from
    FaceNet [43]; like FaceNet, the paper writes the *squared* norm, so this is not
    :func:`torch.nn.functional.triplet_margin_loss` (which uses the plain distance).

    Args:
        anchor, positive, negative: (B, D) features.
        margin: the margin ``alpha``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (returns (B,)).

    Returns:
        scalar, or (B,) with ``reduction="none"``.
    """
    if anchor.ndim != 2 or anchor.shape != positive.shape or anchor.shape != negative.shape:
        raise ValueError(
            "anchor, positive and negative must all be (B, D); got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    d_pos = (anchor - positive).square().sum(dim=1)
    d_neg = (anchor - negative).square().sum(dim=1)
    return _reduce(F.relu(d_pos - d_neg + margin), reduction)


def _check_pairs(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 3 or logits.shape[-1] != 2:
        raise ValueError(f"logits must be (B, P, 2), got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be (B, P) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")


def cross_modal_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-modality loss (Eq. 2): per sample, the SUM over its (image, point cloud) pairs of
    the 2-way cross-entropy of Ff; then reduced over the batch.

    Args:
        logits: (B, 3, 2) Ff outputs for the pairs (img_j, p), j = 1..3 (any P works).
        labels: (B, 3) int in {0, 1}; 1 = image and point cloud come from the same object.
        reduction: ``"mean"`` over B (default, Algorithm 1), ``"sum"`` or ``"none"`` ((B,)).
    """
    _check_pairs(logits, labels)
    b, p, _ = logits.shape
    ce = F.cross_entropy(logits.reshape(b * p, 2), labels.reshape(b * p).long(), reduction="none")
    return _reduce(ce.view(b, p).sum(dim=1), reduction)


@torch.no_grad()
def pair_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of pairs whose argmax prediction equals the label. logits (B, P, 2) or (M, 2);
    labels (B, P) or (M,). Returns a 0-d float tensor."""
    if logits.shape[:-1] != labels.shape or logits.shape[-1] != 2:
        raise ValueError(f"logits (..., 2) and labels (...) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}")
    return (logits.argmax(dim=-1) == labels.long()).float().mean()


def self_supervised_loss(f1: Tensor, f2: Tensor, f3: Tensor, logits: Tensor, labels: Tensor, *,
                         margin: float, beta: float, use_cross_view: bool = True,
                         use_cross_modal: bool = True) -> dict[str, Tensor]:
    """``L = L_triplet + beta * L_cross`` (Eq. 3, Algorithm 1), mean over the batch.

    Args:
        f1, f2, f3: (B, D) image features of view 1, view 2 (same object) and the negative image.
        logits: (B, 3, 2) Ff outputs for (img_j, p); labels: (B, 3).
        margin: triplet margin ``alpha``; beta: weight of the cross-modality term.
        use_cross_view / use_cross_modal: ablation switches ("CM", "CV", "CM-CV" of the paper).
            A disabled term is still reported (detached) but does not enter ``loss``.

    Returns:
        ``{"loss", "triplet", "cross"}`` scalars; only ``loss`` carries gradient.
    """
    if not (use_cross_view or use_cross_modal):
        raise ValueError("at least one of use_cross_view / use_cross_modal must be enabled")
    trip = triplet_loss(f1, f2, f3, margin=margin)
    cross = cross_modal_loss(logits, labels)
    loss = trip.new_zeros(())
    if use_cross_view:
        loss = loss + trip
    if use_cross_modal:
        loss = loss + beta * cross
    return {"loss": loss, "triplet": trip.detach(), "cross": cross.detach()}


def pair_scores(logits: Tensor) -> Tensor:
    """Ff's log-odds of "same object" from its two logits: ``(..., 2) -> (...)``.

    ``softmax(l)[1] = sigmoid(l1 - l0)``, so the 2-way cross-entropy of Eq. 2 is the binary
    cross-entropy of this score.
    """
    if logits.shape[-1] != 2:
        raise ValueError(f"logits must end in 2 classes, got {tuple(logits.shape)}")
    return logits[..., 1] - logits[..., 0]


def _check_matrix(scores: Tensor, positive: Tensor) -> None:
    if scores.ndim != 2 or positive.shape != scores.shape:
        raise ValueError(
            f"scores and positive must both be (M, B); got {tuple(scores.shape)} and {tuple(positive.shape)}"
        )
    if positive.dtype != torch.bool:
        raise ValueError(f"positive must be a bool mask, got {positive.dtype}")


def _multi_positive_nce(scores: Tensor, positive: Tensor) -> Tensor:
    """Per row: ``-log(sum_{pos} softmax(row))``, for rows with at least one positive: (R,)."""
    has_pos = positive.any(dim=1)
    scores, positive = scores[has_pos], positive[has_pos]
    pos_scores = scores.masked_fill(~positive, float("-inf"))
    return torch.logsumexp(scores, dim=1) - torch.logsumexp(pos_scores, dim=1)


def batch_cross_modal_loss(scores: Tensor, positive: Tensor) -> Tensor:
    """Cross-modality loss over every (image, cloud) pair of a batch (InfoNCE form).

    Each cloud must pick the images of its object among all ``M`` images of the batch, and
    each image its object's cloud among the ``B`` clouds: a softmax cross-entropy per cloud
    (over the images; several positives are summed inside the log, "multi-positive" NCE) and
    per image (over the clouds), each averaged over its anchors, then the two directions
    averaged. Images whose object has no cloud in the batch (a negative image of the paper's
    sampling) serve as negatives only.

    Args:
        scores: (M, B) Ff's log-odds (:func:`pair_scores`) for image ``m`` and cloud ``b``.
        positive: (M, B) bool, image ``m`` shows the object of cloud ``b``; every cloud needs
            at least one positive image.

    Returns:
        scalar.
    """
    _check_matrix(scores, positive)
    if not bool(positive.any(dim=0).all()):
        raise ValueError("every cloud needs at least one image of its object in the batch")
    per_cloud = _multi_positive_nce(scores.t(), positive.t())
    per_image = _multi_positive_nce(scores, positive)
    return 0.5 * (per_cloud.mean() + per_image.mean())


def batch_pair_bce(scores: Tensor, positive: Tensor) -> Tensor:
    """Binary cross-entropy of Ff on every (image, cloud) pair, classes weighted equally.

    ``0.5 * (mean over positive pairs of -log sigmoid(s) + mean over negative pairs of
    -log(1 - sigmoid(s)))``: each positive faces many negatives (``B - 1`` clouds per image)
    without the negatives swamping the loss.

    Args:
        scores: (M, B) Ff's log-odds; positive: (M, B) bool (at least one of each class).

    Returns:
        scalar.
    """
    _check_matrix(scores, positive)
    if bool(positive.all()) or not bool(positive.any()):
        raise ValueError("batch_pair_bce needs both positive and negative pairs")
    pos = F.softplus(-scores[positive]).mean()
    neg = F.softplus(scores[~positive]).mean()
    return 0.5 * (pos + neg)


def channel_decorrelation(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean squared correlation between different channels of ``x``: 0 when every pair of
    channels is uncorrelated over the rows, 1 when all channels are perfectly (anti-)correlated.

    Each channel is standardised over the rows (``(x - mean) / sqrt(var + eps)``, the biased
    variance), the correlation matrix is ``z^T z / M``, and its ``D (D - 1)`` off-diagonal entries
    are squared and averaged. A constant channel has correlation 0 with every other one, so the
    term alone would slightly reward dead channels; it is meant beside a loss that uses them.

    Args:
        x: (M, D) features, M >= 2 rows (samples, or points of several clouds) and D >= 2 channels.
        eps: added to each channel's variance.

    Returns:
        scalar (float32 whatever ``x``'s dtype).
    """
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"x must be (M, D) with M >= 2 and D >= 2, got {tuple(x.shape)}")
    with torch.autocast(x.device.type, enabled=False):  # float32 even inside an autocast region
        x = x.float()
        z = x - x.mean(dim=0)
        z = z * torch.rsqrt(z.pow(2).mean(dim=0) + eps)
        corr = z.t() @ z / x.shape[0]
        d = x.shape[1]
        # the off-diagonal entries themselves (not the total minus the diagonal, which loses digits)
        off = corr.flatten()[:-1].view(d - 1, d + 1)[:, 1:]
        return off.pow(2).mean()


class TripletLoss(nn.Module):
    """Cross-view triplet loss of the paper (Eq. 1, squared Euclidean; FaceNet [43]).

    ``forward(anchor (B,D), positive (B,D), negative (B,D)) -> scalar`` (see :func:`triplet_loss`).
    """

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.margin, self.reduction = float(margin), reduction

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        return triplet_loss(anchor, positive, negative, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class CrossModalLoss(nn.Module):
    """Cross-modality correspondence loss of the paper (Eq. 2).

    ``forward(logits (B,3,2), labels (B,3)) -> scalar`` (see :func:`cross_modal_loss`).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return cross_modal_loss(logits, labels, self.reduction)


class BatchCrossModalLoss(nn.Module):
    """Cross-modality loss over every (image, cloud) pair of a batch (beyond the paper).

    ``forward(scores (M, B), positive (M, B) bool) -> scalar`` (see
    :func:`batch_cross_modal_loss`; InfoNCE, van den Oord et al. 2018).
    """

    def forward(self, scores: Tensor, positive: Tensor) -> Tensor:
        return batch_cross_modal_loss(scores, positive)


class ChannelDecorrelationLoss(nn.Module):
    """Mean squared correlation between different channels (beyond the paper; the
    redundancy-reduction term of Barlow Twins, Zbontar et al. 2021).

    ``forward(x (M, D)) -> scalar`` (see :func:`channel_decorrelation`).
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        return channel_decorrelation(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
