"""Markdown report of an evaluation: the paper's Tables 1-4 with our numbers beside them.

:func:`render_report` turns the flat ``metrics`` dict of
:func:`xmodal.eval.runner.evaluate` (dotted keys, accuracies as fractions,
``meta.*`` describing the setup) into Markdown; :func:`write_report` writes it
atomically. Every table shows, per number: ours, the random-initialisation
baseline (``baseline.random.<key>``) and the difference when the baseline was
evaluated, and the paper's value (:mod:`xmodal.eval.paper_numbers`, in %)
where the paper reports one. Missing numbers are shown as ``–``.

After the setup, the sections are those of the tasks of :mod:`xmodal.eval.tasks`
(:func:`~xmodal.eval.tasks.report_tasks`: the paper's tables in order, then the others), each
rendered by the ``section_*`` function its registry entry names; figures come last.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from xmodal.eval import paper_numbers as P
from xmodal.eval.descriptors import D2_BINS, D2_PAIRS
from xmodal.eval.retrieval import D2_PREFIX, PSB_STATS
from xmodal.eval.resume import baseline_seed_in_effect, settings_differing
from xmodal.eval.tasks import report_tasks
from xmodal.utils.io import atomic_write

__all__ = [
    "TABLE_HEADERS",
    "ReportMetrics",
    "render_report",
    "write_report",
    "section_table1",
    "section_table2",
    "section_table3",
    "section_table4",
    "section_fewshot",
    "section_crossmodal",
]

#: section headers of the report (tests check that each is present)
TABLE_HEADERS = (
    "## Setup",
    "## Table 1",
    "## Table 2",
    "## Table 3",
    "## Table 4",
    "## Few-shot",
    "## Cross-modal retrieval",
    "## Figures",
)

BASE = "baseline.random."
_PSB_HEADER = {"nn": "NN", "ft": "FT", "st": "ST", "e": "E", "dcg": "DCG"}
DASH = "–"
_PARTSEG_PAPER_ROW = {"frozen": "CM-CV-Frozen", "scratch": "Supervised", "finetune": "CM-CV-Unfrozen"}
_PARTSEG_ORDER = ("frozen", "scratch", "finetune")


def _num(x: Any) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _pct(x: Any, digits: int = 1) -> str:
    v = _num(x)
    return DASH if v is None else f"{100.0 * v:.{digits}f}"


def _raw(x: Any, digits: int = 2) -> str:
    v = _num(x)
    return DASH if v is None else f"{v:.{digits}f}"


def _paper(x: Any, digits: int = 1) -> str:
    v = _num(x)
    return DASH if v is None else f"{v:.{digits}f}"


def _delta(a: Any, b: Any, *, pct: bool = True, digits: int = 1) -> str:
    va, vb = _num(a), _num(b)
    if va is None or vb is None:
        return DASH
    d = (va - vb) * (100.0 if pct else 1.0)
    return f"{d:+.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


class ReportMetrics:
    """The flat metrics of an evaluation as a report section reads them: ours, the baseline's, ``meta.*``."""

    def __init__(self, metrics: Mapping[str, Any]):
        self.m = dict(metrics)
        self.has_base = any(k.startswith(BASE) for k in self.m)

    def get(self, key: str) -> Any:
        return self.m.get(key)

    def base(self, key: str) -> Any:
        return self.m.get(BASE + key)

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.m)

    def cols(self, key: str, *, pct: bool = True, digits: int = 1) -> list[str]:
        """ours [, random, delta] for one key."""
        fmt = (lambda x: _pct(x, digits)) if pct else (lambda x: _raw(x, digits))
        out = [fmt(self.get(key))]
        if self.has_base:
            out += [fmt(self.base(key)), _delta(self.get(key), self.base(key), pct=pct, digits=digits)]
        return out

    def head(self, name: str = "ours") -> list[str]:
        return [name] + (["random init", "Δ"] if self.has_base else [])


def _skipped(m: ReportMetrics, *tasks: str) -> Optional[str]:
    sk = m.get("meta.tasks_skipped") or {}
    reasons = [f"`{t}`: {sk[t]}" for t in tasks if t in sk]
    return "; ".join(reasons) if reasons else None


