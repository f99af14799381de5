"""Layer-wise trust ratio: every weight tensor's gradient rescaled to a fixed fraction of its norm.

LARS (You, Gitman and Ginsburg 2017, "Large Batch Training of Convolutional Networks",
arXiv:1708.03888) gives each layer the local learning rate ``η · ‖w‖ / ‖∇w‖``, so that every
layer's gradient step is the same fraction of its weights whatever the scale of its gradient.
Here it is applied to the gradients before the ordinary SGD step (``optim.point_trust``), to
Fp's weight tensors only: under frozen BatchNorm statistics and PyTorch's default initialisation
the deep EdgeConv blocks get gradients ~75x smaller relative to their weights than the first
block (docs/EXPERIMENTS.md), so one learning rate moves the first block and leaves the deep ones
where they started. Written here rather than taken from a library because none of the packages
this project depends on has it, and the rule is two norms and a multiply.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["trust_params", "apply_trust_ratio_"]


def trust_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the trust ratio rescales: every trainable weight with ≥ 2 dimensions.

    Biases and BatchNorm scales/shifts (1-d) keep their plain gradients, as in LARS.
    """
    return [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]


@torch.no_grad()
def apply_trust_ratio_(params: Iterable[torch.Tensor], coefficient: float, eps: float = 1e-12) -> None:
    """Rescale each ``p.grad`` in place to norm ``coefficient * ‖p‖``.

    params: tensors of any shape whose ``.grad`` is set (those without a gradient are skipped).
    A tensor whose weights or gradient are all zero keeps its gradient unchanged. No host sync:
    the factor stays a tensor, so this is safe inside a CUDA step.
    """
    if not coefficient > 0:
        raise ValueError(f"coefficient must be > 0, got {coefficient}")
    for p in params:
        g = p.grad
        if g is None:
            continue
        w_norm = torch.linalg.vector_norm(p.detach().float())
        g_norm = torch.linalg.vector_norm(g.float())
        ok = (w_norm > 0) & (g_norm > eps)
        scale = torch.where(ok, coefficient * w_norm / g_norm.clamp_min(eps), torch.ones_like(w_norm))
        g.mul_(scale.to(g.dtype))
