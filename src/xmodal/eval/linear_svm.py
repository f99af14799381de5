"""A fast multi-class linear SVM (one-vs-rest, squared hinge): L-BFGS in torch, or exact Newton.

Why not scikit-learn's ``LinearSVC``: liblinear solves the 40 one-vs-rest problems of
ModelNet40 one after another, coordinate by coordinate, and slows down sharply as ``C``
grows; choosing ``C`` by 5-fold cross-validation over a grid on ~8k x 512 features took
more than ten minutes on 2 CPU cores (measured). The problem is smooth and strongly
convex, so all classes can be solved at once with full-batch L-BFGS on a few matrix
products: the same grid takes seconds. The objective is exactly liblinear's L2-loss
SVM (``LinearSVC(loss="squared_hinge", penalty="l2")``) except that the intercept is not
penalised::

    min_W,b  1/2 ||W||^2 + C * sum_i sum_k max(0, 1 - y_ik (x_i . w_k + b_k))^2,
    y_ik = +1 if sample i is of class k else -1.

It is a scikit-learn estimator, so it fits in ``Pipeline`` and ``GridSearchCV``.

Small problems (``n <= min(D, 256)`` samples: few-shot episodes, tiny stores, the tests) are
solved exactly instead, by the finite Newton method of Keerthi & DeCoste (JMLR 2005) in the span
of the samples: with fewer samples than features and a large ``C`` the data are separable, the
objective becomes badly conditioned and L-BFGS stops at ``max_iter`` short of the minimum
(5-way 5-shot at ``C = 1``: 300 iterations, 0.25 s, objective still falling), where the Newton
method ends at the exact minimiser after a handful of linear solves. ``solver="newton"`` solves
any problem exactly: with more samples than features, Newton steps on D x D systems polish an
L-BFGS fit. On ModelNet40's 7,873 x 512 features that costs 1.6-2.5x the L-BFGS fit alone at
``C <= 0.1`` and 4-10x at ``C = 1 .. 10`` (``benchmarks/svm_bench.py --run``); L-BFGS had come
within 0.08 % of the minimum at ``C <= 0.01``, and stops 0.6-0.9 % above it at ``C = 0.1`` and
12-150 % at ``C = 1 .. 10``. Neither scikit-learn nor scipy has this
solver for the squared hinge with an unpenalised intercept.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning

from xmodal.errors import DataError

__all__ = ["SquaredHingeSVC", "squared_hinge_objective", "newton_ovr_squared_hinge", "newton_form", "auto_solver",
           "NEWTON_MAX_SAMPLES"]

#: ``solver="auto"`` uses the exact Newton solver up to this many samples (and no more than the
#: number of features); its cost grows as ``n^3`` per class and iteration, L-BFGS's as ``n``.
NEWTON_MAX_SAMPLES = 256


def auto_solver(n: int, d: int) -> str:
    """The solver ``solver="auto"`` picks for ``n`` samples of ``d`` features: ``"newton"`` when
    ``n <= min(d, NEWTON_MAX_SAMPLES)``, else ``"lbfgs"``."""
    return "newton" if n <= min(d, NEWTON_MAX_SAMPLES) else "lbfgs"


def squared_hinge_objective(x, y_pm, w, b, C: float) -> torch.Tensor:
    """Primal objective. x: (n, D), y_pm: (n, K) in {-1, +1}, w: (D, K), b: (K,)."""
    margin = torch.clamp(1.0 - y_pm * (x @ w + b), min=0.0)
    return 0.5 * (w * w).sum() + C * (margin * margin).sum()


class SquaredHingeSVC(ClassifierMixin, BaseEstimator):
    """One-vs-rest linear SVM with squared hinge loss: all classes at once by L-BFGS, or exactly
    by Newton's method (:func:`newton_ovr_squared_hinge`).

    Args:
        C: inverse regularisation strength (as in ``LinearSVC``).
        fit_intercept: learn an (unpenalised) bias per class.
        max_iter: L-BFGS iterations; tol: gradient-norm tolerance (relative to the first step).
        dtype: ``"float32"`` (default; about 1-2 s per fit on 6k x 512 features) or ``"float64"``
            (exact enough to match liblinear's objective to many digits). L-BFGS only: the
            Newton solver works in float64.
        solver: ``"lbfgs"``, ``"newton"`` (exact, :func:`newton_ovr_squared_hinge`: with fewer
            samples than features from zero, with more from the L-BFGS fit) or ``"auto"``
            (Newton when ``n <= min(D, NEWTON_MAX_SAMPLES)``, else L-BFGS).

    After ``fit``: ``coef_`` (K, D), ``intercept_`` (K,), ``objective_`` and ``solver_`` (the
    solver that ran).
    """

    def __init__(self, C: float = 1.0, fit_intercept: bool = True, max_iter: int = 300, tol: float = 1e-6,
                 dtype: str = "float32", solver: str = "auto"):
        self.C = C
        self.fit_intercept = fit_intercept
        self.max_iter = max_iter
        self.tol = tol
        self.dtype = dtype
        self.solver = solver

    def fit(self, X, y):
        X = np.asarray(X)
        y = np.asarray(y).reshape(-1)
        if X.ndim != 2 or X.shape[0] != y.shape[0]:
            raise ValueError(f"X must be (n, D) with one label per row, got X {X.shape} and y {y.shape}")
        if not np.isfinite(X).all():
            raise ValueError(f"X contains NaN or infinity in {int((~np.isfinite(X)).any(axis=1).sum())} of {X.shape[0]} rows")
        self.classes_, idx = np.unique(y, return_inverse=True)
        if self.classes_.size < 2:
            raise DataError("need at least 2 classes to fit an SVM")
        if self.solver not in ("auto", "lbfgs", "newton"):
            raise ValueError(f"solver must be 'auto', 'lbfgs' or 'newton', got {self.solver!r}")
        self.solver_ = auto_solver(*X.shape) if self.solver == "auto" else self.solver
        self.n_features_in_ = X.shape[1]
        start = None
        if self.solver_ == "lbfgs" or newton_form(*X.shape) == "primal":
            self._fit_lbfgs(X, idx)
            if self.solver_ == "lbfgs":
                return self
            # the Newton steps in feature space start from L-BFGS's point, whose active sets are
            # nearly the optimum's: 2-3x faster than from zero on ModelNet40's 7,873 x 512 features
            start = (self.coef_.T.astype(np.float64), self.intercept_.astype(np.float64))
        if not self._fit_newton(X, idx, start):
            warnings.warn(f"SquaredHingeSVC: the Newton solver did not reach the optimum (C = {self.C:g} on features "
                          f"of scale {float(np.abs(X).max()):.3g}); using the L-BFGS fit instead", ConvergenceWarning)
            self.solver_ = "lbfgs"
            if start is None:
                self._fit_lbfgs(X, idx)
        return self

    def _fit_lbfgs(self, X: np.ndarray, idx: np.ndarray) -> None:
        dt = torch.float64 if self.dtype == "float64" else torch.float32
        x = torch.as_tensor(X, dtype=dt)
        k = self.classes_.size
        y_pm = -torch.ones(x.shape[0], k, dtype=dt)
        y_pm[torch.arange(x.shape[0]), torch.as_tensor(idx)] = 1.0
        w = torch.zeros(x.shape[1], k, dtype=dt, requires_grad=True)
        b = torch.zeros(k, dtype=dt, requires_grad=self.fit_intercept)
        params = [w, b] if self.fit_intercept else [w]
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=int(self.max_iter), tolerance_grad=float(self.tol),
                                tolerance_change=1e-12, history_size=10, line_search_fn="strong_wolfe")
        C = float(self.C)
        scale = 1.0 / (C * x.shape[0])  # same minimiser; tolerances independent of C and n

        def closure():
            opt.zero_grad()
            loss = squared_hinge_objective(x, y_pm, w, b, C) * scale
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.coef_ = w.detach().T.cpu().numpy()  # (K, D) as in scikit-learn
        self.intercept_ = b.detach().cpu().numpy()
        self.objective_ = float(squared_hinge_objective(x, y_pm, w.detach(), b.detach(), C))

    def _fit_newton(self, X: np.ndarray, idx: np.ndarray, start) -> bool:
        """The exact fit from ``start`` (``(w (D, K), b (K,))`` or None: zero); False, and nothing
        set, where it did not reach the optimum."""
        x = X.astype(np.float64)
        y_pm = -np.ones((x.shape[0], self.classes_.size))
        y_pm[np.arange(x.shape[0]), idx] = 1.0
        w0, b0 = start if start is not None else (None, None)
        w, b, converged = newton_ovr_squared_hinge(x, y_pm, float(self.C), fit_intercept=self.fit_intercept, w0=w0, b0=b0)
        if not converged:
            return False
        self.coef_ = w.T.copy()
        self.intercept_ = b
        self.objective_ = float(squared_hinge_objective(torch.from_numpy(x), torch.from_numpy(y_pm), torch.from_numpy(w),
                                                        torch.from_numpy(b), float(self.C)))
        return True

    def decision_function(self, X):
        X = np.asarray(X, dtype=self.coef_.dtype)
        return X @ self.coef_.T + self.intercept_

    def predict(self, X):
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


def newton_ovr_squared_hinge(x: np.ndarray, y_pm: np.ndarray, C: float, *, fit_intercept: bool = True,
                             max_iter: int = 100, form: str = "auto", w0: np.ndarray | None = None,
                             b0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Exact minimiser of the one-vs-rest squared-hinge SVM.

    The finite Newton method of Keerthi & DeCoste, "A modified finite Newton method for fast
    solution of large scale linear SVMs" (JMLR 6, 2005). For each class: on the current active set
    ``A`` (samples with margin below 1) the objective is quadratic, and its minimiser (the Newton
    point) solves one linear system. When the Newton point keeps its active set it is the optimum.
    Otherwise the full step is taken if it decreases the objective enough (Armijo), else the exact
    minimum along it (the objective is piecewise quadratic), and the active set is updated.

    Two forms of the same iteration (``form``; ``"auto"``: dual when ``n <= D``, else primal):

    * ``"dual"``, in the span of the samples (``w = X^T alpha``): the system
      ``(G_AA + I / 2C) beta + b 1 = y_A``, ``1^T beta = 0``, of the active samples' size;
    * ``"primal"``, in feature space: ``(I + 2C X_A^T X_A) w + 2C b X_A^T 1 = 2C X_A^T y_A`` and
      ``1^T X_A w + |A| b = 1^T y_A``, a D x D system whatever ``n``.

    Without intercept ``b = 0`` and its equation is dropped. The intercept is found by the
    system's Schur complement.

    Args:
        x: (n, D) features (standardised), float64.
        y_pm: (n, K) targets in {-1, +1}, one column per class.
        C: inverse regularisation strength, > 0.
        max_iter: Newton steps per class at most.
        form: ``"auto"``, ``"dual"`` or ``"primal"``.
        w0, b0: a starting point, (D, K) and (K,) (primal form only; default zero). The steps
            from a nearby point (an L-BFGS fit) are fewer: its active sets are nearly right.
    Returns:
        ``w`` (D, K), the intercepts ``b`` (K,), and whether every class reached its optimum
        (False: ``max_iter`` steps, no progress left in float64, or a linear system that is not
        positive definite in float64, as on badly scaled features with a huge ``C``).
    """
    if form == "auto":
        form = newton_form(*x.shape)
    if form not in ("dual", "primal"):
        raise ValueError(f"form must be 'auto', 'dual' or 'primal', got {form!r}")
    if (w0 is not None or b0 is not None) and form != "primal":
        raise ValueError("a starting point (w0, b0) needs the primal form (the dual one starts from zero)")
    problem = _DualForm(x) if form == "dual" else _PrimalForm(x)
    k = y_pm.shape[1]
    params, b = np.zeros((problem.n_params, k)), np.zeros(k)
    if w0 is not None:
        params[:] = _start_value(w0, params.shape, "w0")
    if b0 is not None and fit_intercept:
        b[:] = _start_value(b0, b.shape, "b0")
    converged = True
    for c in range(k):
        params[:, c], b[c], ok = _newton_one_class(problem, y_pm[:, c], float(C), fit_intercept, max_iter,
                                                   params[:, c], float(b[c]))
        converged &= ok
    w = x.T @ params if form == "dual" else params
    return w, b, converged


def newton_form(n: int, d: int) -> str:
    """The form ``form="auto"`` of :func:`newton_ovr_squared_hinge` takes for ``n`` samples of
    ``d`` features: ``"dual"`` (n x n systems at most) when ``n <= d``, else ``"primal"`` (d x d)."""
    return "dual" if n <= d else "primal"


def _cholesky(a: np.ndarray):
    """``scipy.linalg.cho_factor(a)``, or None where ``a`` is not positive definite in float64."""
    from scipy.linalg import LinAlgError, cho_factor

    try:
        return cho_factor(a)
    except LinAlgError:
        return None


def _start_value(value, shape: tuple, name: str) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (features x classes, classes), got {value.shape}")
    return value


class _DualForm:
    """The Newton iteration in the span of the samples, ``w = X^T alpha`` (parameters ``alpha``,
    (n,)): linear systems of the active samples' size, for fewer samples than features."""

    def __init__(self, x: np.ndarray):
        self.gram = x @ x.T
        self.n_params = x.shape[0]

    def start(self) -> None:
        pass

    def decision(self, alpha: np.ndarray, b: float) -> np.ndarray:
        return self.gram @ alpha + b

    def inner(self, u: np.ndarray, v: np.ndarray) -> float:
        """``w_u . w_v`` of the weight vectors ``X^T u`` and ``X^T v``."""
        return float(u @ (self.gram @ v))

    def weight_gradient_norm(self, alpha: np.ndarray, coef: np.ndarray) -> float:
        """``||w - X^T coef||`` at ``w = X^T alpha``."""
        r = alpha - coef
        return max(0.0, self.inner(r, r)) ** 0.5

    def newton_point(self, active: np.ndarray, y: np.ndarray, C: float, fit_intercept: bool,
                     b: float) -> "tuple[np.ndarray, float] | None":
        from scipy.linalg import cho_solve

        a_idx = np.flatnonzero(active)
        alpha = np.zeros(self.n_params)
        if not a_idx.size:  # nothing active: w = 0, and b is free
            return alpha, b
        factor = _cholesky(self.gram[np.ix_(a_idx, a_idx)] + np.eye(a_idx.size) / (2.0 * C))
        if factor is None:
            return None
        u = cho_solve(factor, y[a_idx])
        new_b = 0.0
        if fit_intercept:
            v = cho_solve(factor, np.ones(a_idx.size))
            schur = float(v.sum())  # > 0 in exact arithmetic
            if not schur > 0.0:
                return None
            new_b = float(u.sum() / schur)
            u = u - new_b * v
        alpha[a_idx] = u
        return alpha, new_b


class _PrimalForm:
    """The Newton iteration in feature space (parameters ``w``, (D,)): D x D linear systems, for
    more samples than features.

    The active samples' ``X_A^T X_A`` (|A| D^2 to build) is carried from step to step and updated
    by the samples that enter or leave the active set, which after the first steps are few; it is
    rebuilt where that is cheaper, as ``X^T X`` (computed once for all classes: from
    ``w = 0, b = 0`` every sample is active) less the inactive samples' where most are active."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.n_params = x.shape[1]
        self._all = None  # X^T X
        self.start()

    def start(self) -> None:
        self._active, self._sxx = None, None

    def decision(self, w: np.ndarray, b: float) -> np.ndarray:
        return self.x @ w + b

    def inner(self, u: np.ndarray, v: np.ndarray) -> float:
        return float(u @ v)

    def weight_gradient_norm(self, w: np.ndarray, coef: np.ndarray) -> float:
        """``||w - X^T coef||``."""
        return float(np.linalg.norm(w - self.x.T @ coef))

    def active_gram(self, active: np.ndarray) -> np.ndarray:
        """``X_A^T X_A`` of the samples ``active`` (n,) bool, updated from the previous call's."""
        prev, n_active = self._active, int(active.sum())
        rebuild_rows = min(n_active, self.x.shape[0] - n_active)  # below: X_A's rows, or the others'
        if prev is not None and int((active != prev).sum()) < rebuild_rows:
            sxx = self._sxx
            for rows, sign in ((active & ~prev, 1.0), (prev & ~active, -1.0)):
                if rows.any():
                    xr = self.x[rows]
                    sxx += sign * (xr.T @ xr)
        elif 2 * n_active > self.x.shape[0]:  # most samples: X^T X (computed once) less the others
            if self._all is None:
                self._all = self.x.T @ self.x
            xo = self.x[~active]
            sxx = self._all - xo.T @ xo
        else:
            xa = self.x[active]
            sxx = xa.T @ xa
        self._active, self._sxx = active.copy(), sxx
        return sxx

    def newton_point(self, active: np.ndarray, y: np.ndarray, C: float, fit_intercept: bool,
                     b: float) -> "tuple[np.ndarray, float] | None":
        from scipy.linalg import cho_solve

        xa, ya = self.x[active], y[active]
        if not ya.size:  # nothing active: w = 0, and b is free
            return np.zeros(self.n_params), b
        eye = np.eye(self.n_params)
        factor = _cholesky(2.0 * C * self.active_gram(active) + eye)
        if factor is None:  # the carried X_A^T X_A can lose definiteness to round-off on badly scaled features
            self._sxx = xa.T @ xa
            factor = _cholesky(2.0 * C * self._sxx + eye)
        if factor is None:
            return None
        w = cho_solve(factor, 2.0 * C * (xa.T @ ya))
        new_b = 0.0
        if fit_intercept:  # w = z - b v, and b from the intercept's equation
            s = xa.sum(axis=0)
            v = cho_solve(factor, 2.0 * C * s)
            schur = float(ya.size - s @ v)  # > 0 in exact arithmetic
            if not schur > 0.0:
                return None
            new_b = float((ya.sum() - s @ w) / schur)
            w = w - new_b * v
        return w, new_b


def _newton_one_class(problem, y: np.ndarray, C: float, fit_intercept: bool, max_iter: int,
                      p: np.ndarray, b: float) -> tuple[np.ndarray, float, bool]:
    problem.start()
    p = p.copy()
    for _ in range(max_iter):
        f = problem.decision(p, b)  # the decision values, recomputed (updated ones drift on badly scaled data)
        active = y * f < 1.0
        point = problem.newton_point(active, y, C, fit_intercept, b)
        if point is None or not (np.isfinite(point[0]).all() and np.isfinite(point[1])):
            return p, b, False  # the active set's system is not positive definite in float64
        new_p, new_b = point
        d_p, d_b = new_p - p, new_b - b
        d_f = problem.decision(d_p, d_b)
        # the optimum: the Newton point keeps its active set, or (near hard margins, where margins
        # within round-off of 1 make the set ambiguous) its gradient is round-off next to w
        if np.array_equal(y * (f + d_f) < 1.0, active) or _grad_norm(
                problem, y, C, new_p, f + d_f, fit_intercept) <= 1e-9 * max(0.0, problem.inner(new_p, new_p)) ** 0.5:
            return new_p, new_b, True
        t = _step(problem.inner(p, p), problem.inner(p, d_p), problem.inner(d_p, d_p), f, d_f, y, C)
        if t <= 1e-12:
            return p, b, False  # no progress left in float64
        p, b = p + t * d_p, b + t * d_b
    return p, b, False


def _grad_norm(problem, y: np.ndarray, C: float, p: np.ndarray, f: np.ndarray, fit_intercept: bool) -> float:
    """Norm of the primal objective's gradient in (w, b) at parameters ``p``, decision values
    ``f``: ``grad_w = w - X^T (2C m y)`` and ``grad_b = -2C m . y``, margins ``m = max(0, 1 - y f)``."""
    m = np.maximum(0.0, 1.0 - y * f)
    g_w = problem.weight_gradient_norm(p, 2.0 * C * m * y)
    g_b = float(2.0 * C * (m @ y)) if fit_intercept else 0.0
    return float(np.hypot(g_w, g_b))


def _step(w_w: float, w_d: float, d_d: float, f: np.ndarray, d_f: np.ndarray, y: np.ndarray, C: float) -> float:
    """The step ``t`` in (0, 1] along the segment to the Newton point: 1 where it decreases
    ``phi(t) = (w_w + 2t w_d + t^2 d_d) / 2 + C sum_i max(0, 1 - y_i (f_i + t df_i))^2`` by at least
    1e-4 of the first-order prediction (Armijo), else the exact minimiser of ``phi`` on [0, 1]."""
    def phi(t: float) -> float:
        m = np.maximum(0.0, 1.0 - y * (f + t * d_f))
        return 0.5 * (w_w + 2.0 * t * w_d + t * t * d_d) + C * float(m @ m)

    slope0 = _slope(0.0, w_d, d_d, f, d_f, y, C)
    if phi(1.0) <= phi(0.0) + 1e-4 * slope0:
        return 1.0
    return _exact_step(w_d, d_d, f, d_f, y, C)


def _slope(t: float, w_d: float, d_d: float, f: np.ndarray, d_f: np.ndarray, y: np.ndarray, C: float) -> float:
    m = np.maximum(0.0, 1.0 - y * (f + t * d_f))
    return w_d + t * d_d - 2.0 * C * float(np.sum(m * y * d_f))


def _exact_step(w_d: float, d_d: float, f: np.ndarray, d_f: np.ndarray, y: np.ndarray, C: float) -> float:
    """The ``t`` in [0, 1] minimising the objective along a segment: the root of its derivative
    ``w_d + t d_d - 2C sum_i max(0, 1 - y_i (f_i + t df_i)) y_i df_i``, which is piecewise linear
    and non-decreasing (convexity), by bisection (1 when the derivative is still <= 0 there)."""
    if _slope(1.0, w_d, d_d, f, d_f, y, C) <= 0.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _slope(mid, w_d, d_d, f, d_f, y, C) > 0.0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)
