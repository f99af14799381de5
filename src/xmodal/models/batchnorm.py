"""Holding BatchNorm layers at fixed statistics ("frozen BatchNorm").

PyTorch has no switch for it: ``module.train()`` puts every BatchNorm layer back into
batch-statistics mode, so a wrapper that wants some of them fixed re-applies
:func:`hold_batchnorm_stats` after each ``train()`` call (see
:class:`xmodal.train.model.XModalNet` and :class:`xmodal.models.partseg.PartSegNet`).
"""

from __future__ import annotations

from torch import nn

__all__ = ["hold_batchnorm_stats", "batchnorm_layers"]


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm and subclasses) inside ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def hold_batchnorm_stats(module: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of ``module`` in eval mode; other layers keep their mode.

    The layers then normalise with their running statistics and do not update them; their
    affine scale and shift still receive gradients. Returns ``module``.
    """
    for m in batchnorm_layers(module):
        m.eval()
    return module
