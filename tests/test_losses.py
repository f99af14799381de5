"""Tests of the self-supervised losses (Eq. 1-3 of the paper)."""

import math

import pytest
import torch

from xmodal.losses import (
    ChannelDecorrelationLoss,
    CrossModalLoss,
    channel_decorrelation,
    TripletLoss,
    cross_modal_loss,
    pair_accuracy,
    self_supervised_loss,
    triplet_loss,
)


def _feats(seed, b=6, d=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g) for _ in range(3)]


def test_triplet_zero_when_negative_is_far():
    a, p, _ = _feats(0)
    n = a + 100.0
    assert triplet_loss(a, p, n, margin=1.0).item() == 0.0
    assert torch.all(triplet_loss(a, p, n, reduction="none") == 0)


def test_triplet_equals_margin_when_all_equal():
    a = torch.randn(4, 3)
    out = triplet_loss(a, a.clone(), a.clone(), margin=0.7, reduction="none")
    torch.testing.assert_close(out, torch.full((4,), 0.7))
    assert triplet_loss(a, a, a, margin=0.7, reduction="sum").item() == pytest.approx(2.8)


def test_triplet_matches_python_loop_with_squared_distance():
    a, p, n = _feats(1)
    expected = []
    for i in range(a.shape[0]):
        dp = sum((float(a[i, j]) - float(p[i, j])) ** 2 for j in range(a.shape[1]))
        dn = sum((float(a[i, j]) - float(n[i, j])) ** 2 for j in range(a.shape[1]))
        expected.append(max(dp - dn + 2.0, 0.0))
    got = triplet_loss(a, p, n, margin=2.0, reduction="none")
    torch.testing.assert_close(got, torch.tensor(expected))
    assert TripletLoss(margin=2.0)(a, p, n).item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_triplet_rejects_bad_input():
    a, p, n = _feats(2)
    with pytest.raises(ValueError, match="anchor"):
        triplet_loss(a, p[:3], n)
    with pytest.raises(ValueError, match="reduction"):
        triplet_loss(a, p, n, reduction="max")


def test_cross_modal_is_sum_over_pairs_of_log_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 2, generator=g)
    labels = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 0]])
    logp = torch.log_softmax(logits, dim=-1)
    per_sample = torch.stack([-sum(logp[b, j, labels[b, j]] for j in range(3)) for b in range(4)])
    torch.testing.assert_close(cross_modal_loss(logits, labels, reduction="none"), per_sample)
    torch.testing.assert_close(cross_modal_loss(logits, labels), per_sample.mean())
    torch.testing.assert_close(CrossModalLoss(reduction="sum")(logits, labels), per_sample.sum())


def test_cross_modal_matches_binary_cross_entropy_of_eq2():
    # with p = softmax(logits)[..., 1], Eq. 2 is -sum_j y log p + (1 - y) log(1 - p)
    logits = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([[1, 1, 0]] * 3)
    p = torch.softmax(logits, -1)[..., 1]
    y = labels.float()
    eq2 = -(y * p.log() + (1 - y) * (1 - p).log()).sum(1).mean()
    torch.testing.assert_close(cross_modal_loss(logits, labels), eq2)


def test_cross_modal_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        cross_modal_loss(torch.randn(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="labels"):
        cross_modal_loss(torch.randn(4, 3, 2), torch.zeros(4, 2))


def test_pair_accuracy():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]])
    assert pair_accuracy(logits, torch.tensor([[1, 0, 0]])).item() == pytest.approx(2 / 3)


