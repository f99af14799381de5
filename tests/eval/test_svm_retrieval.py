"""Linear SVM (Table 2), retrieval (Table 3), cross-modal retrieval and view pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmodal.eval.crossmodal import crossmodal_metrics, pair_score_matrix, rank_retrieval, select_gallery
from xmodal.eval.features import effective_views, pool_views, view_indices
from xmodal.eval.retrieval import rank_gallery, retrieval_metrics
from xmodal.eval.svm import DEFAULT_CS, cv_folds, linear_svm_eval, select_C


def _clusters(n_per, n_classes, dim, *, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3.0
    y = np.repeat(np.arange(n_classes), n_per)
    x = centres[y] + spread * rng.normal(size=(y.size, dim))
    return x, y


# --------------------------------------------------------------------------- SVM


def test_svm_separable_clusters_high_accuracy():
    x, y = _clusters(20, 4, 16, spread=0.5, seed=0)
    tx, ty = _clusters(10, 4, 16, spread=0.5, seed=0)  # same centres (same seed), fresh noise below
    tx = tx + np.random.default_rng(1).normal(scale=0.5, size=tx.shape)
    r = linear_svm_eval(x, y, tx, ty, seed=0)
    assert r["accuracy"] >= 0.95
    assert r["C"] in [pytest.approx(c) for c in DEFAULT_CS]
    assert r["folds"] == 5 and 0.9 <= r["cv_score"] <= 1.0


def test_svm_noise_is_near_chance():
    rng = np.random.default_rng(0)
    y, ty = np.repeat(np.arange(4), 30), np.repeat(np.arange(4), 50)
    r = linear_svm_eval(rng.normal(size=(120, 32)), y, rng.normal(size=(200, 32)), ty, seed=0)
    assert r["accuracy"] < 0.42  # chance is 0.25
    assert r["cv_score"] < 0.5


def test_svm_choice_of_C_never_sees_the_test_split():
    x, y = _clusters(12, 3, 8, spread=2.0, seed=3)
    tx, ty = _clusters(10, 3, 8, spread=2.0, seed=4)
    ref = linear_svm_eval(x, y, tx, ty, seed=0)
    rng = np.random.default_rng(9)
    garbage = linear_svm_eval(x, y, rng.normal(size=(7, 8)) * 100, rng.integers(0, 50, size=7), seed=0)
    assert garbage["C"] == ref["C"]
    assert garbage["cv_score"] == ref["cv_score"]
    assert garbage["folds"] == ref["folds"]
    # the CV search alone, without any test data, makes the same choice
    search = select_C(x, y, seed=0)
    assert float(search.best_params_["svm__C"]) == ref["C"]


@pytest.mark.parametrize("n_per, solver", [(50, "newton"), (65, "lbfgs")])
def test_select_C_fits_the_folds_with_the_solver_of_the_refit(n_per, solver):
    """4 x 65 = 260 samples of 300 features: the refit is over the exact solver's 256 samples, so
    the folds (208 samples, which "auto" would solve exactly) are fitted by L-BFGS too."""
    x, y = _clusters(n_per, 4, 300, spread=1.0, seed=5)
    search = select_C(x, y, Cs=(0.01, 1.0), seed=0)
    assert search.estimator.named_steps["svm"].solver == solver
    assert search.best_estimator_.named_steps["svm"].solver_ == solver


def test_select_C_with_the_exact_solver_on_more_samples_than_features():
    x, y = _clusters(40, 3, 10, spread=1.0, seed=6)
    search = select_C(x, y, Cs=(0.01, 1.0), seed=0, solver="newton")
    assert search.best_estimator_.named_steps["svm"].solver_ == "newton"
    from xmodal.eval.linear_svm import SquaredHingeSVC

    solvers = []
    real_fit = SquaredHingeSVC.fit
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SquaredHingeSVC, "fit", lambda self, X, y: solvers.append(self.solver) or real_fit(self, X, y))
        r = linear_svm_eval(x, y, x, y, C=1.0, solver="newton")  # a fixed C: one fit, no search
    assert solvers == ["newton"] and r["C"] == 1.0 and r["accuracy"] > 0.9


def test_svm_fixed_C_and_errors():
    x, y = _clusters(6, 2, 4, spread=0.1, seed=0)
    r = linear_svm_eval(x, y, x, y, C=0.5)
    assert r["C"] == 0.5 and r["cv_score"] is None and r["accuracy"] == 1.0
    with pytest.raises(ValueError, match="8-d"):
        linear_svm_eval(x, y, np.zeros((3, 8)), np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        linear_svm_eval(np.full_like(x, np.nan), y, x, y)


def test_cv_folds_reduced_for_small_classes():
    assert cv_folds(np.array([0] * 10 + [1] * 10)) == 5
    assert cv_folds(np.array([0] * 10 + [1] * 3)) == 3
    assert cv_folds(np.array([0] * 2 + [1] * 2), folds=5) == 2
    with pytest.raises(ValueError, match="single sample"):
        cv_folds(np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="2 classes"):
        cv_folds(np.zeros(5))


def test_a_class_with_one_training_sample_sits_out_the_choice_of_C_but_not_the_fit(caplog):
    # a seeded split of a user's meshes keeps a 1-mesh class entirely in train: the SVM must
    # still run, choose C on the other classes, and learn the lone class from its one sample
    rng = np.random.default_rng(0)
    centres = np.eye(6)[:3] * 6.0
    x = np.concatenate([centres[c] + rng.normal(size=(10, 6)) for c in (0, 1)] + [centres[2:3]])
    y = np.array([0] * 10 + [1] * 10 + [2])
    tx = np.concatenate([centres + 0.1 * rng.normal(size=(3, 6))])
    ty = np.array([0, 1, 2])
    with caplog.at_level("WARNING", logger="xmodal.eval.svm"):
        r = linear_svm_eval(x, y, tx, ty, Cs=(0.01, 1.0))
    assert "1 training samples are the only ones of their class" in caplog.text
    assert r["C"] in (0.01, 1.0) and r["cv_score"] is not None and r["folds"] == 5
    # the chosen C is the one the two-class search picks, and the lone class is predicted
    assert r["C"] == select_C(x[:20], y[:20], Cs=(0.01, 1.0)).best_params_["svm__C"]
    assert r["accuracy"] == 1.0
    # with no two classes left to cross-validate, a single candidate is used; several are refused
    x2, y2 = x[[0, 1, 20]], np.array([0, 0, 2])
    r = linear_svm_eval(x2, y2, x2, y2, Cs=(1.0,))
    assert r["C"] == 1.0 and r["cv_score"] is None and r["folds"] is None
    with pytest.raises(ValueError, match="fewer than 2 classes with two or more samples") as err:
        linear_svm_eval(x2, y2, x2, y2, Cs=(0.1, 1.0))
    assert err.value.hint and "svm.cs" in err.value.hint


# --------------------------------------------------------------------------- retrieval


def _slow_retrieval(x, y, ks):
    """Loop reference: gallery = every other object, Euclidean distance."""
    n = len(y)
    firsts, aps = [], []
    for q in range(n):
        gal = [j for j in range(n) if j != q]
        d = [float(np.sqrt(((x[q] - x[j]) ** 2).sum())) for j in gal]
        ranked = [gal[i] for i in sorted(range(len(gal)), key=lambda i: (d[i], gal[i]))]
        rel = [y[j] == y[q] for j in ranked]
        firsts.append(rel.index(True) if any(rel) else len(rel))
        if any(rel):
            hits, prec = 0, []
            for r, is_rel in enumerate(rel, 1):
                if is_rel:
                    hits += 1
                    prec.append(hits / r)
            aps.append(np.mean(prec))
    out = {f"top{k}": float(np.mean([f < k for f in firsts])) for k in ks}
    out["map"] = float(np.mean(aps))
    return out


def test_retrieval_matches_slow_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 5))
    y = rng.integers(0, 6, size=37)
    ks = (1, 2, 5, 10, 20, 50)
    fast = retrieval_metrics(x, y, ks=ks, chunk=8)  # several chunks
    slow = _slow_retrieval(x, y, ks)
    assert fast.keys() == slow.keys()
    for k in slow:
        assert fast[k] == pytest.approx(slow[k], abs=1e-12), k
    tops = [fast[f"top{k}"] for k in ks]
    assert tops == sorted(tops)  # monotone in K
    assert tops[-1] == 1.0  # K beyond the gallery: every class with >= 2 members is found


def test_retrieval_excludes_the_query():
    # every object is its own nearest neighbour; with unique labels nothing is found
    x = np.arange(10, dtype=float)[:, None]
    r = retrieval_metrics(x, np.arange(10), ks=(1, 5))
    assert r["top1"] == 0.0 and r["top5"] == 0.0
    order = rank_gallery(x)
    assert order.shape == (10, 9)
    assert all(i not in order[i] for i in range(10))
    assert list(order[0][:3]) == [1, 2, 3]


def test_retrieval_perfect_on_separated_classes():
    x, y = _clusters(5, 3, 4, spread=0.01, seed=0)
    r = retrieval_metrics(x, y)
    assert r["top1"] == 1.0 and r["map"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- views


def test_view_indices_distinct_seeded_and_nested():
    a = view_indices(5, 12, 4, seed=1)
    b = view_indices(5, 12, 9, seed=1)
    assert a.shape == (5, 4)
    assert all(len(set(r)) == 4 for r in a)
    assert np.array_equal(a, b[:, :4])  # a smaller v is a prefix of a larger one
    assert not np.array_equal(view_indices(5, 12, 4, seed=2), a)
    assert ((a >= 0) & (a < 12)).all()
    with pytest.raises(ValueError):
        view_indices(2, 3, 4)


def test_pool_views_and_effective_views():
    f = np.random.default_rng(0).normal(size=(3, 5, 7))
    assert np.array_equal(pool_views(f, 1), f[:, 0])
    assert np.array_equal(pool_views(f, 3), f[:, :3].max(1))
    with pytest.raises(ValueError):
        pool_views(f, 6)
    assert effective_views((1, 12, 36, 80), 20) == [1, 12, 20]
    assert effective_views((80, 1, 12), 180) == [1, 12, 80]
    assert effective_views((1, 12), 0) == []


# --------------------------------------------------------------------------- cross-modal


class _DotClassifier(torch.nn.Module):
    """logit[1] - logit[0] = <f_img, f_pts>: a pair classifier with a known answer."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, fi, fp):
        s = (fi * fp).sum(1) * self.scale
        return torch.stack([-s / 2, s / 2], dim=1)


