"""SquaredHingeSVC (L-BFGS, all classes at once; exact Newton for few samples) against liblinear's
LinearSVC and against each other on tiny inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from xmodal.eval.linear_svm import (
    SquaredHingeSVC,
    _exact_step,
    _PrimalForm,
    newton_ovr_squared_hinge,
    squared_hinge_objective,
)


def _data(n=300, d=20, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    y = rng.integers(0, k, n)
    x = centers[y] * 0.6 + rng.normal(size=(n, d))
    return x, y


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
@pytest.mark.parametrize("C", [0.01, 0.1, 1.0])
def test_matches_liblinear_objective_and_predictions(C, solver):
    x, y = _data()
    ours = SquaredHingeSVC(C=C, fit_intercept=False, dtype="float64", tol=1e-9, max_iter=2000, solver=solver).fit(x, y)
    assert ours.solver_ == solver
    ref = LinearSVC(C=C, fit_intercept=False, dual=True, tol=1e-10, max_iter=200_000).fit(x, y)
    y_pm = -np.ones((len(y), 4))
    y_pm[np.arange(len(y)), y] = 1
    ref_obj = float(
        squared_hinge_objective(torch.tensor(x), torch.tensor(y_pm), torch.tensor(ref.coef_.T), torch.zeros(4, dtype=torch.float64), C)
    )
    assert ours.objective_ == pytest.approx(ref_obj, rel=1e-6)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-3)
    assert (ours.predict(x) == ref.predict(x)).mean() >= 0.99


def test_intercept_and_labels_are_kept():
    x, y = _data(seed=1)
    x = x + 5.0  # an offset only an intercept can absorb
    labels = np.array(["chair", "lamp", "mug", "sofa"])[y]
    clf = SquaredHingeSVC(C=1.0).fit(x, labels)
    assert set(clf.classes_) == set(labels)
    ref = LinearSVC(C=1.0, dual=True, max_iter=200_000).fit(x, labels)
    ours_acc, ref_acc = (clf.predict(x) == labels).mean(), (ref.predict(x) == labels).mean()
    no_bias_acc = (SquaredHingeSVC(C=1.0, fit_intercept=False).fit(x, labels).predict(x) == labels).mean()
    assert ours_acc >= ref_acc - 0.02 and ours_acc > no_bias_acc


def test_rejects_one_class():
    with pytest.raises(ValueError, match="2 classes"):
        SquaredHingeSVC().fit(np.zeros((3, 2)), np.zeros(3))


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
def test_rejects_non_finite_features(solver):
    x, y = _data(n=20, d=30)
    x[[2, 5], 3] = [np.nan, np.inf]
    with pytest.raises(ValueError, match="NaN or infinity in 2 of 20 rows"):
        SquaredHingeSVC(solver=solver).fit(x, y)


def _gradient(x, y, clf):
    """Gradient of the primal objective at the fitted (w, b), by autograd (float64)."""
    y_pm = -torch.ones(len(y), clf.classes_.size, dtype=torch.float64)
    y_pm[torch.arange(len(y)), torch.as_tensor(np.searchsorted(clf.classes_, y))] = 1.0
    w = torch.tensor(clf.coef_.T, requires_grad=True)
    b = torch.tensor(clf.intercept_, requires_grad=True)
    squared_hinge_objective(torch.tensor(x), y_pm, w, b, clf.C).backward()
    return w.grad, b.grad


@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
def test_newton_is_the_exact_minimiser_where_lbfgs_stops_short(C):
    """Few samples in many dimensions (separable): Newton's gradient vanishes and its objective is
    the lowest; L-BFGS at the default budget is not below it."""
    x, y = _data(n=40, d=100, k=5, seed=3)
    newton = SquaredHingeSVC(C=C).fit(x, y)
    assert newton.solver_ == "newton"  # auto: 40 <= min(100, 256)
    gw, gb = _gradient(x, y, newton)
    scale = 1.0 + C * len(y)
    assert float(gw.abs().max()) < 1e-8 * scale and float(gb.abs().max()) < 1e-8 * scale
    lbfgs = SquaredHingeSVC(C=C, solver="lbfgs", dtype="float64").fit(x, y)
    assert newton.objective_ <= lbfgs.objective_ * (1 + 1e-9)
    if C <= 1.0:  # where a long L-BFGS run still gets there (at C = 100 20k iterations stop 0.4 % above)
        long = SquaredHingeSVC(C=C, solver="lbfgs", dtype="float64", max_iter=5_000, tol=1e-12).fit(x, y)
        assert newton.objective_ == pytest.approx(long.objective_, rel=1e-6)
        np.testing.assert_array_equal(newton.predict(x), long.predict(x))


def test_newton_without_intercept_and_with_duplicate_samples():
    x, y = _data(n=20, d=50, k=3, seed=4)
    x, y = np.concatenate([x, x[:5]]), np.concatenate([y, y[:5]])  # a singular Gram matrix
    clf = SquaredHingeSVC(C=10.0, fit_intercept=False, solver="newton").fit(x, y)
    assert np.all(clf.intercept_ == 0.0)
    gw, _ = _gradient(x, y, clf)
    assert float(gw.abs().max()) < 1e-6
    assert (clf.predict(x) == y).all()  # separable


def _standardised(n, d, k, seed):
    x, y = _data(n=n, d=d, k=k, seed=seed)
    return (x - x.mean(0)) / x.std(0), y


def _objective(x, y_pm, w, b, C):
    margin = np.maximum(0.0, 1.0 - y_pm * (x @ w + b))
    return 0.5 * float((w * w).sum()) + C * float((margin * margin).sum())


@pytest.mark.parametrize("n, form", [(64, "dual"), (100, "primal")])
def test_newton_needs_several_steps_each_lowering_the_objective(n, form):
    """At C = 10 (n == D, and n > D): more than ten Newton steps; the objective never rises with
    the step budget and the final point has a vanishing gradient."""
    x, y = _standardised(n, 64, 8, seed=5)
    y_pm = np.where(y[:, None] == np.arange(8), 1.0, -1.0)
    objs = [_objective(x, y_pm, *newton_ovr_squared_hinge(x, y_pm, 10.0, max_iter=j, form=form)[:2], 10.0)
            for j in range(1, 21)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(objs, objs[1:]))
    assert objs[9] > objs[-1] * (1 + 1e-9)  # ten steps are not enough here
    assert newton_ovr_squared_hinge(x, y_pm, 10.0, max_iter=20, form=form)[2]  # converged
    clf = SquaredHingeSVC(C=10.0, solver="newton").fit(x, y)
    gw, gb = _gradient(x, y, clf)
    assert float(gw.abs().max()) < 1e-8 * (1 + 10.0 * len(y)) and float(gb.abs().max()) < 1e-8 * (1 + 10.0 * len(y))


@pytest.mark.parametrize("n", [30, 200])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_dual_and_primal_forms_reach_the_same_minimiser(n, fit_intercept):
    x, y = _standardised(n, 40, 5, seed=8)
    y_pm = np.where(y[:, None] == np.arange(5), 1.0, -1.0)
    for C in (0.01, 1.0, 100.0):
        (wd, bd, okd), (wp, bp, okp) = (newton_ovr_squared_hinge(x, y_pm, C, fit_intercept=fit_intercept, form=form)
                                        for form in ("dual", "primal"))
        assert okd and okp
        obj = _objective(x, y_pm, wd, bd, C)
        assert _objective(x, y_pm, wp, bp, C) == pytest.approx(obj, rel=1e-10)
        np.testing.assert_allclose(wp, wd, atol=1e-7 * (1 + np.abs(wd).max()))
        np.testing.assert_allclose(bp, bd, atol=1e-7 * (1 + np.abs(bd).max()))
    with pytest.raises(ValueError, match="form must be"):
        newton_ovr_squared_hinge(x, y_pm, 1.0, form="both")


def test_primal_active_gram_updates_match_a_rebuild():
    """The carried X_A^T X_A (updated by the samples entering and leaving A, or rebuilt when most
    change) equals X_A^T X_A computed afresh, over a sequence of active sets."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(50, 6))
    problem = _PrimalForm(x)
    sets = [np.ones(50, bool), rng.random(50) < 0.3]  # all active (X^T X, shared), then most leave
    for _ in range(8):  # a few samples change at a time: updates
        flip = rng.random(50) < 0.08
        sets.append(sets[-1] ^ flip)
    sets += [~sets[-1], np.zeros(50, bool), rng.random(50) < 0.9, np.ones(50, bool)]
    for active in sets:
        np.testing.assert_allclose(problem.active_gram(active), x[active].T @ x[active], atol=1e-10)
    problem.start()  # a new class starts again from every sample active
    np.testing.assert_allclose(problem.active_gram(np.ones(50, bool)), x.T @ x, atol=1e-10)


