"""What a report folder already holds, so that evaluating into it again skips finished work.

``OUT/metrics.json`` records, beside the metrics, ``meta.tasks_done``: for every task evaluated on
a network (``"svm"`` on the run, ``"baseline.random.svm"`` on its random-init baseline) a
fingerprint (:func:`task_fingerprint`) of everything its metrics depend on:

* the network: a SHA-256 of every parameter and buffer of Fimg, Fp and Ff, and of its
  pre-training config (:func:`weights_digest`; options added later count only away from the value
  earlier runs had) - the weights actually evaluated, whether they
  came from ``encoders.safetensors``, the last checkpoint or :func:`xmodal.api.random_init_run`;
* the dataset: a SHA-256 of its manifest (:func:`data_digest`; a prepared dataset is a
  deterministic function of its manifest's source and settings);
* the seed, the device, the view counts used, the point subsets per 3D feature (tasks that read
  3D features), the task's own options
  (:attr:`xmodal.eval.tasks.EvalTask.options`, e.g. ``svm.cs`` or ``partseg.*``) and the xmodal
  version.

An evaluation into a folder whose ``metrics.json`` holds the same run, data and seed (the folders
compared as paths, however spelled; else the file is replaced) skips every task whose fingerprint is recorded and evaluates the
others; ``redo`` evaluates every task asked for. :class:`MetricsBook` keeps the file's content
while the evaluation runs and writes it after every task, so a stopped (or killed) evaluation
keeps what it finished. A task can also save partial progress in ``meta.tasks_partial`` (part
segmentation: its finished setting/fraction cells), from which the next evaluation with the same
fingerprint resumes.

The top-level ``meta.*`` keys describe the latest call; the settings each finished task was
evaluated under (views, point subsets, the baseline's seed, the run's weights: those the report's
setup describes; a task not asked for again keeps its figures from the weights it was evaluated on)
are kept per task in ``meta.tasks_settings``, so a folder filled by several calls with different
settings says which figure came from which (:func:`settings_differing`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from xmodal import __version__
from xmodal.errors import OutputExistsError
from xmodal.eval.context import BASELINE_PREFIX
from xmodal.eval.tasks import TASK_NAMES, EvalTask
from xmodal.utils.io import read_json, write_json

__all__ = ["IDENTITY_KEYS", "weights_digest", "data_digest", "task_fingerprint", "MetricsBook",
           "baseline_seed_in_effect", "settings_differing"]

log = logging.getLogger(__name__)

#: the ``meta.*`` keys that make two evaluations "the same evaluation" (merged into one file)
IDENTITY_KEYS = ("meta.run", "meta.data", "meta.seed")
_NETWORKS = ("image_encoder", "point_encoder", "pair_classifier")
#: the ``meta.*`` keys that describe the data (None from a call that reads none)
_DATA_META = ("meta.data", "meta.dataset", "meta.data_notes")


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _without_neutral(plain: dict, neutral_values: dict) -> dict:
    """``plain`` (nested dicts) without the dotted keys of ``neutral_values`` that hold their
    neutral value (dropped in place): options added later, at the value earlier hashes had."""
    for key, neutral in neutral_values.items():
        *path, leaf = key.split(".")
        section = plain
        for part in path:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict) and leaf in section and section[leaf] == neutral:
            del section[leaf]
    return plain


def _option_identity(name: str, value: Any) -> Any:
    """A task option (a config section or value) as it enters :func:`task_fingerprint`: plain data,
    without the fields added later while they hold the value earlier evaluations had
    (:data:`xmodal.eval.config.OPTION_NEUTRAL_VALUES`)."""
    from xmodal.eval.config import OPTION_NEUTRAL_VALUES

    return _without_neutral({name: _plain(value)}, OPTION_NEUTRAL_VALUES)[name]


def _config_identity(config: Any) -> Any:
    """A run's pre-training config as it enters :func:`weights_digest`: plain data, without the
    fields added after runs had been saved while they hold the value those runs had
    (:data:`xmodal.train.config.HASH_NEUTRAL_VALUES`), so that a new option does not make every
    report folder evaluate its run again."""
    plain = json.loads(json.dumps(_plain(config), sort_keys=True, default=str))  # tuples -> lists
    if not isinstance(plain, dict):
        return plain
    from xmodal.train.config import HASH_NEUTRAL_VALUES  # the pre-training schema's own table

    return _without_neutral(plain, HASH_NEUTRAL_VALUES)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def weights_digest(net: Any) -> str:
    """SHA-256 of a network's weights (every parameter and buffer of Fimg, Fp, Ff) and config."""
    h = hashlib.sha256()
    for name in _NETWORKS:
        module = getattr(net, name, None)
        if module is None:
            continue
        for key, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode("utf-8"))
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(_sha(_config_identity(getattr(net, "config", None))).encode("ascii"))
    return h.hexdigest()