def test_pair_score_matrix_matches_pairwise_calls():
    rng = np.random.default_rng(0)
    fi, fp = rng.normal(size=(7, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    clf = _DotClassifier()
    s = pair_score_matrix(clf, fi, fp, batch_size=6)  # several row blocks
    ref = 1.0 / (1.0 + np.exp(-(fi @ fp.T)))
    assert s.shape == (7, 5)
    np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-6)


def test_rank_retrieval_matches_loop_and_crossmodal_oracle():
    rng = np.random.default_rng(1)
    scores = rng.random((9, 9))
    lab = rng.integers(0, 3, size=9)
    r = rank_retrieval(scores, lab, lab, ks=(1, 3))
    for k in (1, 3):
        ref = np.mean([lab[q] in lab[np.argsort(-scores[q], kind="stable")[:k]] for q in range(9)])
        assert r[f"top{k}"] == pytest.approx(ref)
    assert r["exact1"] == pytest.approx(np.mean(scores.argmax(1) == np.arange(9)))
    # orthogonal features: every image's best match is its own cloud
    f = np.eye(6, dtype=np.float32) * 5
    m = crossmodal_metrics(_DotClassifier(), f, f, np.array([0, 0, 1, 1, 2, 2]))
    assert m["img2shape"]["exact1"] == 1.0 and m["shape2img"]["top1"] == 1.0 and m["gallery_size"] == 6


def test_select_gallery_caps_and_stratifies():
    lab = np.repeat(np.arange(4), 25)
    keep = select_gallery(lab, 40, seed=0)
    assert keep.size == 40 and np.array_equal(keep, np.unique(keep))
    assert np.bincount(lab[keep]).tolist() == [10, 10, 10, 10]
    assert np.array_equal(select_gallery(lab, 40, seed=0), keep)
    assert np.array_equal(select_gallery(lab, None), np.arange(100))


def test_subsample_points_seeded_subset():
    from xmodal.eval.features import subsample_points

    pts = np.random.default_rng(0).normal(size=(3, 20, 3)).astype(np.float32)
    sub = subsample_points(pts, 8, seed=0)
    assert sub.shape == (3, 8, 3)
    for i in range(3):  # every kept point is one of the object's own points, no repeats
        rows = {tuple(p) for p in pts[i]}
        assert {tuple(p) for p in sub[i]} <= rows and len({tuple(p) for p in sub[i]}) == 8
    assert np.array_equal(subsample_points(pts, 8, seed=0), sub)
    assert not np.array_equal(subsample_points(pts, 8, seed=1), sub)
    assert subsample_points(pts, 20, seed=0) is pts
