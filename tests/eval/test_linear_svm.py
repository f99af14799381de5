"""SquaredHingeSVC (L-BFGS, all classes at once; exact Newton for few samples) against liblinear's
LinearSVC and against each other on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.svm import LinearSVC

from xmodal.eval.linear_svm import SquaredHingeSVC, squared_hinge_objective


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


def test_auto_chooses_by_the_number_of_samples():
    assert SquaredHingeSVC().fit(*_data(n=30, d=40)).solver_ == "newton"
    assert SquaredHingeSVC().fit(*_data(n=60, d=40)).solver_ == "lbfgs"  # more samples than features
    assert SquaredHingeSVC().fit(*_data(n=300, d=400)).solver_ == "lbfgs"  # over NEWTON_MAX_SAMPLES
    with pytest.raises(ValueError, match="solver must be"):
        SquaredHingeSVC(solver="sgd").fit(*_data(n=30, d=40))
