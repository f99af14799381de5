"""SquaredHingeSVC (L-BFGS, all classes at once) against liblinear's LinearSVC on tiny inputs."""

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


@pytest.mark.parametrize("C", [0.01, 0.1, 1.0])
def test_matches_liblinear_objective_and_predictions(C):
    x, y = _data()
    ours = SquaredHingeSVC(C=C, fit_intercept=False, dtype="float64", tol=1e-9, max_iter=2000).fit(x, y)
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
