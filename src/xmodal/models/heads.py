"""Small heads on top of the encoders.

* :class:`PairClassifier` – Ff of the paper (§3.2): a two-layer MLP on the concatenated image
  and point-cloud features predicting whether both come from the same object.

The part-segmentation head lives in :mod:`xmodal.models.partseg` (``PartSegNet``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PairClassifier", "PAIR_INPUT_NORMS"]

#: ways of normalising each encoder's feature before Ff concatenates them (see PairClassifier)
PAIR_INPUT_NORMS = ("none", "batch", "layer")


class PairClassifier(nn.Module):
    """Ff: ``Linear(img_dim + pts_dim -> hidden) -> ReLU -> Linear(hidden -> 2)``.

    ``forward(f_img (B, img_dim), f_pts (B, pts_dim)) -> logits (B, 2)``; class 1 means
    "same object" (the label ``y`` of Eq. 2).

    ``input_norm`` normalises each of the two features *separately* before the concatenation,
    without learnable parameters (the features handed to the losses and to users are untouched):

    * ``"none"`` – the paper's Ff literally.
    * ``"batch"`` – ``BatchNorm1d(affine=False)``: zero mean, unit variance per channel over the
      batch (running statistics in eval mode).
    * ``"layer"`` – ``LayerNorm(elementwise_affine=False)``: per-sample standardisation.

    Why an option at all: the encoders end in ReLU / max pooling, so their features are
    non-negative with large norms at initialisation. On such inputs every unit of ``fc1`` sees the
    same large positive offset, and SGD can push most units below zero for every input, after
    which Ff predicts the label prior and Fp (which learns only through Ff) gets no gradient.
    Standardising the inputs removes the shared offset and scale (measurements:
    ``docs/EXPERIMENTS.md``).
    """

    def __init__(self, img_dim: int = 512, pts_dim: int = 512, hidden: int = 256, input_norm: str = "none") -> None:
        super().__init__()
        if input_norm not in PAIR_INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {list(PAIR_INPUT_NORMS)}, got {input_norm!r}")
        self.img_dim, self.pts_dim, self.input_norm = int(img_dim), int(pts_dim), input_norm
        self.norm_img = self._norm(input_norm, self.img_dim)
        self.norm_pts = self._norm(input_norm, self.pts_dim)
        self.fc1 = nn.Linear(img_dim + pts_dim, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, 2)

    @staticmethod
    def _norm(kind: str, dim: int) -> nn.Module:
        if kind == "batch":
            return nn.BatchNorm1d(dim, affine=False)
        if kind == "layer":
            return nn.LayerNorm(dim, elementwise_affine=False)
        return nn.Identity()

    def forward(self, f_img: Tensor, f_pts: Tensor) -> Tensor:
        if f_img.ndim != 2 or f_img.shape[1] != self.img_dim:
            raise ValueError(f"f_img must be (B, {self.img_dim}), got {tuple(f_img.shape)}")
        if f_pts.ndim != 2 or f_pts.shape[1] != self.pts_dim:
            raise ValueError(f"f_pts must be (B, {self.pts_dim}), got {tuple(f_pts.shape)}")
        if f_img.shape[0] != f_pts.shape[0]:
            raise ValueError(f"batch sizes differ: f_img {f_img.shape[0]} vs f_pts {f_pts.shape[0]}")
        x = torch.cat([self.norm_img(f_img), self.norm_pts(f_pts)], dim=1)
        return self.fc2(self.relu(self.fc1(x)))

    def pair_logits(self, f_img: Tensor, f_pts: Tensor) -> Tensor:
        """Ff on every (image, cloud) pair: ``f_img (M, img_dim), f_pts (B, pts_dim) -> (M, B, 2)``.

        Entry ``[m, b]`` equals ``forward`` on the pair ``(f_img[m], f_pts[b])`` (with the
        input normalisation taken over the M images and the B clouds). ``fc1`` of a
        concatenation is the sum of its image and cloud column blocks, so fc1 runs on
        ``M + B`` rows instead of ``M * B``.
        """
        if f_img.ndim != 2 or f_img.shape[1] != self.img_dim:
            raise ValueError(f"f_img must be (M, {self.img_dim}), got {tuple(f_img.shape)}")
        if f_pts.ndim != 2 or f_pts.shape[1] != self.pts_dim:
            raise ValueError(f"f_pts must be (B, {self.pts_dim}), got {tuple(f_pts.shape)}")
        w_img, w_pts = self.fc1.weight.split([self.img_dim, self.pts_dim], dim=1)
        h_img = self.norm_img(f_img) @ w_img.t()  # (M, hidden)
        h_pts = torch.addmm(self.fc1.bias, self.norm_pts(f_pts), w_pts.t())  # (B, hidden)
        return self.fc2(self.relu(h_img[:, None, :] + h_pts[None, :, :]))

    def extra_repr(self) -> str:
        return f"input_norm={self.input_norm!r}"