def _point_features_text(meta: Mapping[str, Any]) -> str:
    """How the 3D features were taken (``meta.point_subsets``)."""
    subsets = int(meta.get("point_subsets") or 1)
    if subsets == 1:
        return ("Fp on one seeded random subset of each stored cloud, of the size the run trained on (all of it "
                "when the cloud is not larger)")
    return (f"the mean of Fp over {subsets} seeded subsets of each stored cloud, of the size the run trained on: "
            "consecutive blocks of one random permutation of its points (test-time averaging, beyond the paper)")


def _baseline_text(meta: Mapping[str, Any]) -> str:
    """What the random-init baseline is (``meta.baseline_seed`` against ``meta.run_seed``)."""
    seed = meta.get("baseline_seed")
    if seed is None:
        seeded = " (seeded)"
    elif seed == meta.get("run_seed"):
        seeded = f" (weights seeded with {seed}, the run's own training seed: the very weights it started from)"
    else:
        seeded = f" (weights seeded with {seed})"
    return ("`random init`: the same architecture at random initialisation, same protocol" + seeded
            + "; its BatchNorm layers keep their initial statistics (mean 0, variance 1) and so pass features "
            "through un-normalised")


def _section_setup(m: ReportMetrics, figures: Mapping[str, str]) -> list[str]:
    meta = {k[5:]: v for k, v in m.m.items() if k.startswith("meta.")}
    lines = ["## Setup", ""]
    ds = meta.get("dataset") or {}

    def item(name, value):
        if value not in (None, "", [], {}):
            lines.append(f"- **{name}**: {value}")

    item("run", f"`{meta.get('run')}`" if meta.get("run") else None)
    item("weights", _weights_text(meta))
    item("dataset", f"`{meta.get('data')}`" if meta.get("data") else None)
    if ds:
        counts = ds.get("counts") or {}
        item(
            "splits",
            ", ".join(f"{s} {n}" for s, n in counts.items())
            + f" objects; {ds.get('classes', '?')} classes; {ds.get('views', 0)} stored views per object; "
            f"{ds.get('points', '?')} points per cloud",
        )
    mode = meta.get("loss_mode")
    if mode:
        paper_row = {"cm-cv": "CM-CV", "cm": "CM"}.get(str(mode).lower())
        item(
            "run trained with",
            f"`{mode}` losses" + (f" — compare with the paper's {paper_row} rows" if paper_row else " (no paper row)"),
        )
    item("seed", meta.get("seed"))
    item("device", meta.get("device"))
    req, used = meta.get("views_requested"), meta.get("views_used")
    if req is not None:
        item("views v (2D tasks)", f"requested {list(req)}, used {list(used or [])} (capped at the dataset's stored views)")
    item("3D features", _point_features_text(meta))
    notes = meta.get("data_notes") or []
    item("data adapted to the run", "; ".join(notes) if notes else None)
    item(
        "2D features",
        "each object's feature is the max-pool of the Fimg features of v seeded-random distinct stored views "
        "(v = 1: a single view); the views for a smaller v are a subset of those for a larger v",
    )
    lines += _setup_task_protocols(m, meta)
    if m.has_base:
        item("baseline", _baseline_text({**meta, "baseline_seed": baseline_seed_in_effect(m.m)}))
    item("tasks run", ", ".join(meta.get("tasks_run") or []))
    lines += _other_settings_lines(m.m)
    sk = meta.get("tasks_skipped") or {}
    if sk:
        lines.append("- **skipped**:")
        lines += [f"  - `{t}`: {r}" for t, r in sk.items()]
    lines.append(
        "- Paper numbers are for ModelNet40 (Table 1 also ModelNet10) and ShapeNet-Part (Table 4); they are "
        "comparable with ours only on the same data. Accuracies are in %."
    )
    return lines + [""]


#: the SVM setup line's words for each ``svm.solver``
_SVM_SOLVER_TEXT = {
    "auto": "solved exactly by Newton's method up to 256 training samples, else by L-BFGS",
    "newton": "solved exactly by Newton's method (with more samples than features, from an L-BFGS fit; "
              "a fit it cannot finish keeps L-BFGS's, with a warning)",
    "lbfgs": "solved by L-BFGS",
}