def test_exact_step_minimises_the_objective_along_the_segment():
    rng = np.random.default_rng(6)
    for _ in range(20):
        n, C = 30, float(10 ** rng.uniform(-2, 2))
        x = rng.normal(size=(n, 8))
        y = np.where(rng.random(n) < 0.5, 1.0, -1.0)
        a0, a1 = rng.normal(size=n) * 0.1, rng.normal(size=n) * 0.1
        b0, b1 = rng.normal(), rng.normal()

        def phi(t):
            a, b = a0 + t * (a1 - a0), b0 + t * (b1 - b0)
            w = x.T @ a
            m = np.maximum(0.0, 1.0 - y * (x @ w + b))
            return 0.5 * w @ w + C * m @ m

        g = x @ x.T
        d = a1 - a0
        t = _exact_step(float(a0 @ g @ d), float(d @ g @ d), g @ a0 + b0, g @ d + (b1 - b0), y, C)
        grid = np.linspace(0.0, 1.0, 2001)
        assert phi(t) <= min(phi(s) for s in grid) + 1e-9 * (1 + abs(phi(t)))


@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
def test_newton_with_more_samples_than_features_polishes_the_lbfgs_fit(C):
    """n > D: solver="newton" starts from the L-BFGS fit and ends at the exact minimiser (a
    vanishing gradient), never above L-BFGS."""
    x, y = _standardised(400, 30, 5, seed=10)
    newton = SquaredHingeSVC(C=C, solver="newton").fit(x, y)
    assert newton.solver_ == "newton" and newton.coef_.dtype == np.float64
    gw, gb = _gradient(x, y, newton)
    scale = 1.0 + C * len(y)
    assert float(gw.abs().max()) < 1e-8 * scale and float(gb.abs().max()) < 1e-8 * scale
    lbfgs = SquaredHingeSVC(C=C, solver="lbfgs", dtype="float64").fit(x, y)
    assert newton.objective_ <= lbfgs.objective_ * (1 + 1e-12)


