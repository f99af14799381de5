"""psb_statistics: the Princeton Shape Benchmark's retrieval statistics (NN, FT, ST, E, DCG)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xmodal.eval.retrieval import PSB_STATS, psb_query_mask, psb_statistics, retrieval_metrics


def _psbtable_reference(feats, labels, names, skip=("-1",), cutoff=2, top=32) -> dict:
    """One query at a time, as the loops of the benchmark's psbTable tool (micro average)."""
    n = len(labels)
    dist = [[math.dist(feats[i], feats[j]) for j in range(n)] for i in range(n)]
    per_query = []
    for i in range(n):
        size = sum(1 for j in range(n) if labels[j] == labels[i])
        if names[labels[i]] in skip or size <= cutoff:
            continue
        ranking = sorted((j for j in range(n) if j != i), key=lambda j: (dist[i][j], j))
        rel = [labels[j] == labels[i] for j in ranking]
        first_tier = size - 1
        second_tier = min(2 * first_tier, n - 1)
        nn = float(rel[0])
        ft = sum(rel[:first_tier]) / first_tier
        st = sum(rel[:second_tier]) / first_tier
        total = float(rel[0]) + sum(1 / math.log2(r + 1) for r in range(1, n - 1) if rel[r])
        best = 1 + sum(1 / math.log2(r + 1) for r in range(1, first_tier))
        k = min(n - 1, top)
        count = sum(rel[:k])
        recall, precision = count / first_tier, count / k
        e = 0.0 if count == 0 else 2 / (1 / recall + 1 / precision)
        per_query.append((nn, ft, st, e, total / best))
    return {key: float(np.mean([q[c] for q in per_query])) for c, key in enumerate(PSB_STATS)}


@pytest.mark.parametrize("seed", range(6))
def test_matches_psbtable_reference_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 45))
    top = 32 if seed % 2 == 0 else int(rng.integers(2, 12))  # odd seeds: a cut-off inside the gallery
    names = ["a", "b", "c", "-1", "d", "e"]
    labels = rng.integers(0, len(names), size=n)
    labels[:3] = 0  # at least one class with queries
    feats = rng.normal(size=(n, int(rng.integers(1, 5)))) + 0.8 * labels[:, None]
    ref = _psbtable_reference(feats.tolist(), labels.tolist(), names, top=top)
    got = psb_statistics(feats, labels, class_names=names, e_top=top, chunk=7)
    assert set(got) == set(PSB_STATS)
    for key in PSB_STATS:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
        assert 0.0 <= got[key] <= 1.0


def test_hand_computed_case_with_ties_small_and_misc_classes():
    # 1-D features; A has 3 objects (queries), B has 2 (too small), "-1" is PSB's misc class.
    # Integer positions make distance ties exact: they are broken by object index.
    names = ["A", "B", "-1"]
    x = np.array([0, 1, 2, 3, 4, 5, 6, 7], float)[:, None]
    y = np.array([0, 1, 1, 0, 2, 2, 0, 2])
    # gallery relevance per query (worked out by hand):
    #   A@0: B B A - - A -     A@3: B - B - A A -  (ties 1,1 / 2,2 / 3,3)     A@6: - - - A B B A
    lg = math.log2
    want = {
        "nn": 0.0,
        "ft": 0.0,
        "st": (1 / 2 + 0 + 1 / 2) / 3,
        "e": 4 / 9,  # every query: 2 hits in k = 7 -> P = 2/7, R = 1 -> 2 / (7/2 + 1)
        "dcg": ((1 / lg(3) + 1 / lg(6)) + (1 / lg(5) + 1 / lg(6)) + (1 / lg(4) + 1 / lg(7))) / 2 / 3,
    }
    got = psb_statistics(x, y, class_names=names)
    for key in PSB_STATS:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    np.testing.assert_array_equal(psb_query_mask(y, class_names=names), y == 0)
    # without the skip list the misc class's 3 objects are queries too; B never is
    np.testing.assert_array_equal(psb_query_mask(y, class_names=names, skip_classes=()), y != 1)
    assert psb_statistics(x, y, class_names=names, skip_classes=())["nn"] > 0  # 5 and 7 have misc neighbours


def test_perfect_ranking_scores_one_and_e_is_bounded_by_its_cut_off():
    rng = np.random.default_rng(0)
    sizes = [3, 5, 8]
    y = np.repeat(np.arange(3), sizes)
    x = 100.0 * y[:, None] + rng.normal(scale=0.1, size=(y.size, 4))
    got = psb_statistics(x, y)
    for key in ("nn", "ft", "st", "dcg"):
        assert got[key] == pytest.approx(1.0), key
    # E's precision counts all k = min(32, n - 1) = 15 retrieved: even a perfect ranking gives
    # E = 2 (C-1) / (k + C-1), which is 1 only when C - 1 = k
    assert got["e"] == pytest.approx(sum(c * 2 * (c - 1) / (15 + c - 1) for c in sizes) / y.size)
    y = np.repeat([0, 1], [33, 40])  # C - 1 = 32 = k for class 0; 39 > k for class 1
    x = 100.0 * y[:, None] + rng.normal(scale=0.1, size=(y.size, 2))
    got = psb_statistics(x, y)
    assert got["e"] == pytest.approx((33 * 1.0 + 40 * 2 * 32 / (32 + 39)) / 73)  # class 1: P = 1, R = 32/39
    assert got["nn"] == got["ft"] == got["st"] == pytest.approx(1.0) and got["dcg"] == pytest.approx(1.0)


def test_names_default_to_the_labels_and_no_query_gives_nan():
    x = np.arange(6, dtype=float)[:, None]
    y = np.array([-1, -1, -1, 4, 4, 4])
    with_misc = psb_statistics(x, y)  # label -1 is the misc class by its str()
    assert with_misc == psb_statistics(x, y, class_names=None, skip_classes=("-1",))
    assert psb_query_mask(y).tolist() == [False] * 3 + [True] * 3
    got = psb_statistics(x, np.array([0, 0, 1, 1, 2, 2]))  # every class has <= 2 objects
    assert all(math.isnan(v) for v in got.values())


def test_existing_topk_and_map_unchanged_beside_it():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, size=30)
    x = rng.normal(size=(30, 3)) + y[:, None]
    before = retrieval_metrics(x, y)
    psb_statistics(x, y)
    assert retrieval_metrics(x, y) == before and set(before) == {"top1", "top5", "top10", "top20", "top50", "map"}


@pytest.mark.parametrize(
    "feats, labels, kw, match",
    [
        (np.zeros((4, 2)), np.zeros(3), {}, "do not match"),
        (np.full((4, 2), np.nan), np.zeros(4), {}, "NaN"),
        (np.zeros((1, 2)), np.zeros(1), {}, "at least 2"),
        (np.zeros((4, 2)), np.array([0, 1, 2, 3]), {"class_names": ["a", "b"]}, "class names"),
        (np.zeros((4, 2)), np.zeros(4), {"min_class_size": 1}, "min_class_size"),
    ],
)
def test_bad_input(feats, labels, kw, match):
    with pytest.raises(ValueError, match=match):
        psb_statistics(feats, labels, **kw)
