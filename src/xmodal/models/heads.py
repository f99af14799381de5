"""Small heads on top of the encoders.

* :class:`PairClassifier` – Ff of the paper (§3.2): a two-layer MLP on the concatenated image
  and point-cloud features predicting whether both come from the same object.

The part-segmentation head lives in :mod:`xmodal.models.partseg` (``PartSegNet``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PairClassifier"]


class PairClassifier(nn.Module):
    """Ff: ``Linear(img_dim + pts_dim -> hidden) -> ReLU -> Linear(hidden -> 2)``.

    ``forward(f_img (B, img_dim), f_pts (B, pts_dim)) -> logits (B, 2)``; class 1 means
    "same object" (the label ``y`` of Eq. 2).
    """

    def __init__(self, img_dim: int = 512, pts_dim: int = 512, hidden: int = 256) -> None:
        super().__init__()
        self.img_dim, self.pts_dim = int(img_dim), int(pts_dim)
        self.fc1 = nn.Linear(img_dim + pts_dim, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, f_img: Tensor, f_pts: Tensor) -> Tensor:
        if f_img.ndim != 2 or f_img.shape[1] != self.img_dim:
            raise ValueError(f"f_img must be (B, {self.img_dim}), got {tuple(f_img.shape)}")
        if f_pts.ndim != 2 or f_pts.shape[1] != self.pts_dim:
            raise ValueError(f"f_pts must be (B, {self.pts_dim}), got {tuple(f_pts.shape)}")
        if f_img.shape[0] != f_pts.shape[0]:
            raise ValueError(f"batch sizes differ: f_img {f_img.shape[0]} vs f_pts {f_pts.shape[0]}")
        return self.fc2(self.relu(self.fc1(torch.cat([f_img, f_pts], dim=1))))
