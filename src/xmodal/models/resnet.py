"""ResNet18 image encoder Fimg (paper §3.2), written here rather than imported.

``torchvision`` (and therefore ``timm``) does not import on the CPU build of torch this
project is developed against (its compiled ops do not match), so the backbone is our own
implementation of the standard ResNet18 of He et al. [15]. It mirrors torchvision's
``resnet18`` layer for layer (same module names, same initialisation, same parameter count
without the classifier: 11,176,512), so torchvision weights load with ``strict=True`` once the
``fc.*`` keys are dropped. Where torchvision *is* usable, ``create_image_encoder("torchvision:NAME")``
in :mod:`xmodal.models.registry` plugs it in instead.

Layout::

    stem    conv 7x7/2 (no bias) - BN - ReLU - maxpool 3x3/2        -> (B, 64, H/4, W/4)
    layer1  2 x BasicBlock(64)                                       -> (B, 64, H/4, W/4)
    layer2  2 x BasicBlock(128), first stride 2, 1x1 conv+BN shortcut -> (B, 128, H/8, W/8)
    layer3  2 x BasicBlock(256), idem                                -> (B, 256, H/16, W/16)
    layer4  2 x BasicBlock(512), idem                                -> (B, 512, H/32, W/32)
    global average pool                                              -> (B, 512)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet", "resnet18"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv+BN) shortcut.

    ``forward(x (B, in_ch, H, W)) -> (B, out_ch, H/stride, W/stride)``.
    """

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet backbone without classifier; outputs the globally average-pooled feature.

    Args:
        layers: number of BasicBlocks per stage, ``(2, 2, 2, 2)`` for ResNet18.
        widths: channels per stage.
        in_channels: channels the network is built for (3 = RGB; torchvision-compatible).
            A 1-channel input (grayscale renders) is repeated to ``in_channels`` when
            ``in_channels == 3``.
        zero_init_residual: initialise the last BN gamma of every block to zero (the
            "Bag of tricks" option of torchvision); off by default.

    Attributes:
        out_dim: size of the output feature (512 for ResNet18).
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        *,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"expected 4 stages, got layers={layers} widths={widths}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.in_channels = int(in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        in_ch = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_ch, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = w
        # torchvision names: layer1..layer4 (keeps state_dicts interchangeable)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_ch
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # Same scheme as torchvision: Kaiming-normal (fan_out, relu) convs, BN gamma=1 beta=0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _check_input(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        c = x.shape[1]
        if c == self.in_channels:
            return x
        if c == 1:
            return x.expand(-1, self.in_channels, -1, -1)
        raise ValueError(f"expected {self.in_channels} (or 1) input channels, got {c}")

    def forward_features(self, x: Tensor, return_stages: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Args: x: (B, C, H, W) with C == in_channels or 1.

        Returns:
            (B, out_dim) pooled feature, and with ``return_stages=True`` also the list of the
            four stage maps ``[(B,64,H/4,W/4), (B,128,H/8,W/8), (B,256,H/16,W/16), (B,512,H/32,W/32)]``.
        """
        x = self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            maps.append(x)
        feat = torch.flatten(self.avgpool(x), 1)
        return (feat, maps) if return_stages else feat

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, out_dim)."""
        return self.forward_features(x)


def resnet18(in_channels: int = 3, *, zero_init_residual: bool = False) -> ResNet:
    """ResNet18 feature extractor: ``forward(x (B,C,H,W)) -> (B, 512)``; 11,176,512 parameters."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), in_channels=in_channels, zero_init_residual=zero_init_residual)
