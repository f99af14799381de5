"""Part-segmentation network on top of a point encoder Fp (paper §4.5).

"Four fully connected layers are added on the top of Fp, and the output from all the four
blocks and the global features are used to predict the [point]-wise labels."

Per point the head sees the concatenation of

* the outputs of the encoder's EdgeConv blocks (64 + 64 + 64 + 128 = 320 channels for the
  default DGCNN),
* the encoder's global feature (512), repeated over the points,
* with ``use_category=True``, a 64-d embedding of the one-hot object category (a bias-free
  linear map + BatchNorm + LeakyReLU, as in DGCNN's own ShapeNet-Part network, where the
  category label is known at test time; the paper does not say, and this is the standard
  protocol of the benchmark it compares with [37]),

followed by four point-wise fully connected layers (1x1 convolutions)
``256 -> 256 -> 128 -> num_parts``, each but the last with BatchNorm + LeakyReLU(0.2), and
dropout after the first two (DGCNN's segmentation head layout).

``freeze_encoder=True`` gives the *frozen* setting of Table 4: the encoder's parameters do not
require gradients, the encoder stays in eval mode even while the network trains (so its
BatchNorm running statistics are not updated), and its features are computed without a graph.
``freeze_encoder_bn=True`` (for fine-tuning an encoder pre-trained with
``model.freeze_point_bn``) trains the encoder's parameters but keeps its BatchNorm layers at their
statistics, as in its pre-training.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.models.batchnorm import hold_batchnorm_stats

__all__ = ["PartSegNet", "encoder_feature_dims"]

_SLOPE = 0.2


def encoder_feature_dims(encoder: nn.Module, *, probe_points: int = 64) -> tuple[list[int], int]:
    """``(block channels, global dim)`` of a point encoder with ``forward_features``.

    Read from ``encoder.channels`` / ``encoder.out_dim`` when it has them, else found with one
    probe forward pass (eval mode, no grad; the encoder's mode is restored and its running
    statistics are not touched).
    """
    channels = getattr(encoder, "channels", None)
    out_dim = getattr(encoder, "out_dim", None)
    if channels is not None and out_dim is not None:
        return [int(c) for c in channels], int(out_dim)
    was_training = encoder.training
    encoder.eval()
    try:
        p = next(encoder.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        # a deterministic, non-degenerate cloud (no global RNG draw)
        t = torch.linspace(0, 6.2831853, probe_points, device=device)
        x = torch.stack([torch.cos(t), torch.sin(3 * t), torch.sin(t) * torch.cos(2 * t)], dim=-1)[None]
        with torch.no_grad():
            feats = encoder.forward_features(x)
    finally:
        encoder.train(was_training)
    return [int(b.shape[1]) for b in feats["blocks"]], int(feats["global"].shape[1])


def _fc(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout), nn.LeakyReLU(_SLOPE))


class PartSegNet(nn.Module):
    """Point-wise part classifier: ``forward(points (B, N, 3), category (B,)) -> logits (B, num_parts, N)``.

    Args:
        encoder: a point encoder with ``forward_features(x (B, N, 3)) -> {"global": (B, G),
            "blocks": [(B, C_i, N)], ...}`` (e.g. :class:`xmodal.models.dgcnn.DGCNN`).
        num_parts: number of (global) part labels P.
        num_categories: number of object categories C (for the category embedding).
        use_category: add the 64-d one-hot category embedding to every point's feature.
        dropout: dropout probability after the first two fully connected layers.
        freeze_encoder: frozen setting (see the module docstring).
        freeze_encoder_bn: keep only the encoder's BatchNorm layers in eval mode (see the
            module docstring); implied by ``freeze_encoder``.
        hidden: widths of the three hidden fully connected layers.
        category_dim: size of the category embedding.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_parts: int,
        num_categories: int,
        *,
        use_category: bool = True,
        dropout: float = 0.5,
        freeze_encoder: bool = False,
        freeze_encoder_bn: bool = False,
        hidden: Sequence[int] = (256, 256, 128),
        category_dim: int = 64,
    ) -> None:
        super().__init__()
        if num_parts < 1 or num_categories < 1:
            raise ValueError(f"num_parts and num_categories must be >= 1, got {num_parts}, {num_categories}")
        if len(hidden) != 3:
            raise ValueError(f"hidden must give the widths of 3 hidden layers (4 layers in all), got {hidden}")
        self.encoder = encoder
        self.num_parts, self.num_categories = int(num_parts), int(num_categories)
        self.use_category = bool(use_category)
        block_ch, global_dim = encoder_feature_dims(encoder)
        self.block_channels, self.global_dim = block_ch, global_dim
        in_ch = sum(block_ch) + global_dim
        if self.use_category:
            self.category_embed = nn.Sequential(
                nn.Linear(num_categories, category_dim, bias=False), nn.BatchNorm1d(category_dim), nn.LeakyReLU(_SLOPE)
            )
            in_ch += category_dim
        else:
            self.category_embed = None
        h1, h2, h3 = (int(h) for h in hidden)
        self.head = nn.Sequential(
            _fc(in_ch, h1),
            nn.Dropout(dropout),
            _fc(h1, h2),
            nn.Dropout(dropout),
            _fc(h2, h3),
            nn.Conv1d(h3, num_parts, 1),
        )
        self.freeze_encoder = False
        self.freeze_encoder_bn = bool(freeze_encoder_bn)
        self.set_frozen(freeze_encoder)

    def set_frozen(self, frozen: bool) -> "PartSegNet":
        """Switch the frozen setting on or off (parameters' ``requires_grad`` and encoder mode)."""
        self.freeze_encoder = bool(frozen)
        for p in self.encoder.parameters():
            p.requires_grad_(not self.freeze_encoder)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> "PartSegNet":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        elif self.freeze_encoder_bn:
            hold_batchnorm_stats(self.encoder)
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters of the newly added layers (category embedding + head)."""
        mods = [self.head] + ([self.category_embed] if self.category_embed is not None else [])
        return [p for m in mods for p in m.parameters()]

    def features(self, points: Tensor, category: Tensor | None = None) -> Tensor:
        """points: (B, N, 3), category: (B,) int64 -> per-point input of the head (B, D, N)."""
        if self.freeze_encoder:
            with torch.no_grad():
                feats = self.encoder.forward_features(points)
        else:
            feats = self.encoder.forward_features(points)
        blocks, glob = feats["blocks"], feats["global"]
        n = points.shape[1]
        parts = list(blocks) + [glob.unsqueeze(-1).expand(-1, -1, n)]
        if self.category_embed is not None:
            if category is None:
                raise ValueError("PartSegNet(use_category=True) needs the object category of every cloud")
            category = category.reshape(-1).long()
            if category.shape[0] != points.shape[0]:
                raise ValueError(f"category has {category.shape[0]} entries for a batch of {points.shape[0]} clouds")
            onehot = F.one_hot(category, self.num_categories).to(glob.dtype)
            emb = self.category_embed(onehot)  # (B, 64)
            parts.append(emb.unsqueeze(-1).expand(-1, -1, n))
        return torch.cat(parts, dim=1)

    def forward(self, points: Tensor, category: Tensor | None = None) -> Tensor:
        """points: (B, N, 3), category: (B,) int64 -> logits (B, num_parts, N)."""
        return self.head(self.features(points, category))
