"""Pretext metrics (Table 1) and few-shot episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmodal.eval.fewshot import fewshot_eval, parse_setting, sample_episodes
from xmodal.eval.pretext import cross_modal_accuracy, pair_distance_stats, pretext_metrics, sample_pairs


def test_sample_pairs_counts_half_positive_seeded():
    n = 23
    a, b, pos = sample_pairs(n, 10 * n, seed=0)
    assert a.shape == b.shape == pos.shape == (230,)
    assert pos.sum() == 115 and (~pos).sum() == 115
    assert (a[pos] == b[pos]).all() and (a[~pos] != b[~pos]).all()
    assert a.min() >= 0 and max(a.max(), b.max()) < n
    a2, b2, _ = sample_pairs(n, 230, seed=0)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    a3, _, _ = sample_pairs(n, 230, seed=1)
    assert not np.array_equal(a, a3)
    # odd counts: the extra pair is negative
    _, _, pos = sample_pairs(5, 7, seed=0)
    assert pos.sum() == 3
    with pytest.raises(ValueError, match="at least 2 objects"):
        sample_pairs(1, 10, seed=0)


def test_cross_modal_accuracy_and_distance_stats():
    logits = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    pos = np.array([True, True, False, False])
    r = cross_modal_accuracy(logits, pos)
    assert r == {"accuracy": 0.5, "accuracy_pos": 0.5, "accuracy_neg": 0.5}
    fa = np.zeros((4, 2))
    fb = np.array([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 10.0]])
    s = pair_distance_stats(fa, fb, pos)
    assert s["pos_mean"] == pytest.approx(3.0) and s["pos_std"] == pytest.approx(2.0)
    assert s["neg_mean"] == pytest.approx(10.0) and s["neg_std"] == pytest.approx(0.0)


class _NearClassifier(torch.nn.Module):
    """Says "same object" when the image and point features are closer than 1."""

    def forward(self, fi, fp):
        d = (fi - fp).norm(dim=1)
        return torch.stack([d - 1.0, 1.0 - d], dim=1)


def test_pretext_metrics_oracle():
    rng = np.random.default_rng(0)
    n, pool = 12, 4
    base = rng.normal(size=(n, 8)) * 10  # objects far apart
    views = base[:, None, :] + 0.05 * rng.normal(size=(n, pool, 8))
    r = pretext_metrics(_NearClassifier(), views, base, seed=0)
    assert r["num_pairs"] == 10 * n and r["view_pool"] == pool
    assert r["cm_accuracy"] == 1.0
    assert r["cv_pos_mean"] < 0.5 < 5.0 < r["cv_neg_mean"]
    assert r["cv_pos_mean"] > 0  # positives are two *different* views
    again = pretext_metrics(_NearClassifier(), views, base, seed=0)
    assert again == r
    # a single stored view: no cross-view positives
    one = pretext_metrics(_NearClassifier(), views[:, :1], base, seed=0)
    assert np.isnan(one["cv_pos_mean"]) and one["cm_accuracy"] == 1.0


# --------------------------------------------------------------------------- few-shot


def test_episodes_seeded_disjoint_and_sized():
    labels = np.repeat(np.arange(8), [40, 40, 40, 40, 40, 25, 12, 3])
    eps = sample_episodes(labels, 5, 10, n_query=20, n_episodes=6, seed=0)
    assert len(eps) == 6
    for ep in eps:
        assert len(ep.classes) == 5 and len(set(ep.classes.tolist())) == 5
        assert 7 not in ep.classes  # 3 objects < K + 1
        assert ep.support.size == 50
        assert not set(ep.support.tolist()) & set(ep.query.tolist())
        assert set(labels[ep.support]) == set(ep.classes.tolist()) == set(labels[ep.query])
        counts = np.bincount(labels[ep.query], minlength=8)
        for c in ep.classes:
            assert counts[c] == min(20, np.sum(labels == c) - 10)
        assert np.array_equal(np.bincount(labels[ep.support], minlength=8)[ep.classes], [10] * 5)
    same = sample_episodes(labels, 5, 10, n_query=20, n_episodes=6, seed=0)
    assert all(np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query) for a, b in zip(eps, same))
    other = sample_episodes(labels, 5, 10, n_query=20, n_episodes=6, seed=1)
    assert not all(np.array_equal(a.support, b.support) for a, b in zip(eps, other))
    with pytest.raises(ValueError, match="classes"):
        sample_episodes(labels, 8, 10, seed=0)


def test_fewshot_eval_separable_and_skips():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 30)
    x = rng.normal(size=(6, 16))[y] * 5 + rng.normal(size=(180, 16))
    r = fewshot_eval(x, y, settings=("5w10s", (10, 5)), n_episodes=3, seed=0)
    assert r["5w10s"]["mean"] > 0.95 and r["5w10s"]["episodes"] == 3 and r["5w10s"]["std"] >= 0
    assert "skipped" in r["10w5s"]
    noise = fewshot_eval(rng.normal(size=(180, 16)), y, settings=("5w10s",), n_episodes=3, seed=0)
    assert noise["5w10s"]["mean"] < 0.5  # chance 0.2
    assert parse_setting("10w20s") == (10, 20)
    with pytest.raises(ValueError):
        parse_setting("ten-way")
