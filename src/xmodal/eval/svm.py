"""Linear-SVM evaluation of frozen features (paper Table 2: 2D and 3D shape recognition).

The protocol: fit a linear SVM on the train-split features, report its accuracy
on the test-split features. The regularisation ``C`` is chosen by stratified
k-fold cross-validation **on the train split only**; the test split is used
exactly once, after ``C`` is fixed (:func:`linear_svm_eval`).

Classifier choice: ``Pipeline(StandardScaler, SquaredHingeSVC)``.

* :class:`~xmodal.eval.linear_svm.SquaredHingeSVC` is liblinear's L2-loss linear SVM
  (the default objective of ``LinearSVC``; one-vs-rest, which is what the paper describes:
  "SVMs with one class linear kernel"), solved for all classes at once with L-BFGS.
  ``LinearSVC`` itself reaches the same objective value (checked in the tests) but took more
  than ten minutes for the C grid on ModelNet40-sized features on 2 CPU cores;
  ``SVC(kernel="linear")`` (libsvm, one-vs-one) is quadratic-to-cubic in n and slower still.
* ``StandardScaler`` (fitted inside each CV fold on that fold's training part
  only) puts features of different runs (trained, random-init, ResNet vs DGCNN)
  on one scale, so a single C grid is meaningful for all of them.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional, Sequence

import numpy as np

from xmodal.errors import DataError
from xmodal.eval.context import NO_IMAGES, TEST, TRAIN
from xmodal.eval.features import pool_views

__all__ = ["DEFAULT_CS", "make_linear_svm", "cv_folds", "cv_rows", "select_C", "linear_svm_eval", "svm_task"]

log = logging.getLogger(__name__)

#: the C grid searched by cross-validation. On standardised 512-d features of ~8k ModelNet40
#: objects CV picked C = 1e-3, the edge of an earlier 1e-3..1e2 grid, so the grid reaches 1e-5.
DEFAULT_CS = tuple(float(c) for c in np.logspace(-5, 1, 7))


def make_linear_svm(C: float = 1.0, *, seed: int = 0, max_iter: int = 500, solver: str = "auto"):
    """The classifier used everywhere: ``Pipeline(StandardScaler, SquaredHingeSVC(C))``.

    ``seed`` is accepted for API stability; the solver is deterministic. ``solver``: see
    :class:`~xmodal.eval.linear_svm.SquaredHingeSVC`.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from xmodal.eval.linear_svm import SquaredHingeSVC

    return Pipeline([("scale", StandardScaler()), ("svm", SquaredHingeSVC(C=float(C), max_iter=max_iter, solver=solver))])


