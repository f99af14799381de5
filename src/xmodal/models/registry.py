"""Name -> constructor tables for the encoders (timm style).

>>> enc = create_image_encoder("resnet18")          # our ResNet18, enc.out_dim == 512
>>> pts = create_point_encoder("dgcnn", k=20)       # fast DGCNN, pts.out_dim == 512

Image encoders from other libraries plug in by prefix, imported lazily:
``"torchvision:resnet50"`` (torchvision model with its classifier replaced by ``Identity``) and
``"timm:convnext_tiny"`` (``timm.create_model(name, num_classes=0, pretrained=False)``). Both
are wrapped so that ``forward(x (B, C, H, W)) -> (B, D)`` and ``.out_dim == D``; a 1-channel
input is repeated to 3 channels like :func:`xmodal.models.resnet.resnet18` does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from xmodal.errors import ConfigError
from xmodal.models.dgcnn import DGCNN
from xmodal.models.resnet import resnet18
from xmodal.utils.optional import require

__all__ = [
    "IMAGE_ENCODERS",
    "POINT_ENCODERS",
    "create_image_encoder",
    "create_point_encoder",
    "list_image_encoders",
    "list_point_encoders",
    "is_dgcnn",
    "PluginImageEncoder",
]


def is_dgcnn(name: str) -> bool:
    """Whether the point-encoder ``name`` is a DGCNN (takes ``k`` and ``init``)."""
    return name.lower().split(":")[-1].startswith("dgcnn")


def _dgcnn_reference(**kw) -> DGCNN:
    kw.setdefault("fast", False)
    if kw["fast"]:
        raise ValueError("'dgcnn_reference' is the reference implementation; use 'dgcnn' for fast=True")
    return DGCNN(**kw)


IMAGE_ENCODERS: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18}
POINT_ENCODERS: dict[str, Callable[..., nn.Module]] = {"dgcnn": DGCNN, "dgcnn_reference": _dgcnn_reference}
_PREFIXES = ("torchvision:", "timm:")


class PluginImageEncoder(nn.Module):
    """Wraps a third-party backbone whose classifier was removed: ``(B, C, H, W) -> (B, out_dim)``.

    A 1-channel input is repeated to ``in_channels`` (3) channels.
    """

    def __init__(self, backbone: nn.Module, out_dim: int, name: str, in_channels: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_dim = int(out_dim)
        self.name = name
        self.in_channels = int(in_channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1 and self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1)
        out = self.backbone(x)
        return torch.flatten(out, 1)


def _probe_out_dim(model: nn.Module) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    model.train(was)
    return int(torch.flatten(out, 1).shape[1])


def _torchvision_encoder(name: str, **kw) -> PluginImageEncoder:
    tvm = require("torchvision", purpose=f"image encoder 'torchvision:{name}'").models
    try:
        model = tvm.get_model(name, weights=kw.pop("weights", None), **kw)
    except ValueError as exc:
        raise ConfigError(f"unknown torchvision model '{name}': {exc}") from exc
    # Drop the classifier: the attribute differs between families.
    for attr in ("fc", "classifier", "head", "heads"):
        if hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            setattr(model, attr, nn.Identity())
            break
    return PluginImageEncoder(model, _probe_out_dim(model), f"torchvision:{name}")


def _timm_encoder(name: str, **kw) -> PluginImageEncoder:
    timm = require("timm", purpose=f"image encoder 'timm:{name}'")
    kw.setdefault("pretrained", False)
    model = timm.create_model(name, num_classes=0, **kw)
    # With num_classes=0 a timm model returns its pre-logits features: ``head_hidden_size`` wide
    # (timm >= 1.0), which differs from ``num_features`` (the last feature map's channels) in models
    # whose head has a hidden layer (MobileNetV3: 1280 against 960); older timm: measured.
    dim = getattr(model, "head_hidden_size", None) or _probe_out_dim(model)
    return PluginImageEncoder(model, dim, f"timm:{name}")


def list_image_encoders() -> list[str]:
    """Built-in image encoder names (plus the ``torchvision:NAME`` / ``timm:NAME`` prefixes)."""
    return sorted(IMAGE_ENCODERS)


def list_point_encoders() -> list[str]:
    """Built-in point encoder names."""
    return sorted(POINT_ENCODERS)


def create_image_encoder(name: str = "resnet18", **kw) -> nn.Module:
    """Build an image encoder by name: ``forward(x (B, C, H, W)) -> (B, out_dim)``.

    Args:
        name: a key of :data:`IMAGE_ENCODERS`, ``"torchvision:NAME"`` or ``"timm:NAME"``.
        **kw: passed to the constructor.

    Raises:
        ConfigError: unknown name (the message lists the available ones).
        MissingPackageError: the plug-in library is not usable (the hint names the extra).
    """
    if name.startswith("torchvision:"):
        return _torchvision_encoder(name.split(":", 1)[1], **kw)
    if name.startswith("timm:"):
        return _timm_encoder(name.split(":", 1)[1], **kw)
    if name not in IMAGE_ENCODERS:
        raise ConfigError(
            f"unknown image encoder '{name}'; available: {', '.join(list_image_encoders())} "
            f"or a '{_PREFIXES[0]}NAME' / '{_PREFIXES[1]}NAME' plug-in"
        )
    return IMAGE_ENCODERS[name](**kw)


def create_point_encoder(name: str = "dgcnn", **kw) -> nn.Module:
    """Build a point encoder by name: ``forward(x (B, N, 3)) -> (B, out_dim)``.

    Raises:
        ConfigError: unknown name (the message lists the available ones).
    """
    if name not in POINT_ENCODERS:
        raise ConfigError(f"unknown point encoder '{name}'; available: {', '.join(list_point_encoders())}")
    return POINT_ENCODERS[name](**kw)