def data_digest(store: Any) -> str:
    """SHA-256 of a dataset's manifest (its objects' counts, shards, source and build settings)."""
    return _sha(store.manifest)


def task_fingerprint(task: EvalTask, cfg: Any, *, network: str, weights: str, data: str, views: list[int],
                     device: str, point_subsets: int = 1) -> str:
    """What the metrics of ``task`` on one network depend on, hashed (see the module docstring).

    ``point_subsets``: the 3D features' subsets in effect (1 where the clouds are not subsampled);
    it joins the hash of the tasks that read 3D features, and only away from 1, so that the
    fingerprints written before the option existed still match the same evaluation.
    """
    subsets = int(point_subsets) if task.point_features else 1
    return _sha({
        **({"point_subsets": subsets} if subsets != 1 else {}),
        "task": task.name,
        "network": network,
        "weights": weights,
        "data": data,
        "seed": int(cfg.seed),
        "device": device,
        "views": [int(v) for v in views],
        "options": {name: _option_identity(name, getattr(cfg, name)) for name in task.options},
        "xmodal": __version__,
    })[:32]


def _same(key: str, old: Any, new: Any) -> bool:
    """Whether an identity value of an earlier ``metrics.json`` is this evaluation's: the run and data
    folders compare as paths, however spelled (``runs/a`` and ``/home/u/proj/runs/a``; relative ones
    taken from the working directory), the rest as values. No data (None) matches any. A relative
    path recorded by an earlier version that names nothing from here cannot be compared: it is not
    taken for a difference (the tasks' fingerprints, which hash the weights and the data, still are)."""
    if old == new:
        return True
    if key == "meta.data" and (old is None or new is None):
        return True  # a call that reads no data (part segmentation on partseg_data alone) continues any
    if key in ("meta.run", "meta.data") and isinstance(old, str) and isinstance(new, str):
        if not os.path.isabs(old) and not os.path.exists(old):
            return True
        return os.path.realpath(old) == os.path.realpath(new)
    return False


def _replace_other(path: Path, old: dict, identity: dict, *, overwrite: bool) -> None:
    """``path`` (a ``metrics.json``) holds ``old``, another evaluation than ``identity`` (another
    run, data or seed): refuse, unless ``overwrite``, in which case that evaluation's files are
    removed (``metrics.json``, ``report.md``, the figures it lists, the part-segmentation logs),
    so none of its figures stay beside the new ones. Files it did not write are left alone.

    Raises:
        OutputExistsError: ``overwrite`` is false.
    """
    differ = "; ".join(f"{k.removeprefix('meta.')}: {old.get(k)!r} there, {identity[k]!r} here"
                       for k in IDENTITY_KEYS if not _same(k, old.get(k), identity[k]))
    folder = path.parent
    if not overwrite:
        raise OutputExistsError(f"holds the report of another evaluation ({differ})", path=folder,
                                hint="choose another --out, or pass --overwrite to replace that report")
    figures = [folder / str(name) for name in (old.get("meta.figures") or {}).values()]
    logs = sorted((folder / "partseg").glob("partseg_*.jsonl"))
    for f in [path, folder / "report.md", *figures, *logs]:
        if f.is_file() and f.resolve().parent in (folder.resolve(), (folder / "partseg").resolve()):
            f.unlink()
    log.warning("%s: the report of another evaluation (%s) is replaced (--overwrite)", folder, differ)