def _setup_task_protocols(m: ReportMetrics, meta: Mapping[str, Any]) -> list[str]:
    """Setup lines for the protocol of each task whose figures are in this report (not the others')."""
    lines: list[str] = []

    def item(name, value):
        lines.append(f"- **{name}**: {value}")

    if m.has("svm"):
        item(
            "SVM (Table 2)",
            "Pipeline(StandardScaler, linear SVM: one-vs-rest squared hinge, liblinear's LinearSVC objective; "
            f"{_SVM_SOLVER_TEXT.get(meta.get('svm_solver', 'auto'), 'solver ?')}) fitted on the train "
            f"split; C chosen among {meta.get('svm_Cs', 'a log grid')} by stratified k-fold cross-validation on "
            "the train split only (folds reduced when a class is small); the test split is scored once, with C fixed",
        )
    if m.has("retrieval") or m.has(D2_PREFIX):
        lines += _setup_retrieval(m)
    if m.has("pretext."):
        item(
            "pretext (Table 1)",
            f"{m.get('pretext.num_pairs') or '?'} pairs of each kind from the test split, half positive, "
            "half negative; views drawn from a pool of "
            f"{m.get('pretext.view_pool') or '?'} seeded random stored views of each object (the largest v "
            "asked for: the figures change with it)",
        )
    kept = meta.get("tasks_settings") or {}
    if m.has("fewshot"):
        fs = {**{k: meta.get(k) for k in ("fewshot_query", "fewshot_episodes")}, **kept.get("fewshot", {})}
        item(
            "few-shot",
            "episodes drawn from the test split (as CrossPoint); support and query disjoint; "
            f"{fs.get('fewshot_query') or '?'} queries per class (fewer if unavailable), "
            f"{fs.get('fewshot_episodes') or '?'} episodes, linear SVM with C = 1",
        )
    ps = kept.get("partseg", {}).get("partseg")
    if m.has("partseg.") and ps:
        item(
            "part segmentation (Table 4)",
            f"{ps['epochs']} epochs of Adam, batch {ps['batch_size']}, lr {ps['lr']:g} (x{ps['gamma']:g} every "
            f"{ps['step_epochs']} epochs), "
            + (f"{ps['num_points']} points per shape" if ps.get("num_points") else "the data's points per shape")
            + (", DGCNN's scaling and translation of the training clouds" if ps.get("augment") else "")
            + f"; the test split scored after the last epoch (no checkpoint chosen); finetune's BatchNorm: "
            f"{ps.get('finetune_point_bn', '?')}",
        )
    if m.get("crossmodal.gallery_size") is not None:
        item(
            "cross-modal retrieval",
            f"{m.get('crossmodal.gallery_size')} test objects as queries and gallery (one random view each), "
            "ranked by Ff's 'same object' probability",
        )
    return lines


def _weights_text(meta: Mapping[str, Any]) -> Optional[str]:
    """Which of the run's weights the figures are from (``meta.run_step`` / ``run_source`` / ``weights``)."""
    if meta.get("run_step") is None:
        return None
    source = {"final": "the finished run's encoders", "last": "the last checkpoint: **the run had not finished**",
              "random": "random initialisation"}.get(meta.get("run_source"), meta.get("run_source") or "?")
    if meta.get("run_checkpoint_step") is not None:
        source = (f"the encoders of the run before it was extended: **its last checkpoint is at step "
                  f"{meta['run_checkpoint_step']}**, the extension has not finished")
    return f"step {meta['run_step']} ({source}); digest `{meta.get('weights') or '?'}`"


#: how the report names the per-task settings of ``meta.tasks_settings``
_SETTING_NAMES = {"views": "views", "point_subsets": "point subsets", "baseline_seed": "baseline seed",
                  "weights": "weights", "svm_Cs": "SVM C grid", "svm_solver": "SVM solver"}