def _check_xy(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).reshape(-1)
    if x.ndim != 2:
        raise ValueError(f"{name} features must be (n, D), got shape {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: {x.shape[0]} feature rows but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError(f"{name} split is empty")
    if not np.isfinite(x).all():
        raise DataError(f"{name} features contain NaN or infinity", hint="the run's weights may be out of range (features overflowed)")
    return x, y


def cv_folds(labels: np.ndarray, folds: int = 5) -> int:
    """Number of CV folds usable on ``labels``: ``min(folds, smallest class count)``, at least 2.

    Stratified k-fold needs every class in every fold; with a class of fewer
    than ``folds`` members the fold count is reduced to that size. Raises when a
    class has a single member or there are fewer than 2 classes (no CV possible).
    """
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    if counts.size < 2:
        raise DataError(f"need at least 2 classes in the training split, got {counts.size}")
    smallest = int(counts.min())
    if smallest < 2:
        raise DataError(
            "a class of the training split has a single sample: stratified cross-validation of C is impossible",
            hint="leave such classes out of the search (linear_svm_eval does), or give a fixed C",
        )
    return int(max(2, min(int(folds), smallest)))


def cv_rows(labels: np.ndarray) -> np.ndarray:
    """(n,) bool: the samples whose class has at least two of them (a class of one cannot be
    stratified into cross-validation folds)."""
    _, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    return counts[inverse] >= 2


def select_C(
    train_x,
    train_y,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    folds: int = 5,
    seed: int = 0,
    n_jobs: Optional[int] = None,
    solver: str = "auto",
):
    """Choose C by stratified k-fold CV on the training data only.

    Returns the fitted ``GridSearchCV`` (refit on all of ``train_x`` with the
    best C); ``.best_params_["svm__C"]``, ``.best_score_`` (mean CV accuracy)
    and ``.n_splits_`` describe the choice. ``solver``: see
    :class:`~xmodal.eval.linear_svm.SquaredHingeSVC`.
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from xmodal.eval.linear_svm import auto_solver

    x, y = _check_xy(train_x, train_y, "train")
    k = cv_folds(y, folds)
    search = GridSearchCV(
        # the folds are fitted by the solver the refit on all of x uses (folds are smaller: under
        # "auto" those of a set just over the exact solver's limit would be solved exactly)
        make_linear_svm(seed=seed, solver=auto_solver(*x.shape) if solver == "auto" else solver),
        {"svm__C": [float(c) for c in Cs]},
        cv=StratifiedKFold(n_splits=k, shuffle=True, random_state=seed),
        scoring="accuracy",
        refit=True,
        n_jobs=n_jobs,
    )
    with warnings.catch_warnings():
        # liblinear's ConvergenceWarning at the largest C values is expected and
        # harmless for the grid search: it only scores those candidates lower
        warnings.filterwarnings("ignore", message=".*converge.*")
        search.fit(x, y)
    return search


def _choose_C(x: np.ndarray, y: np.ndarray, *, Cs: Sequence[float], folds: int, seed: int, n_jobs, solver: str):
    """``(C, cv_score, folds, model)`` for :func:`linear_svm_eval` with ``C=None``.

    The classes with a single training sample cannot be stratified into folds: C is chosen
    without them (a warning), and ``model`` is None so that the caller fits the chosen C on every
    sample; otherwise ``model`` is the search's refit on all of them. With fewer than two classes
    left, a single candidate C is used as it is (``cv_score`` and ``folds`` None); several raise.
    """
    rows = cv_rows(y)
    if rows.all():
        search = select_C(x, y, Cs=Cs, folds=folds, seed=seed, n_jobs=n_jobs, solver=solver)
        model = search.best_estimator_
    elif np.unique(y[rows]).size >= 2:
        log.warning("linear SVM: %d training samples are the only ones of their class; C is chosen without "
                    "them (they are in the final fit)", int((~rows).sum()))
        search, model = select_C(x[rows], y[rows], Cs=Cs, folds=folds, seed=seed, n_jobs=n_jobs, solver=solver), None
    elif len(Cs) == 1:
        log.warning("linear SVM: too few classes with two or more training samples to cross-validate; "
                    "the only candidate, C = %g, is used", float(Cs[0]))
        return float(Cs[0]), None, None, None
    else:
        raise DataError("the training split has fewer than 2 classes with two or more samples: C cannot be "
                        "chosen by cross-validation", hint="give a single candidate C (svm.cs=[1.0])")
    return float(search.best_params_["svm__C"]), float(search.best_score_), int(search.n_splits_), model


def linear_svm_eval(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    C: Optional[float] = None,
    folds: int = 5,
    seed: int = 0,
    n_jobs: Optional[int] = None,
    solver: str = "auto",
) -> dict:
    """Linear-SVM accuracy of features: fit on train, score on test.

    train_x: (n, D), train_y: (n,), test_x: (m, D), test_y: (m,).
    ``C=None`` chooses C among ``Cs`` by :func:`select_C` on the train split
    (classes with a single training sample sit out the choice, not the fit);
    a given ``C`` is used as is (no CV). The test split is used once, after C is
    fixed. Returns ``{"accuracy", "C", "cv_score", "folds"}`` (``cv_score``
    and ``folds`` are None for a fixed C); accuracies are fractions in [0, 1].
    ``solver`` (``"auto"``, ``"lbfgs"``, ``"newton"``: exact; see
    :class:`~xmodal.eval.linear_svm.SquaredHingeSVC`) fits the folds and the final model.
    """
    x, y = _check_xy(train_x, train_y, "train")
    tx, ty = _check_xy(test_x, test_y, "test")
    if tx.shape[1] != x.shape[1]:
        raise ValueError(f"train features are {x.shape[1]}-d but test features are {tx.shape[1]}-d")
    model = None
    cv_score: Optional[float] = None
    k: Optional[int] = None
    if C is None:
        C, cv_score, k, model = _choose_C(x, y, Cs=Cs, folds=folds, seed=seed, n_jobs=n_jobs, solver=solver)
    chosen = float(C)
    if model is None:
        model = make_linear_svm(chosen, seed=seed, solver=solver)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*converge.*")
            model.fit(x, y)
    # the only use of the test split
    accuracy = float(np.mean(model.predict(tx) == ty))
    log.info("linear SVM: C=%g (cv %s), test accuracy %.4f", chosen, cv_score, accuracy)
    return {"accuracy": accuracy, "C": chosen, "cv_score": cv_score, "folds": k}


def svm_task(ctx) -> None:
    """The ``svm`` task (Table 2) on one network: :func:`linear_svm_eval` of the 3D features and
    of the 2D features max-pooled over each view count of ``ctx.views`` (C grid ``cfg.svm.cs``)."""
    if TRAIN not in ctx.store.splits:
        ctx.skip("svm", f"the dataset has no '{TRAIN}' split to fit the SVM on")
        return
    cs, solver = tuple(ctx.cfg.svm.cs), ctx.cfg.svm.solver
    ytr, yte = ctx.store.split(TRAIN).labels, ctx.test_labels()
    r = linear_svm_eval(ctx.cache.points(TRAIN), ytr, ctx.cache.points(TEST), yte, Cs=cs, seed=ctx.seed, solver=solver)
    for k in ("accuracy", "C", "cv_score", "folds"):
        ctx.put(f"svm3d.{k}", r[k])
    if not ctx.has_images:
        ctx.skip("svm2d", NO_IMAGES)
        return
    vmax = max(ctx.views)
    ftr, fte = ctx.cache.views(TRAIN, vmax), ctx.cache.views(TEST, vmax)
    for v in ctx.views:
        r = linear_svm_eval(pool_views(ftr, v), ytr, pool_views(fte, v), yte, Cs=cs, seed=ctx.seed, solver=solver)
        for k in ("accuracy", "C", "cv_score", "folds"):
            ctx.put(f"svm2d.{k}.{v}", r[k])
