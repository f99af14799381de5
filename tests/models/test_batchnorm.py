"""xmodal.models.batchnorm: holding BatchNorm statistics fixed while the rest trains."""

from __future__ import annotations

import torch
from torch import nn

from xmodal.models.batchnorm import batchnorm_layers, hold_batchnorm_stats


def _net():
    return nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(4)))


def test_only_batchnorm_layers_leave_train_mode():
    net = hold_batchnorm_stats(_net().train())
    assert len(batchnorm_layers(net)) == 2
    assert net.training and net[0].training and net[2].training
    assert not net[1].training and not net[3][0].training


def test_held_layers_use_and_keep_running_stats_but_learn_affine():
    torch.manual_seed(0)
    net = _net()
    with torch.no_grad():
        net[1].running_mean.fill_(0.5)
        net[1].running_var.fill_(4.0)
    hold_batchnorm_stats(net.train())
    x = torch.randn(8, 3, 5)
    y = net[1](net[0](x))
    # normalised with the stored statistics, not the batch's
    ref = (net[0](x) - 0.5) / torch.sqrt(torch.tensor(4.0) + net[1].eps)
    torch.testing.assert_close(y, ref * net[1].weight[:, None] + net[1].bias[:, None])
    y.square().sum().backward()
    assert torch.equal(net[1].running_mean, torch.full((4,), 0.5)) and int(net[1].num_batches_tracked) == 0
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0