class MetricsBook:
    """The content of ``metrics.json`` while an evaluation runs: flat metrics plus bookkeeping.

    Args:
        path: the ``metrics.json`` file; an evaluation with the same :data:`IDENTITY_KEYS` in it
            is continued, anything else is replaced.
        identity: ``{key: value}`` of :data:`IDENTITY_KEYS` of this evaluation.
        redo: forget which tasks are done (every task asked for is evaluated again).
    """

    def __init__(self, path: Path, identity: dict, *, redo: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.redo = redo
        self.metrics: dict[str, Any] = {}
        self.done: dict[str, str] = {}
        self.partial: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}
        self.figures: dict[str, str] = {}
        #: ``{task key: [figure captions]}``: the figures each task drew, dropped with its figures
        self.task_figures: dict[str, list[str]] = {}
        self.settings: dict[str, dict] = {}
        self.tasks_run: set[str] = set()
        #: the data an earlier call described, stated again by a call that reads none
        self.data_meta: dict[str, Any] = {}
        old = self._previous(identity, overwrite)
        if old:
            self.data_meta = {k: old.get(k) for k in _DATA_META}
            self.metrics = {k: v for k, v in old.items() if not k.startswith("meta.")}
            self.done = dict(old.get("meta.tasks_done") or {})
            self.partial = dict(old.get("meta.tasks_partial") or {})
            self.skipped = dict(old.get("meta.tasks_skipped") or {})
            self.figures = dict(old.get("meta.figures") or {})
            self.task_figures = {k: list(v) for k, v in (old.get("meta.task_figures") or {}).items()}
            self.settings = dict(old.get("meta.tasks_settings") or {})
            self.tasks_run = set(old.get("meta.tasks_run") or [])

    def _previous(self, identity: dict, overwrite: bool) -> dict:
        """What ``metrics.json`` holds of this evaluation ({} when new or damaged); another
        evaluation's report is refused, or removed with ``overwrite`` (:func:`_replace_other`)."""
        if not self.path.is_file():
            return {}
        try:
            old = read_json(self.path)
        except ValueError as exc:
            log.warning("%s; it is replaced", exc)
            return {}
        if not isinstance(old, dict):
            log.warning("%s: not a metrics mapping; it is replaced", self.path)
            return {}
        if not all(_same(k, old.get(k), identity[k]) for k in IDENTITY_KEYS):
            _replace_other(self.path, old, identity, overwrite=overwrite)
            return {}
        return old

    def is_done(self, key: str, fingerprint: str) -> bool:
        """Whether task ``key`` (``prefix + name``) was evaluated with this ``fingerprint``."""
        return not self.redo and self.done.get(key) == fingerprint

    def partial_state(self, key: str, fingerprint: str) -> dict:
        """The progress task ``key`` saved with this ``fingerprint`` before it was stopped ({} if none)."""
        saved = self.partial.get(key)
        if self.redo or not saved or saved.get("fingerprint") != fingerprint:
            return {}
        return dict(saved.get("state") or {})

    def save_partial(self, key: str, fingerprint: str, state: dict) -> None:
        self.partial[key] = {"fingerprint": fingerprint, "state": state}

    def forget(self, task: EvalTask, prefix: str) -> None:
        """Drop what the book holds of ``task`` on the network of ``prefix``: metrics, skips, done, partial."""
        drop = tuple(prefix + p for p in task.prefixes)
        self.metrics = {k: v for k, v in self.metrics.items() if not (drop and k.startswith(drop))}
        self.skipped = {k: v for k, v in self.skipped.items()
                        if not (k.startswith(prefix) and k[len(prefix):].startswith(task.name))}
        self.done.pop(prefix + task.name, None)
        self.partial.pop(prefix + task.name, None)
        self.settings.pop(prefix + task.name, None)
        for caption in self.task_figures.pop(prefix + task.name, []):
            self.figures.pop(caption, None)

    def record(self, task: EvalTask, prefix: str, fingerprint: str, result: tuple[dict, dict, dict],
               forget: Iterable[str] = (), settings: Optional[dict] = None) -> None:
        """Task ``task`` finished on the network of ``prefix``: ``result`` = (metrics, skipped, figures),
        keys already prefixed; ``settings``: what it was evaluated under (``meta.tasks_settings``;
        not recorded for a task ``skipped`` whole). Its earlier results on that network, and on the networks of
        ``forget`` (prefixes), are dropped."""
        for p in (prefix, *forget):
            self.forget(task, p)
        metrics, skipped, figures = result
        self.metrics.update(metrics)
        self.skipped.update(skipped)
        self.figures.update(figures)
        if figures:
            self.task_figures[prefix + task.name] = sorted(figures)
        self.done[prefix + task.name] = fingerprint
        self.tasks_run.add(task.name)
        self.note_settings(prefix + task.name, settings)

    def note_settings(self, key: str, settings: Optional[dict]) -> None:
        """Record what task ``key`` was evaluated under, unless already recorded or the whole task was
        skipped (no figures to describe). Also used for a task found done in a folder written
        before ``meta.tasks_settings`` existed: its fingerprint matched, so it had these settings."""
        if settings and key not in self.settings and key not in self.skipped:
            self.settings[key] = dict(settings)

    def as_dict(self, meta: dict) -> dict:
        """The flat ``metrics.json`` content: metrics, ``meta`` and the book's own ``meta.*`` keys."""
        if meta.get("meta.data") is None and self.data_meta.get("meta.data") is not None:
            meta = {**meta, **self.data_meta}  # figures of that data are kept: so is its description
        return {
            **self.metrics,
            **meta,
            "meta.tasks_run": [t for t in TASK_NAMES if t in self.tasks_run],
            "meta.tasks_skipped": dict(self.skipped),
            "meta.figures": dict(self.figures),
            "meta.task_figures": dict(sorted(self.task_figures.items(), key=lambda kv: _order(kv[0]))),
            "meta.tasks_done": dict(sorted(self.done.items(), key=lambda kv: _order(kv[0]))),
            "meta.tasks_partial": dict(self.partial),
            "meta.tasks_settings": dict(sorted(self.settings.items(), key=lambda kv: _order(kv[0]))),
        }

    def write(self, meta: dict) -> dict:
        """Write ``metrics.json`` (atomically) and return its content."""
        content = self.as_dict(meta)
        write_json(self.path, content)
        return content


