"""Tests of the layer-wise trust ratio (xmodal.train.trust) against a plain float64 reference."""

import pytest
import torch
from torch import nn

from xmodal.train.trust import apply_trust_ratio_, trust_params


def _reference(w: torch.Tensor, g: torch.Tensor, coefficient: float) -> torch.Tensor:
    w, g = w.double(), g.double()
    w_norm = sum(float(v) ** 2 for v in w.reshape(-1)) ** 0.5
    g_norm = sum(float(v) ** 2 for v in g.reshape(-1)) ** 0.5
    if w_norm == 0 or g_norm == 0:
        return g
    return g * (coefficient * w_norm / g_norm)


def test_gradients_match_the_reference_and_keep_their_direction():
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(*shape, generator=gen) * s) for shape, s in
              [((8, 3, 1, 1), 0.01), ((16, 8), 3.0), ((5, 4, 2), 1e-4)]]
    for p, s in zip(params, (1e3, 1e-5, 1.0)):
        p.grad = torch.randn(p.shape, generator=gen) * s
    expected = [_reference(p.detach(), p.grad, 0.3) for p in params]
    apply_trust_ratio_(params, 0.3)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-5, atol=0)
        torch.testing.assert_close(p.grad.norm() / p.detach().norm(), torch.tensor(0.3), rtol=1e-5, atol=0)


def test_zero_weights_zero_gradients_and_missing_gradients_are_left_alone():
    zero_w = nn.Parameter(torch.zeros(3, 3))
    zero_w.grad = torch.ones(3, 3)
    zero_g = nn.Parameter(torch.ones(3, 3))
    zero_g.grad = torch.zeros(3, 3)
    no_grad = nn.Parameter(torch.ones(3, 3))
    apply_trust_ratio_([zero_w, zero_g, no_grad], 1.0)
    assert torch.equal(zero_w.grad, torch.ones(3, 3))
    assert torch.equal(zero_g.grad, torch.zeros(3, 3))
    assert no_grad.grad is None


def test_a_bfloat16_parameter_keeps_a_bfloat16_gradient():
    p = nn.Parameter(torch.full((4, 4), 2.0, dtype=torch.bfloat16))
    p.grad = torch.full((4, 4), 4.0, dtype=torch.bfloat16)
    apply_trust_ratio_([p], 0.25)  # 0.25 * ‖w‖ = 0.25 * 8 = 2 = ‖g'‖: every entry 0.5
    assert p.grad.dtype == torch.bfloat16
    torch.testing.assert_close(p.grad, torch.full((4, 4), 0.5, dtype=torch.bfloat16))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_non_positive_coefficient_is_refused(bad):
    p = nn.Parameter(torch.ones(2, 2))
    p.grad = torch.ones(2, 2)
    with pytest.raises(ValueError, match="coefficient"):
        apply_trust_ratio_([p], bad)


def test_only_weights_of_two_or_more_dimensions_are_selected():
    m = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.Linear(4, 2))
    m[2].weight.requires_grad_(False)
    picked = trust_params(m)
    assert [tuple(p.shape) for p in picked] == [(4, 3, 1)]