def test_newton_from_a_starting_point_reaches_the_same_minimiser(monkeypatch):
    x, y = _standardised(300, 20, 4, seed=11)
    y_pm = np.where(y[:, None] == np.arange(4), 1.0, -1.0)
    steps = []
    real_point = _PrimalForm.newton_point
    monkeypatch.setattr(_PrimalForm, "newton_point", lambda self, *a: steps.append(1) or real_point(self, *a))
    w, b, ok = newton_ovr_squared_hinge(x, y_pm, 1.0)
    from_zero, steps[:] = len(steps), []
    assert ok and from_zero > 2 * 4
    newton_ovr_squared_hinge(x, y_pm, 1.0, w0=w, b0=b)
    assert len(steps) == 4  # from the minimiser: one Newton point per class, which keeps its active set
    rng = np.random.default_rng(0)
    w2, b2, ok2 = newton_ovr_squared_hinge(x, y_pm, 1.0, w0=w + 0.1 * rng.normal(size=w.shape), b0=b - 0.2)
    assert ok2
    np.testing.assert_allclose(w2, w, atol=1e-9)
    np.testing.assert_allclose(b2, b, atol=1e-9)
    with pytest.raises(ValueError, match="primal form"):
        newton_ovr_squared_hinge(x[:10], y_pm[:10], 1.0, w0=w)  # 10 <= 20 features: the dual form
    with pytest.raises(ValueError, match=r"w0 must have shape \(20, 4\)"):
        newton_ovr_squared_hinge(x, y_pm, 1.0, w0=w.T)


def test_svc_newton_with_more_samples_than_features_starts_from_the_lbfgs_fit(monkeypatch):
    import xmodal.eval.linear_svm as L

    x, y = _standardised(200, 20, 3, seed=13)
    starts = []
    real = L.newton_ovr_squared_hinge
    monkeypatch.setattr(L, "newton_ovr_squared_hinge", lambda *a, **kw: starts.append(kw.get("w0")) or real(*a, **kw))
    lbfgs = SquaredHingeSVC(C=1.0, solver="lbfgs").fit(x, y)
    SquaredHingeSVC(C=1.0, solver="newton").fit(x, y)
    np.testing.assert_array_equal(starts[-1], lbfgs.coef_.T)
    SquaredHingeSVC(C=1.0, solver="newton").fit(x[:15], y[:15])  # fewer samples than features: from zero
    assert starts[-1] is None


@pytest.mark.parametrize("form, n", [("dual", 15), ("primal", 60)])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_grad_norm_is_the_objectives_gradient_norm(form, n, fit_intercept):
    """The convergence test's gradient norm against autograd's, at an arbitrary point."""
    from xmodal.eval.linear_svm import _DualForm, _grad_norm

    x, y = _standardised(n, 20, 2, seed=14)
    y1 = np.where(y == 0, 1.0, -1.0)
    rng = np.random.default_rng(1)
    problem = (_DualForm if form == "dual" else _PrimalForm)(x)
    p, b = rng.normal(size=problem.n_params) * 0.1, (0.3 if fit_intercept else 0.0)
    w = x.T @ p if form == "dual" else p
    f = x @ w + b
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor([b], requires_grad=True)
    squared_hinge_objective(torch.tensor(x), torch.tensor(y1)[:, None], wt[:, None], bt, 2.5).backward()
    ref = float(torch.cat([wt.grad, bt.grad if fit_intercept else torch.zeros(1, dtype=torch.float64)]).norm())
    assert _grad_norm(problem, y1, 2.5, p, f, fit_intercept) == pytest.approx(ref, rel=1e-7)  # dual: r^T G r rounds