def baseline_seed_in_effect(metrics: dict) -> Optional[int]:
    """The random-init baseline's seed the report can state: the latest call's
    ``meta.baseline_seed``, else (a call without a baseline, its figures kept from earlier calls) the
    one seed all the baseline's finished tasks were evaluated with; None when unknown or mixed."""
    if metrics.get("meta.baseline_seed") is not None:
        return metrics["meta.baseline_seed"]
    done = metrics.get("meta.tasks_done") or {}
    seeds = {s["baseline_seed"] for k, s in (metrics.get("meta.tasks_settings") or {}).items()
             if k in done and "baseline_seed" in s}
    return seeds.pop() if len(seeds) == 1 else None


def settings_differing(metrics: dict) -> dict[str, dict]:
    """``{task key: {setting: value}}`` of the tasks in ``metrics`` (a ``metrics.json`` content)
    evaluated under another value of a setting than the one the report states: the latest call's
    ``meta.<setting>``, for the baseline's seed :func:`baseline_seed_in_effect` (where the baseline
    tasks' seeds are mixed and no call states one, each baseline task is listed with its seed).
    Only the settings that differ, for the finished tasks recorded in ``meta.tasks_settings``; a
    task evaluated before that record existed is not listed (its settings are unknown)."""
    stated = {"views": metrics.get("meta.views_used"), "point_subsets": metrics.get("meta.point_subsets"),
              "baseline_seed": baseline_seed_in_effect(metrics), "weights": metrics.get("meta.weights"),
              "svm_Cs": metrics.get("meta.svm_Cs"), "svm_solver": metrics.get("meta.svm_solver")}
    # (few-shot and part-segmentation settings are stated per task in the report's setup: not listed)
    mixed_seeds = stated["baseline_seed"] is None
    done = metrics.get("meta.tasks_done") or {}
    out = {}
    for key, settings in (metrics.get("meta.tasks_settings") or {}).items():
        if key not in done:
            continue
        differ = {k: v for k, v in settings.items()
                  if (stated.get(k) is not None and v != stated[k]) or (k == "baseline_seed" and mixed_seeds)}
        if differ:
            out[key] = differ
    return out


def _order(key: str) -> tuple:
    """Run-network tasks first, then the baseline's, each in registry order."""
    base = key.startswith(BASELINE_PREFIX)
    name = key.removeprefix(BASELINE_PREFIX)
    return (base, TASK_NAMES.index(name) if name in TASK_NAMES else len(TASK_NAMES), name)
