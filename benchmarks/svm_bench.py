"""The linear SVM's two solvers: exact Newton against L-BFGS, same run.

``SquaredHingeSVC(solver="auto")`` solves problems with ``n <= min(D, 256)`` samples by the
finite Newton method and larger ones by L-BFGS. This script times both on the small problems
where ``auto`` picks Newton -- few-shot episodes (5-way 1-shot and 5-shot at the few-shot task's
C = 1) and small cross-validation folds over the C grid -- with the settings the evaluation uses
(``make_linear_svm``: standardised features, L-BFGS in float32 with 500 iterations), and reports
per problem the median time per fit of each, their ratio, how far L-BFGS's objective ends above
Newton's (the exact minimum), and how often their predictions on held-out samples agree.

Features are synthetic: ``D = 512`` Gaussian features around a per-class centre (the size of Fp's
and Fimg's), standardised as the pipeline does.

With ``--run RUN --data STORE`` it measures instead the large problems of the evaluation: a run's
Fp features of the store's train and test clouds (the run's points per cloud; ``--baseline``: the
run's network at its random initialisation), standardised, one fit per C of the evaluation's grid
with ``solver="lbfgs"`` and ``solver="newton"`` (which there polishes the L-BFGS fit): time,
L-BFGS's objective above the exact minimum, held-out accuracy of each and how many held-out
predictions differ; ``--protocol`` adds the whole protocol (C by 5-fold cross-validation on the
train split, then the test split once) with each solver. ``--cache F.npz`` keeps the features
(extracting them takes minutes on a CPU).

Usage::

    python benchmarks/svm_bench.py --repeats 5
    python benchmarks/svm_bench.py --run runs/mn40 --data mn40 --cache fp.npz --protocol
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


def _features(run: str, data: str, baseline: bool, cache: str | None) -> dict:
    """``{"xtr", "ytr", "xte", "yte"}``: Fp features of the store's train and test clouds."""
    from pathlib import Path

    if cache and Path(cache).exists():
        return dict(np.load(cache))
    from xmodal.api import extract_point_features, load_run
    from xmodal.data.store import ShapeStore

    loaded = load_run(run)
    if baseline:
        loaded = loaded.at_random_init()
    points = int(loaded.config.data.num_points)
    store = ShapeStore(data)
    out = {}
    for split, key in (("train", "tr"), ("test", "te")):
        part = store.split(split)
        out["x" + key] = extract_point_features(loaded.point_encoder, part.all_points()[:, :points])
        out["y" + key] = np.asarray(part.labels)
    if cache:
        np.savez(cache, **out)
    return out


def run_features(feats: dict, cs, protocol: bool) -> None:
    """One fit per C with each solver on standardised features, then (``protocol``) the whole
    cross-validated protocol with each; printed as it goes."""
    import warnings

    from sklearn.preprocessing import StandardScaler

    from xmodal.eval.linear_svm import SquaredHingeSVC
    from xmodal.eval.svm import linear_svm_eval

    scaler = StandardScaler().fit(feats["xtr"])
    xtr, xte, ytr, yte = scaler.transform(feats["xtr"]), scaler.transform(feats["xte"]), feats["ytr"], feats["yte"]
    print(f"train {xtr.shape}, test {xte.shape}")
    hdr = (f"{'C':>8}{'L-BFGS s':>10}{'Newton s':>10}{'ratio':>8}{'L-BFGS obj. excess':>20}"
           f"{'L-BFGS acc':>12}{'Newton acc':>12}{'differ':>8}")
    print(hdr + "\n" + "-" * len(hdr))
    for C in cs:
        fits = {}
        for solver in ("lbfgs", "newton"):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a Newton fit that fell back to L-BFGS is not a measurement
                model = SquaredHingeSVC(C=C, max_iter=500, solver=solver).fit(xtr, ytr)
            fits[solver] = (model, time.perf_counter() - t0, model.predict(xte))
        (lb, tl, pl), (nt, tn, pn) = fits["lbfgs"], fits["newton"]
        print(f"{C:>8g}{tl:>10.1f}{tn:>10.1f}{tn / tl:>7.1f}x{lb.objective_ / nt.objective_ - 1:>20.2e}"
              f"{100 * np.mean(pl == yte):>12.2f}{100 * np.mean(pn == yte):>12.2f}{int((pl != pn).sum()):>8}", flush=True)
    if protocol:
        for solver in ("auto", "newton"):
            t0 = time.perf_counter()
            r = linear_svm_eval(feats["xtr"], ytr, feats["xte"], yte, Cs=cs, solver=solver)
            print(f"protocol, solver={solver}: accuracy {100 * r['accuracy']:.2f} %, C {r['C']:g}, "
                  f"CV {100 * r['cv_score']:.2f} %, {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", help="a pre-training run: measure on its Fp features of --data instead")
    ap.add_argument("--data", help="the prepared dataset (train and test splits) for --run")
    ap.add_argument("--baseline", action="store_true", help="the run's network at its random initialisation")
    ap.add_argument("--cache", help="an .npz keeping the features (read if it exists)")
    ap.add_argument("--cs", type=float, nargs="+", help="the C values (default: the evaluation's grid)")
    ap.add_argument("--protocol", action="store_true", help="also the whole cross-validated protocol per solver")
    args = ap.parse_args(argv)
    import torch

    if args.run or args.cache:
        from xmodal.eval.svm import DEFAULT_CS

        if not args.cache and not args.data:
            ap.error("--run needs --data (or a --cache written before)")
        print(f"threads={torch.get_num_threads()}")
        run_features(_features(args.run, args.data, args.baseline, args.cache), args.cs or DEFAULT_CS, args.protocol)
        return 0

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
