"""Small heads on top of the encoders.

* :class:`PairClassifier` – Ff of the paper (§3.2): a two-layer MLP on the concatenated image
  and point-cloud features predicting whether both come from the same object.
* :class:`PartSegHead` – a per-point MLP (1x1 convolutions) for the part-segmentation
  transfer task, in the style of the DGCNN segmentation head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["PairClassifier", "PartSegHead"]


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


class PartSegHead(nn.Module):
    """Per-point classifier: ``[Conv1d(1x1) -> BN -> LeakyReLU(0.2) -> Dropout] * len(hidden)``
    followed by ``Conv1d(hidden[-1] -> num_classes)``.

    ``forward(x (B, in_dim, N)) -> logits (B, num_classes, N)``. Build ``x`` by concatenating
    per-point features (e.g. DGCNN's ``blocks``/``point``) with the global feature repeated
    over the points and, optionally, a one-hot object category.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: Sequence[int] = (256, 256, 128),
                 dropout: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_dim, self.num_classes = int(in_dim), int(num_classes)
        layers: list[nn.Module] = []
        prev = in_dim
        for i, h in enumerate(hidden):
            layers += [nn.Conv1d(prev, h, 1, bias=False), nn.BatchNorm1d(h), nn.LeakyReLU(0.2, inplace=True)]
            if dropout > 0 and i < len(hidden) - 1:
                layers.append(nn.Dropout(dropout))
            prev = h
        layers.append(nn.Conv1d(prev, num_classes, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[1] != self.in_dim:
            raise ValueError(f"PartSegHead expects (B, {self.in_dim}, N), got {tuple(x.shape)}")
        return self.net(x)
