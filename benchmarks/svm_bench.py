"""The linear SVM's two solvers on small problems: exact Newton against L-BFGS, same run.

``SquaredHingeSVC(solver="auto")`` solves problems with ``n <= min(D, 256)`` samples by the
finite Newton method and larger ones by L-BFGS. This script times both on the small problems
where ``auto`` picks Newton -- few-shot episodes (5-way 1-shot and 5-shot at the few-shot task's
C = 1) and small cross-validation folds over the C grid -- with the settings the evaluation uses
(``make_linear_svm``: standardised features, L-BFGS in float32 with 500 iterations), and reports
per problem the median time per fit of each, their ratio, how far L-BFGS's objective ends above
Newton's (the exact minimum), and how often their predictions on held-out samples agree.

Features are synthetic: ``D = 512`` Gaussian features around a per-class centre (the size of Fp's
and Fimg's), standardised as the pipeline does.

Usage::

    python benchmarks/svm_bench.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

#: name -> (classes, training samples per class, C)
PROBLEMS = {
    "5-way 1-shot, C=1": (5, 1, 1.0),
    "5-way 5-shot, C=1": (5, 5, 1.0),
    "4 classes x 24, C=0.01": (4, 24, 0.01),
    "4 classes x 24, C=1": (4, 24, 1.0),
    "4 classes x 24, C=10": (4, 24, 10.0),
    "10 classes x 25, C=1": (10, 25, 1.0),
}


def _problem(classes: int, per_class: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 0.3
    y = np.repeat(np.arange(classes), per_class)
    yq = np.repeat(np.arange(classes), 20)
    x, xq = centres[y] + rng.normal(size=(y.size, dim)), centres[yq] + rng.normal(size=(yq.size, dim))
    mu, sd = x.mean(0), x.std(0) + 1e-12
    return (x - mu) / sd, y, (xq - mu) / sd


def run(repeats: int, dim: int, seed: int) -> list[dict]:
    from xmodal.eval.linear_svm import SquaredHingeSVC

    rows = []
    for name, (k, per, C) in PROBLEMS.items():
        x, y, xq = _problem(k, per, dim, seed)
        fits = {"lbfgs": lambda: SquaredHingeSVC(C=C, max_iter=500, solver="lbfgs").fit(x, y),
                "newton": lambda: SquaredHingeSVC(C=C, max_iter=500, solver="newton").fit(x, y)}
        times = {s: [] for s in fits}
        models = {}
        for r in range(repeats + 1):  # the first round is a warm-up
            for s in (fits if r % 2 == 0 else list(fits)[::-1]):
                t0 = time.perf_counter()
                models[s] = fits[s]()
                if r:
                    times[s].append(time.perf_counter() - t0)
        lb, nt = models["lbfgs"], models["newton"]
        rows.append(dict(problem=name, n=int(y.size), lbfgs_s=statistics.median(times["lbfgs"]),
                         newton_s=statistics.median(times["newton"]),
                         excess=lb.objective_ / nt.objective_ - 1.0,
                         agree=float(np.mean(lb.predict(xq) == nt.predict(xq)))))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    print(f"D={args.dim} repeats={args.repeats} threads={torch.get_num_threads()}")
    hdr = f"{'problem':<24}{'n':>5}{'L-BFGS s':>10}{'Newton s':>10}{'speed-up':>10}{'L-BFGS obj. excess (rel.)':>26}{'agree':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in run(args.repeats, args.dim, args.seed):
        print(f"{r['problem']:<24}{r['n']:>5}{r['lbfgs_s']:>10.4f}{r['newton_s']:>10.4f}"
              f"{r['lbfgs_s'] / r['newton_s']:>9.1f}x{r['excess']:>26.1e}{r['agree']:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