def test_self_supervised_loss_combination_ablations_and_gradients():
    f1, f2, f3 = (t.requires_grad_() for t in _feats(5))
    logits = torch.randn(6, 3, 2, generator=torch.Generator().manual_seed(6), requires_grad=True)
    labels = torch.tensor([[1, 1, 0]] * 6)
    trip = triplet_loss(f1, f2, f3, margin=0.5)
    cross = cross_modal_loss(logits, labels)
    both = self_supervised_loss(f1, f2, f3, logits, labels, margin=0.5, beta=2.0)
    torch.testing.assert_close(both["loss"], trip + 2.0 * cross)
    torch.testing.assert_close(both["triplet"], trip.detach())
    cv = self_supervised_loss(f1, f2, f3, logits, labels, margin=0.5, beta=2.0, use_cross_modal=False)
    cm = self_supervised_loss(f1, f2, f3, logits, labels, margin=0.5, beta=2.0, use_cross_view=False)
    torch.testing.assert_close(cv["loss"], trip)
    torch.testing.assert_close(cm["loss"], 2.0 * cross)
    both["loss"].backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (f1, f2, f3, logits))
    f1.grad = None
    cm["loss"].backward()
    assert f1.grad is None  # the cross-view term is off, images reach the loss only through Ff
    with pytest.raises(ValueError, match="at least one"):
        self_supervised_loss(f1, f2, f3, logits, labels, margin=0.5, beta=1.0, use_cross_view=False,
                             use_cross_modal=False)


# --------------------------------------------------------------------------- batch forms (beyond the paper)
from xmodal.losses import BatchCrossModalLoss, batch_cross_modal_loss, batch_pair_bce, pair_scores  # noqa: E402


def _slow_batch_nce(scores, positive):
    """Per-anchor loops: clouds over images (multi-positive), images over clouds."""
    m, b = scores.shape
    cloud_terms, image_terms = [], []
    for j in range(b):
        col = [float(scores[i, j]) for i in range(m)]
        z = sum(math.exp(c) for c in col)
        p = sum(math.exp(col[i]) for i in range(m) if positive[i, j])
        cloud_terms.append(-math.log(p / z))
    for i in range(m):
        if not any(bool(positive[i, j]) for j in range(b)):
            continue
        row = [float(scores[i, j]) for j in range(b)]
        z = sum(math.exp(r) for r in row)
        p = sum(math.exp(row[j]) for j in range(b) if positive[i, j])
        image_terms.append(-math.log(p / z))
    return 0.5 * (sum(cloud_terms) / len(cloud_terms) + sum(image_terms) / len(image_terms))


def _batch_case(seed, b=4):
    g = torch.Generator().manual_seed(seed)
    objects = torch.arange(b)
    negatives = torch.tensor([(i + 1 + int(torch.randint(0, 2 * b, (1,), generator=g))) % (2 * b) for i in range(b)])
    negatives[negatives == objects] = b  # never the sample's own object
    img_obj = torch.cat([objects, objects, negatives])
    return torch.randn(3 * b, b, generator=g, dtype=torch.float64), img_obj[:, None] == objects[None, :]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_cross_modal_loss_matches_loops(seed):
    scores, positive = _batch_case(seed)
    got = batch_cross_modal_loss(scores, positive)
    assert got.item() == pytest.approx(_slow_batch_nce(scores, positive), rel=1e-12)
    assert BatchCrossModalLoss()(scores, positive).item() == pytest.approx(got.item())


def test_batch_cross_modal_loss_limits():
    b = 3
    positive = torch.cat([torch.eye(b, dtype=torch.bool)] * 2 + [torch.zeros(b, b, dtype=torch.bool)])
    perfect = torch.where(positive, 50.0, -50.0).double()
    assert batch_cross_modal_loss(perfect, positive).item() < 1e-12
    uniform = torch.zeros(3 * b, b, dtype=torch.float64)
    # each cloud: 2 positives out of 3b images -> -log(2/9); each positive image: -log(1/3)
    expected = 0.5 * (-math.log(2 / (3 * b)) - math.log(1 / b))
    assert batch_cross_modal_loss(uniform, positive).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="every cloud"):
        batch_cross_modal_loss(uniform, torch.zeros_like(positive))


def test_batch_cross_modal_loss_gradient_pushes_positives_up():
    scores, positive = _batch_case(3)
    scores.requires_grad_(True)
    batch_cross_modal_loss(scores, positive).backward()
    assert (scores.grad[positive] < 0).all() and (scores.grad[~positive] >= 0).all()