def _other_settings_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The tasks of this folder evaluated by an earlier call under other settings than the above."""
    differing = settings_differing(dict(metrics))
    if not differing:
        return []
    lines = ["- **evaluated by an earlier call under other settings** than those above (`--task` with these "
             "tasks and the settings above evaluates them again; their fingerprints differ, so no `--redo` is "
             "needed):"]
    for key, settings in differing.items():
        said = ", ".join(f"{_SETTING_NAMES.get(k, k)} {v}" for k, v in settings.items())
        lines.append(f"  - `{key}`: {said}")
    return lines


def _setup_retrieval(m: ReportMetrics) -> list[str]:
    """Setup lines describing the retrieval protocol, its PSB statistics and the D2 reference."""
    lines = [
        "- **retrieval (Table 3)**: every test object queries a gallery of the other test objects (itself "
        "excluded); Euclidean distance of global features; a query scores at K when an object of its class is "
        "among its K nearest"
    ]
    if m.has("retrieval3d.nn") or m.has("retrieval2d."):
        lines.append(
            "- **PSB retrieval statistics**: NN, first tier, second tier, E-measure (top 32) and DCG as the Princeton "
            "Shape Benchmark's psbTable computes them, averaged over queries; objects of classes with fewer than 3 "
            "test objects, or of the miscellaneous class '-1', are not queries (they stay in the galleries)"
        )
    if m.has(D2_PREFIX):
        lines.append(
            f"- **D2 reference**: a non-learned 3D descriptor, the D2 shape distribution (Osada et al. 2002): a "
            f"{D2_BINS}-bin histogram over [0, 2] of the distances of {D2_PAIRS} seeded random pairs of each stored "
            "(unit-sphere) test cloud's points, retrieved with the same protocol"
        )
    return lines


def section_table1(m: ReportMetrics) -> list[str]:
    lines = [
        "## Table 1 — pretext task: cross-modality accuracy and cross-view pair distance",
        "",
    ]
    why = _skipped(m, "pretext")
    if not m.has("pretext."):
        return lines + [f"_Not evaluated{': ' + why if why else ''}._", ""]
    p40, p10 = P.TABLE1["ModelNet40"], P.TABLE1["ModelNet10"]
    header = ["metric"] + m.head() + ["paper MN40 CM", "paper MN40 CM-CV", "paper MN10 CM", "paper MN10 CM-CV"]
    rows = []
    spec = [
        ("cross-modality accuracy (%) (Fp, Ff)", "cm_accuracy", True, 1),
        ("positive mPD (Fimg)", "cv_pos_mean", False, 2),
        ("positive PD std", "cv_pos_std", False, 2),
        ("negative mPD (Fimg)", "cv_neg_mean", False, 2),
        ("negative PD std", "cv_neg_std", False, 2),
    ]
    for name, key, pct, d in spec:
        paper = [_paper(t[net][key], 1 if pct else 2) for t in (p40, p10) for net in ("CM", "CM-CV")]
        rows.append([name] + m.cols(f"pretext.{key}", pct=pct, digits=d) + paper)
    lines += _table(header, rows)
    lines += [
        "",
        f"Cross-modality accuracy on positive / negative pairs: {_pct(m.get('pretext.cm_accuracy_pos'))} / "
        f"{_pct(m.get('pretext.cm_accuracy_neg'))} %.",
        "",
    ]
    return lines


def _views_in(m: ReportMetrics, prefix: str) -> list[int]:
    vs = set()
    pat = re.compile(re.escape(prefix) + r"(\d+)(\.|$)")
    for k in m.m:
        if k.startswith(BASE):
            continue
        mt = pat.match(k)
        if mt:
            vs.add(int(mt.group(1)))
    return sorted(vs)


def section_table2(m: ReportMetrics) -> list[str]:
    lines = ["## Table 2 — 2D and 3D shape recognition (linear SVM on frozen features)", ""]
    if not (m.has("svm2d.") or m.has("svm3d.")):
        why = _skipped(m, "svm")
        return lines + [f"_Not evaluated{': ' + why if why else ''}._", ""]
    header = ["task", "#views"] + m.head("ours (%)") + ["chosen C", "CV acc (%)", "paper CM", "paper CM-CV"]
    rows = []
    t2 = P.TABLE2
    for v in _views_in(m, "svm2d.accuracy."):
        rows.append(
            ["2D (Fimg)", str(v)]
            + m.cols(f"svm2d.accuracy.{v}")
            + [_raw(m.get(f"svm2d.C.{v}"), 3), _pct(m.get(f"svm2d.cv_score.{v}"))]
            + [_paper(t2["svm2d"]["CM"].get(v)), _paper(t2["svm2d"]["CM-CV"].get(v))]
        )
    if m.get("svm3d.accuracy") is not None:
        rows.append(
            ["3D (Fp)", "—"]
            + m.cols("svm3d.accuracy")
            + [_raw(m.get("svm3d.C"), 3), _pct(m.get("svm3d.cv_score"))]
            + [_paper(t2["svm3d"]["CM"]), _paper(t2["svm3d"]["CM-CV"])]
        )
    lines += _table(header, rows)
    why = _skipped(m, "svm2d", "svm3d")
    if why:
        lines += ["", f"Skipped: {why}."]
    return lines + [""]


def _top_ks(m: ReportMetrics, prefixes: tuple[str, ...]) -> tuple[int, ...]:
    """The K values of the ``<prefix>…top<K>`` metrics present under ``prefixes``, in order."""
    tails = (k.rsplit(".top", 1) for k in m.m if k.startswith(prefixes))
    return tuple(sorted({int(t[1]) for t in tails if len(t) == 2 and t[1].isdigit()}))


def section_table3(m: ReportMetrics) -> list[str]:
    # the K values evaluated (``retrieval.ks``), else the paper's
    ks = _top_ks(m, ("retrieval2d.", "retrieval3d.")) or tuple(P.TABLE3_KS)
    lines = ["## Table 3 — 2D and 3D shape retrieval (top-K accuracy, %)", ""]
    if not (m.has("retrieval2d.") or m.has("retrieval3d.")):
        why = _skipped(m, "retrieval")
        return lines + [f"_Not evaluated{': ' + why if why else ''}._", ""]
    header = ["network", "views"] + [f"Top{k}" for k in ks] + ["mAP"]
    rows = []

    def block(label: str, views: str, prefix: str, paper: Mapping[str, Sequence[float]], extra=()):
        rows.append([f"{label} (ours)", views] + [_pct(m.get(f"{prefix}.top{k}")) for k in ks] + [_pct(m.get(f"{prefix}.map"))])
        if m.has_base:
            rows.append(
                [f"{label} (random init)", views]
                + [_pct(m.base(f"{prefix}.top{k}")) for k in ks]
                + [_pct(m.base(f"{prefix}.map"))]
            )
            rows.append(
                ["Δ ours − random", views]
                + [_delta(m.get(f"{prefix}.top{k}"), m.base(f"{prefix}.top{k}")) for k in ks]
                + [_delta(m.get(f"{prefix}.map"), m.base(f"{prefix}.map"))]
            )
        rows.extend(extra)
        for name, vals in paper.items():
            by_k = dict(zip(P.TABLE3_KS, vals))
            rows.append([f"paper {name}", views] + [_paper(by_k.get(k)) for k in ks] + [DASH])

    d2 = f"{D2_PREFIX}retrieval3d"
    d2_row = [["D2 (no learning)", "—"] + [_pct(m.get(f"{d2}.top{k}")) for k in ks] + [_pct(m.get(f"{d2}.map"))]]
    if m.has("retrieval3d."):
        paper3d = {f"Fp-{k}": v for k, v in P.TABLE3["retrieval3d"].items()}
        block("Fp", "—", "retrieval3d", paper3d, extra=d2_row if m.has(d2 + ".") else ())
    for v in _views_in(m, "retrieval2d."):
        paper = P.TABLE3["retrieval2d"].get(v, {})
        block("Fimg", str(v), f"retrieval2d.{v}", {(n if n == "ImageNet" else f"Fimg-{n}"): x for n, x in paper.items()})
    lines += _table(header, rows)
    why = _skipped(m, "retrieval2d", "retrieval3d")
    if why:
        lines += ["", f"Skipped: {why}."]
    return lines + [""] + _psb_table(m)


def _psb_table(m: ReportMetrics) -> list[str]:
    """The PSB statistics (NN, FT, ST, E, DCG) of 3D, the D2 reference and each 2D view count."""
    sets = [("Fp", "—", "retrieval3d")] + [("Fimg", str(v), f"retrieval2d.{v}") for v in _views_in(m, "retrieval2d.")]
    rows = []
    for label, views, prefix in sets:
        if m.get(f"{prefix}.nn") is None:
            continue
        rows.append([f"{label} (ours)", views] + [_pct(m.get(f"{prefix}.{k}")) for k in PSB_STATS])
        if m.has_base:
            rows.append([f"{label} (random init)", views] + [_pct(m.base(f"{prefix}.{k}")) for k in PSB_STATS])
        if prefix == "retrieval3d" and m.get(f"{D2_PREFIX}{prefix}.nn") is not None:
            rows.append(["D2 (no learning)", views] + [_pct(m.get(f"{D2_PREFIX}{prefix}.{k}")) for k in PSB_STATS])
    if not rows:
        return []
    header = ["network", "views"] + [_PSB_HEADER[k] for k in PSB_STATS]
    return (
        ["### Princeton Shape Benchmark statistics (%)", ""]
        + _table(header, rows)
        + ["", "As the benchmark's psbTable tool computes them (see Setup); the paper reports none of them.", ""]
    )


#: a training fraction's key in the metrics, in percent (:func:`xmodal.eval.partseg.percent_key`:
#: ``"5"``, ``"100"``, ``"2.5"``, ``"0.5"``)
_PCT = r"(\d+(?:\.\d+)?)"


def _percent_label(p: str) -> str:
    """``"5" -> "5%"``, ``"0.5" -> "0.5%"``: the keys are percentages already, whatever their size."""
    try:
        v = float(p)
    except ValueError:
        return p
    return f"{v:g}%"


def _one_per_category_notes(m: ReportMetrics) -> dict[str, str]:
    """``{percent: note}`` for the training fractions that gave a category one shape it would not have had."""
    notes = {}
    for k, v in m.m.items():
        mt = re.match(r"^partseg\." + _PCT + r"\.one_per_category$", k)
        if mt and v is True:
            n = m.get(f"partseg.{mt.group(1)}.n_train")
            notes[mt.group(1)] = (
                f"† {_percent_label(mt.group(1))} of the train split would leave a category without a labelled "
                f"shape; each such category takes one shape ({n if n is not None else '?'} training shapes in all)."
            )
    return notes


def _shapes(n: Any) -> str:
    """`` (14 shapes)``: how many training shapes a fraction gave (small fractions round up)."""
    return f" ({n} shapes)" if isinstance(n, int) else ""


def section_table4(m: ReportMetrics) -> list[str]:
    lines = ["## Table 4 — 3D part segmentation (ShapeNet-Part protocol)", ""]
    pat = re.compile(r"^partseg\.([^.]+)\." + _PCT + r"\.(oa|class_miou|instance_miou|face_accuracy)$")
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for k, v in m.m.items():
        mt = pat.match(k)
        if mt:
            found.setdefault((mt.group(1), mt.group(2)), {})[mt.group(3)] = v
    if not found:
        why = _skipped(m, "partseg")
        return lines + [f"_Not evaluated{': ' + why if why else ''}._", ""]

    def pct_key(p: str) -> float:
        try:
            return float(p)
        except ValueError:
            return float("inf")

    def set_key(s: str) -> int:
        return _PARTSEG_ORDER.index(s) if s in _PARTSEG_ORDER else len(_PARTSEG_ORDER)

    faces = any("face_accuracy" in vals for vals in found.values())
    notes = _one_per_category_notes(m)
    header = (
        ["setting", "training data", "OA", "class mIoU", "instance mIoU"] + (["face acc."] if faces else [])
        + ["paper row", "paper OA", "paper class mIoU", "paper instance mIoU", "Δ inst. mIoU vs scratch"]
    )
    rows = []
    for (setting, pct) in sorted(found, key=lambda sp: (-pct_key(sp[1]), set_key(sp[0]), sp[0])):
        vals = found[(setting, pct)]
        try:
            pv = float(pct)
            paper_pct = int(pv) if pv == int(pv) else None  # the paper's fractions are whole percents
        except ValueError:
            paper_pct = None
        row_name = _PARTSEG_PAPER_ROW.get(setting)
        paper = P.TABLE4.get(paper_pct, {}).get(row_name) if row_name else None
        scratch = found.get(("scratch", pct), {}).get("instance_miou")
        rows.append(
            [setting, _percent_label(pct) + _shapes(m.get(f"partseg.{pct}.n_train")) + (" †" if pct in notes else "")]
            + [_pct(vals.get(k)) for k in ("oa", "class_miou", "instance_miou") + (("face_accuracy",) if faces else ())]
            + [row_name or DASH]
            + ([_paper(x) for x in paper] if paper else [DASH] * 3)
            + [DASH if setting == "scratch" else _delta(vals.get("instance_miou"), scratch)]
        )
    lines += _table(header, rows)
    lines += [
        "",
        "`frozen`: Fp frozen, only the new head trained; `scratch`: Fp and head randomly initialised and trained "
        "(the paper's supervised baseline — the random-init baseline of this table); `finetune`: pre-trained Fp "
        "and head all trained. Paper rows compared: the CM-CV (full method) networks and the supervised baseline.",
        "",
    ]
    if faces:
        lines += [
            "face acc.: area-weighted face labelling accuracy of the meshes (each face takes the prediction of "
            "the sampled point nearest its centroid), averaged over the test shapes. The paper's figures are "
            "ShapeNet-Part's; on other data they are not comparable.",
            "",
        ]
    for pct in sorted(notes, key=lambda p: -float(p)):
        lines += [notes[pct], ""]
    return lines


def section_fewshot(m: ReportMetrics) -> list[str]:
    lines = ["## Few-shot linear evaluation (beyond the paper)", ""]
    pat = re.compile(r"^fewshot(2d|3d)\.(\d+w\d+s)\.mean$")
    settings: dict[str, set] = {}
    for k in m.m:
        mt = pat.match(k)
        if mt:
            settings.setdefault(mt.group(2), set()).add(mt.group(1))
    if not settings:
        why = _skipped(m, "fewshot")
        return lines + [f"_Not evaluated{': ' + why if why else ''}._", ""]

    def ms(key_prefix: str, base: bool = False) -> str:
        get = m.base if base else m.get
        mean, std = _num(get(f"{key_prefix}.mean")), _num(get(f"{key_prefix}.std"))
        return DASH if mean is None else f"{100 * mean:.1f} ± {100 * (std or 0.0):.1f}"

    dims = [d for d in ("3d", "2d") if any(d in s for s in settings.values())]
    header = ["setting"]
    for d in dims:
        label = "3D (Fp)" if d == "3d" else f"2D (Fimg, {m.get('meta.fewshot2d_views') or '?'} views)"
        header += [label] + ([f"{label} random init"] if m.has_base else [])
    rows = []

    def order(s: str):
        n, k = s.rstrip("s").split("w")
        return int(n), int(k)

    for s in sorted(settings, key=order):
        row = [s]
        for d in dims:
            row.append(ms(f"fewshot{d}.{s}"))
            if m.has_base:
                row.append(ms(f"fewshot{d}.{s}", base=True))
        rows.append(row)
    lines += _table(header, rows)
    lines += ["", "Accuracy on the query objects, mean ± std over episodes (%)."]
    sk = m.get("meta.tasks_skipped") or {}
    notes = [f"`{k}`: {r}" for k, r in sk.items() if k.startswith("fewshot")]
    if notes:
        lines += ["", "Skipped: " + "; ".join(notes) + "."]
    return lines + [""]


def section_crossmodal(m: ReportMetrics) -> list[str]:
    lines = ["## Cross-modal retrieval (beyond the paper)", ""]
    if not m.has("crossmodal."):
        why = _skipped(m, "crossmodal")
        return lines + [f"_Not evaluated{': ' + why if why else ''}._", ""]
    ks = _top_ks(m, ("crossmodal.img2shape.",))
    cols = [f"top{k}" for k in ks] + ["exact1"]
    header = ["direction"] + [f"{c} (%)" for c in cols]
    rows = []
    for d in ("img2shape", "shape2img"):
        name = "image → shape" if d == "img2shape" else "shape → image"
        rows.append([f"{name} (ours)"] + [_pct(m.get(f"crossmodal.{d}.{c}")) for c in cols])
        if m.has_base:
            rows.append([f"{name} (random init)"] + [_pct(m.base(f"crossmodal.{d}.{c}")) for c in cols])
            rows.append(["Δ ours − random"] + [_delta(m.get(f"crossmodal.{d}.{c}"), m.base(f"crossmodal.{d}.{c}")) for c in cols])
    lines += _table(header, rows)
    lines += [
        "",
        "top-K: an item of the query's class among the K best-ranked; exact1: the best-ranked item is the "
        f"query's own counterpart (chance: 1/{m.get('crossmodal.gallery_size') or 'n'}).",
        "",
    ]
    return lines


def _section_figures(figures: Mapping[str, str]) -> list[str]:
    lines = ["## Figures", ""]
    if not figures:
        return lines + ["_No figures were drawn._", ""]
    for title, rel in figures.items():
        lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    return lines


def render_report(metrics: Mapping[str, Any], *, figures: Optional[Mapping[str, str]] = None, title: str = "xmodal evaluation report") -> str:
    """Markdown text of the report. figures: ``{caption: path relative to the report}``."""
    m = ReportMetrics(metrics)
    figures = dict(figures or {})
    lines = [f"# {title}", ""]
    lines += _section_setup(m, figures)
    for task in report_tasks():
        lines += task.section_function()(m)
    lines += _section_figures(figures)
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    metrics: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    figures: Optional[Mapping[str, str]] = None,
    title: str = "xmodal evaluation report",
) -> Path:
    """Render the report and write it atomically to ``path``."""
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write(render_report(metrics, figures=figures, title=title))
    return path
