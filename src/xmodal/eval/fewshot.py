"""N-way K-shot linear evaluation of frozen features (beyond the paper).

Protocol as CrossPoint (Afham et al., 2022) reports it for ModelNet40: an
episode draws N classes, K support objects and up to ``n_query`` query
objects per class **from the test split**, fits a linear SVM on the N*K
support features and scores it on the query features; the mean and standard
deviation of the query accuracy over ``n_episodes`` seeded episodes is
reported. Support and query objects of an episode are disjoint.

Choices (documented because few-shot numbers depend on them):

* a class is eligible when it has at least ``K + 1`` test objects (one query
  at least); a class with fewer than ``K + n_query`` objects contributes all
  its remaining objects as queries;
* the SVM is :func:`xmodal.eval.svm.make_linear_svm` with a fixed ``C = 1``:
  with 5-20 support objects per class cross-validating C is not meaningful;
* episodes come from ``numpy.random.default_rng((seed, n_way, k_shot))`` so
  every setting has its own reproducible episode stream.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from xmodal.errors import ConfigError, DataError
from xmodal.eval.context import NO_IMAGES, TEST

__all__ = ["DEFAULT_SETTINGS", "Episode", "parse_setting", "sample_episodes", "fewshot_eval", "fewshot_task"]

#: (N ways, K shots) evaluated by default
DEFAULT_SETTINGS = ((5, 10), (5, 20), (10, 10), (10, 20))


@dataclass(frozen=True)
class Episode:
    """One few-shot episode: indices into the evaluated split."""

    classes: np.ndarray  # (N,) class ids
    support: np.ndarray  # (N*K,) object indices
    query: np.ndarray  # (<= N*n_query,) object indices


def parse_setting(setting) -> tuple[int, int]:
    """``"5w10s"`` or ``(5, 10)`` -> ``(5, 10)``."""
    if isinstance(setting, str):
        s = setting.lower().strip()
        try:
            n, k = s.rstrip("s").split("w")
            return int(n), int(k)
        except ValueError:
            raise ConfigError(f"few-shot setting must look like '5w10s', got {setting!r}") from None
    n, k = setting
    return int(n), int(k)


def sample_episodes(
    labels,
    n_way: int,
    k_shot: int,
    *,
    n_query: int = 20,
    n_episodes: int = 10,
    seed: int = 0,
) -> list[Episode]:
    """Seeded N-way K-shot episodes over objects with class ``labels`` (n,).

    Raises DataError when fewer than ``n_way`` classes have ``k_shot + 1`` objects.
    """
    labels = np.asarray(labels).reshape(-1)
    if n_way < 2 or k_shot < 1 or n_query < 1 or n_episodes < 1:
        raise ValueError(f"need n_way >= 2, k_shot >= 1, n_query >= 1, n_episodes >= 1; got {n_way}, {k_shot}, {n_query}, {n_episodes}")
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= k_shot + 1]
    if eligible.size < n_way:
        raise DataError(
            f"{n_way}-way {k_shot}-shot needs {n_way} classes with >= {k_shot + 1} objects; "
            f"only {eligible.size} of {classes.size} classes have that many"
        )
    by_class = {int(c): np.flatnonzero(labels == c) for c in eligible}
    rng = np.random.default_rng((int(seed), int(n_way), int(k_shot)))
    episodes = []
    for _ in range(n_episodes):
        chosen = np.sort(rng.choice(eligible, size=n_way, replace=False))
        sup, qry = [], []
        for c in chosen:
            members = rng.permutation(by_class[int(c)])
            sup.append(members[:k_shot])
            qry.append(members[k_shot : k_shot + n_query])
        episodes.append(Episode(chosen, np.concatenate(sup), np.concatenate(qry)))
    return episodes


def fewshot_eval(
    feats,
    labels,
    *,
    settings: Iterable = DEFAULT_SETTINGS,
    n_query: int = 20,
    n_episodes: int = 10,
    C: float = 1.0,
    seed: int = 0,
) -> dict:
    """Few-shot accuracy of features ``(n, D)`` with class ``labels`` ``(n,)``.

    Returns ``{"<N>w<K>s": {"mean", "std", "episodes"}}`` (accuracies as fractions;
    std is the population std over episodes). A setting the data cannot supply
    is returned as ``{"skipped": reason}``.
    """
    from xmodal.eval.svm import make_linear_svm

    feats = np.asarray(feats, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if feats.ndim != 2 or feats.shape[0] != labels.shape[0]:
        raise ValueError(f"features {feats.shape} and labels {labels.shape} do not match")
    out: dict = {}
    for setting in settings:
        n_way, k_shot = parse_setting(setting)
        name = f"{n_way}w{k_shot}s"
        try:
            episodes = sample_episodes(labels, n_way, k_shot, n_query=n_query, n_episodes=n_episodes, seed=seed)
        except ValueError as exc:
            out[name] = {"skipped": str(exc)}
            continue
        accs = []
        for ep in episodes:
            model = make_linear_svm(C, seed=seed)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*converge.*")
                model.fit(feats[ep.support], labels[ep.support])
            accs.append(float(np.mean(model.predict(feats[ep.query]) == labels[ep.query])))
        out[name] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "episodes": len(accs)}
    return out


def fewshot_task(ctx) -> None:
    """The ``fewshot`` task on one network: :func:`fewshot_eval` (``cfg.fewshot``) of the test
    split's 3D features and of its 2D features max-pooled over ``max(ctx.views)`` views."""
    opts = ctx.cfg.fewshot
    sources = [("3d", ctx.cache.points(TEST))]
    if ctx.has_images:
        sources.append(("2d", ctx.cache.pooled(TEST, max(ctx.views))))
    else:
        ctx.skip("fewshot2d", NO_IMAGES)
    skipped = {}
    for dim, feats in sources:
        res = fewshot_eval(feats, ctx.test_labels(), settings=[tuple(s) for s in opts.settings], n_query=opts.query,
                           n_episodes=opts.episodes, seed=ctx.seed)
        for name, r in res.items():
            if "skipped" in r:
                skipped[f"fewshot{dim}.{name}"] = r["skipped"]
                continue
            ctx.put(f"fewshot{dim}.{name}.mean", r["mean"])
            ctx.put(f"fewshot{dim}.{name}.std", r["std"])
    for k, v in skipped.items():
        ctx.skip(k, v)