def test_batch_pair_bce_is_balanced_binary_cross_entropy():
    scores, positive = _batch_case(4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = 0.5 * (bce(scores[positive], torch.ones(int(positive.sum()), dtype=scores.dtype))
                      + bce(scores[~positive], torch.zeros(int((~positive).sum()), dtype=scores.dtype)))
    assert batch_pair_bce(scores, positive).item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="both positive and negative"):
        batch_pair_bce(scores, torch.ones_like(positive))


def test_pair_scores_is_the_log_odds_of_the_two_way_softmax():
    logits = torch.randn(5, 2, dtype=torch.float64)
    p_same = torch.softmax(logits, dim=-1)[:, 1]
    torch.testing.assert_close(torch.sigmoid(pair_scores(logits)), p_same)
    # the 2-way cross-entropy of Eq. 2 is the binary cross-entropy of the score
    labels = torch.tensor([1, 0, 1, 1, 0])
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    bce = torch.nn.functional.binary_cross_entropy_with_logits(pair_scores(logits), labels.double(), reduction="none")
    torch.testing.assert_close(ce, bce)


def _decorrelation_loop(x, eps=1e-5):
    """The obvious reference: Pearson correlation of every pair of channels, one pair at a time."""
    m, d = x.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            if i == j:
                continue
            a, b = x[:, i] - x[:, i].mean(), x[:, j] - x[:, j].mean()
            va, vb = (a * a).mean() + eps, (b * b).mean() + eps
            total += float((a * b).mean() / math.sqrt(va * vb)) ** 2
    return total / (d * (d - 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_channel_decorrelation_matches_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    assert channel_decorrelation(x).item() == pytest.approx(_decorrelation_loop(x), rel=1e-5)
    assert ChannelDecorrelationLoss()(x).item() == pytest.approx(_decorrelation_loop(x), rel=1e-5)


def test_channel_decorrelation_limits_and_invariances():
    # orthogonal columns with zero mean: uncorrelated, 0; copies of one channel (scaled, shifted,
    # negated): 1
    centre = torch.eye(16, dtype=torch.float64) - 1.0 / 16
    cols = torch.linalg.qr(centre @ torch.randn(16, 4, dtype=torch.float64))[0]  # spans a zero-mean subspace
    assert channel_decorrelation(cols).item() == pytest.approx(0.0, abs=1e-6)
    base = torch.randn(32, 1)
    same = torch.cat([base, 3 * base + 2, -base], dim=1)
    assert channel_decorrelation(same).item() == pytest.approx(1.0, abs=1e-3)
    # a constant channel counts as uncorrelated; per-channel scale and shift change nothing
    x = torch.randn(20, 6)
    with_const = torch.cat([x, torch.full((20, 1), 5.0)], dim=1)
    d = 6
    assert channel_decorrelation(with_const).item() == pytest.approx(
        channel_decorrelation(x).item() * d * (d - 1) / ((d + 1) * d), rel=1e-4)
    scaled = x * torch.linspace(0.5, 4, 6) + torch.arange(6.0)
    assert channel_decorrelation(scaled).item() == pytest.approx(channel_decorrelation(x).item(), rel=1e-3)
    with pytest.raises(ValueError, match="M >= 2"):
        channel_decorrelation(torch.randn(1, 4))


def test_channel_decorrelation_is_float32_inside_autocast():
    x = torch.randn(64, 12) @ torch.randn(12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = channel_decorrelation(x.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(channel_decorrelation(x.bfloat16().float()).item(), rel=1e-6)


def test_channel_decorrelation_gradient_lowers_it():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 8, generator=g) @ torch.randn(8, 8, generator=g)).requires_grad_(True)
    before = channel_decorrelation(x)
    before.backward()
    after = channel_decorrelation(x.detach() - 0.5 * x.grad / x.grad.norm())
    assert after.item() < before.item()