def test_newton_at_a_huge_C_on_a_singular_gram_matrix_ends_or_hands_over():
    """Round-off can make ||w||^2 computed in the span of the samples negative: no complex square
    root (a TypeError), but an exact fit or the warning and the L-BFGS fit."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 40)), rng.integers(0, 4, 30)
    x, y = np.concatenate([x, x[:10]]), np.concatenate([y, y[:10]])  # noise labels, duplicated rows
    x = (x - x.mean(0)) / x.std(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = SquaredHingeSVC(C=1e6, solver="newton", fit_intercept=False).fit(x, y)
    assert np.isfinite(clf.coef_).all() and (clf.predict(x) == y).all()


def test_a_newton_fit_that_fails_keeps_the_lbfgs_fit(monkeypatch):
    import xmodal.eval.linear_svm as L

    x, y = _standardised(200, 20, 3, seed=12)
    lbfgs = SquaredHingeSVC(C=1.0, solver="lbfgs").fit(x, y)
    monkeypatch.setattr(L, "newton_ovr_squared_hinge", lambda x, y_pm, C, **kw: (None, None, False))
    with pytest.warns(ConvergenceWarning, match="using the L-BFGS fit instead"):
        clf = SquaredHingeSVC(C=1.0, solver="newton").fit(x, y)
    assert clf.solver_ == "lbfgs" and clf.objective_ == lbfgs.objective_
    np.testing.assert_array_equal(clf.coef_, lbfgs.coef_)


def test_newton_on_a_system_round_off_leaves_indefinite_hands_over_to_lbfgs():
    """n > D at C * scale^2 ~ 1e15: I is lost beside 2C X_A^T X_A, whose factorisation (and the
    intercept's Schur complement) fail in float64; no LinAlgError and no non-finite "optimum", but
    the warning and the L-BFGS fit. (Found by a random search over scales and C.)"""
    rng = np.random.default_rng(3)
    n, d, k = int(rng.integers(10, 80)), int(rng.integers(4, 80)), int(rng.integers(2, 5))
    centres, y = rng.normal(size=(k, d)), rng.integers(0, k, n)
    x = centres[y] * 0.6 + rng.normal(size=(n, d))
    x = (x - x.mean(0)) / x.std(0) * 1e6
    y_pm = np.where(y[:, None] == np.arange(k), 1.0, -1.0)
    assert (n, d) == (66, 10)
    assert newton_ovr_squared_hinge(x, y_pm, 1e3)[2] is False  # reported, not raised
    with pytest.warns(ConvergenceWarning, match="did not reach the optimum"):
        clf = SquaredHingeSVC(C=1e3, solver="newton").fit(x, y)
    lbfgs = SquaredHingeSVC(C=1e3, solver="lbfgs").fit(x, y)
    assert clf.solver_ == "lbfgs" and np.isfinite(clf.intercept_).all()
    np.testing.assert_array_equal(clf.predict(x), lbfgs.predict(x))


def test_auto_chooses_by_the_number_of_samples():
    assert SquaredHingeSVC().fit(*_data(n=30, d=40)).solver_ == "newton"
    assert SquaredHingeSVC().fit(*_data(n=40, d=40)).solver_ == "newton"  # n == D
    assert SquaredHingeSVC().fit(*_data(n=256, d=300)).solver_ == "newton"  # NEWTON_MAX_SAMPLES
    assert SquaredHingeSVC().fit(*_data(n=257, d=300)).solver_ == "lbfgs"  # over it
    assert SquaredHingeSVC().fit(*_data(n=60, d=40)).solver_ == "lbfgs"  # more samples than features
    with pytest.raises(ValueError, match="solver must be"):
        SquaredHingeSVC(solver="sgd").fit(*_data(n=30, d=40))


def test_newton_on_badly_scaled_features_is_exact_or_hands_over_to_lbfgs():
    x, y = _standardised(64, 64, 4, seed=7)
    # near a hard margin (C times the features' scale huge) the margins are at round-off of 1; the
    # decision values are recomputed each step, so Newton still ends far below a long L-BFGS run
    exact = SquaredHingeSVC(C=1e3, solver="newton").fit(x * 1e4, y)
    long = SquaredHingeSVC(C=1e3, solver="lbfgs", dtype="float64", max_iter=5_000, tol=1e-14).fit(x * 1e4, y)
    assert exact.solver_ == "newton" and exact.objective_ < 0.1 * long.objective_
    with pytest.warns(ConvergenceWarning, match="Newton solver did not reach the optimum"):
        clf = SquaredHingeSVC(C=1e3, solver="newton").fit(x * 1e6, y)  # margins within round-off of 1
    assert clf.solver_ == "lbfgs" and np.isfinite(clf.coef_).all()
