"""Weight averaging of the pre-trained networks (``optim.average_from``, off in ``paper``).

Stochastic weight averaging (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018): the networks a run exports are the mean of its weights sampled every
``optim.average_every`` steps from step ``optim.average_from`` on, the last step included, instead
of the last step's weights. The mean is kept as networks of its own (:class:`WeightAverage`),
sampled after the optimiser's step, saved in every checkpoint (so a resumed run averages exactly as
one that never stopped) and scored by the validation curve beside the trained networks.

Floating-point tensors (parameters and buffers such as BatchNorm's running statistics) are
averaged; integer buffers (BatchNorm's batch counters) are those of the last sample. Fp's frozen
BatchNorm statistics (``model.freeze_point_bn``) make the average exact for Fp; Fimg's running
statistics are averaged, not re-estimated for the averaged weights (SWA's extra pass over the
data); held out on the ``cpu`` schedule the averaged Fimg lost 0-1.5 2D-SVM points, a loss this
may explain (not tested). The measurements behind the option are in ``docs/EXPERIMENTS.md``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from xmodal.train.checkpoint import load_state_tensors, state_tensors

__all__ = ["AVERAGE_PREFIX", "WeightAverage", "is_sample_step"]

#: the checkpoint tensors of the averaged networks: ``average/<net>/<key>``
AVERAGE_PREFIX = "average/"


def is_sample_step(step: int, *, start: int, every: int, last: int) -> bool:
    """Whether the weights after ``step`` go into the average of a run of ``last`` steps that samples
    every ``every`` steps from ``start`` on (0: off): ``start, start + every, ...`` and ``last``."""
    return 0 < start <= step and ((step - start) % every == 0 or step == last)


class WeightAverage:
    """The running mean of ``nets``' weights (a dict of name -> module, the training networks, unwrapped).

    ``update(nets)`` adds one sample; ``networks()`` returns the averaged networks (copies, in eval
    mode, on the training device), ``count`` the samples taken. The copies are made once, when the
    first sample arrives, so nothing is held before averaging starts.
    """

    def __init__(self) -> None:
        self.count = 0
        self._nets: Optional[dict[str, nn.Module]] = None

    @staticmethod
    def _copies(nets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        return {k: copy.deepcopy(m).eval() for k, m in nets.items()}

    @torch.no_grad()
    def update(self, nets: dict[str, nn.Module]) -> None:
        """Add the current weights of ``nets`` as one more sample of the mean."""
        if self._nets is None:
            self._nets, self.count = self._copies(nets), 1
            return
        self.count += 1
        weight = 1.0 / self.count
        for name, module in nets.items():
            current = module.state_dict()
            for key, avg in self._nets[name].state_dict().items():
                value = current[key].detach()
                if avg.is_floating_point():
                    avg.lerp_(value.to(avg.dtype), weight)  # avg += (value - avg) / count
                else:
                    avg.copy_(value)

    def networks(self) -> dict[str, nn.Module]:
        """The averaged networks (eval mode); an error before the first sample."""
        if self._nets is None:
            raise RuntimeError("no weights averaged yet")
        return self._nets

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``{average/<net>/<key>: tensor}`` (CPU copies) for a checkpoint; empty before the first sample."""
        if self._nets is None:
            return {}
        return state_tensors(self._nets, AVERAGE_PREFIX, names=tuple(self._nets))

    def load(self, nets: dict[str, nn.Module], tensors: dict[str, torch.Tensor], count: int, source: Path) -> None:
        """Restore ``count`` samples from checkpoint ``tensors`` (the ``average/`` entries), with ``nets``
        (the training networks) as the template of the copies."""
        self.count, self._nets = 0, None
        if count <= 0:
            return
        averaged = self._copies(nets)
        load_state_tensors(averaged, tensors, AVERAGE_PREFIX, source, names=tuple(averaged),
                           what="the averaged weights")
        self._nets, self.count = averaged, int(count)
