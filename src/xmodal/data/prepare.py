"""The ``prepare`` job: meshes / point clouds -> a dataset store (views + point clouds).

For every object of a source (paper §3.1) ``prepare`` renders ``views`` images from
random cameras (azimuth 10-340°, polar 10-165°, Phong shading, two opposite lights)
and samples a ``points``-point cloud, and writes them into the store described in
:mod:`xmodal.data.store`.

The job is

* **deterministic**: each object's random numbers come from ``(seed, object id)``
  only, so the result does not depend on ``workers``, ``chunk_size`` or resumption;
* **resumable**: objects are planned once (``plan.json``) and cut into chunks; each
  chunk becomes one atomically written shard, so after an interruption a re-run with
  the same settings skips every chunk whose shard exists;
* **fault tolerant**: an object that cannot be loaded or rendered is recorded in
  ``failed/`` and the manifest (path, id, reason) and skipped;
* **parallel** over chunks with ``workers`` processes (``spawn``: OpenGL contexts and
  ``fork`` do not mix), each owning one renderer;
* **stoppable**: on SIGTERM/SIGINT the chunks in progress are abandoned after their current
  object (worker processes ignore the signals and stop when told to, so none dies mid-write),
  the pool shuts down, and :class:`~xmodal.errors.Interrupted` says how many shards are
  written; the same command finishes the job;
* **shardable over machines**: ``shard="I/N"`` builds only the chunks of part I
  (:mod:`xmodal.data.sharding`); ``plan.json`` and the part's manifest record the part, and
  :func:`xmodal.data.merge.merge_datasets` joins the N parts into the unsharded dataset.

One process writes a dataset folder at a time (:func:`xmodal.utils.lock.output_lock`).
``manifest.json`` is written last, so its presence means the dataset (or part) is complete.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import reprlib
import shutil
import signal
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from xmodal.config import save_config
from xmodal.data import crash, mesh_limit
from xmodal.data.crash import file_stat
from xmodal.data.geometry import normalize_unit_sphere
from xmodal.data.store import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PLAN_NAME,
    failed_relpath,
    StoreContents,
    make_manifest,
    shard_relpath,
    shard_rows,
    write_shard,
)
from xmodal.data.mesh_limit import MeshLimit, MeshTooLarge
from xmodal.data.prepare_config import PrepareConfig
from xmodal.data.sharding import format_shard, parse_shard, shard_chunks
from xmodal.data.types import Item, Mesh, MeshError, PointCloud, Source
from xmodal.errors import ConfigError, Interrupted, MissingPackageError, OutputExistsError, PrepareError, XmodalError
from xmodal.utils.io import read_json, write_json
from xmodal.utils.lock import output_lock
from xmodal.utils.signals import StopRequest, die_with_parent, ignore_stop_signals

__all__ = ["prepare", "object_seeds", "finalize_store", "clear_outputs", "plan_key", "describe_difference",
           "PrepareConfig", "PrepareError", "CONFIG_NAME"]

log = logging.getLogger(__name__)

_SPLIT_ORDER = {"train": 0, "test": 1}
#: the resolved config, written beside the dataset
CONFIG_NAME = "prepare.yaml"


def object_seeds(seed: int, object_id: str) -> tuple[int, int]:
    """Seeds ``(views_seed, points_seed)`` of one object, a function of ``(seed, id)`` only.

    ``zlib.crc32`` (not ``hash``) keeps them stable across processes and Python runs.
    """
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(object_id.encode("utf-8", "surrogateescape"))])
    a, b = ss.generate_state(2)
    return int(a), int(b)


# --------------------------------------------------------------------------- per object


class _Context:
    """Everything a (worker) process needs to prepare chunks."""

    def __init__(self, source: Source, settings: dict, out: Path, classes: list[str], has_point_labels: bool):
        self.source = source
        self.settings = settings
        self.out = out
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.has_point_labels = has_point_labels
        self._renderer = None

    @property
    def renderer(self):
        if self._renderer is None:
            from xmodal.data.render import Renderer

            s = self.settings
            try:
                self._renderer = Renderer(s["image_size"], grayscale=s["grayscale"], up_axis=self.source.up_axis)
            except MissingPackageError:
                raise
            except Exception as exc:  # not a problem of the mesh at hand: every object would fail alike
                raise PrepareError(
                    f"cannot create the renderer ({type(exc).__name__}: {exc})",
                    hint="headless rendering needs EGL (Mesa's libEGL) or a display; views=0 prepares points only",
                ) from exc
        return self._renderer

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def _process_object(ctx: _Context, item: Item) -> dict[str, np.ndarray]:
    """Load, sample and render one object. Raises on any problem with that object."""
    from xmodal.data.render import sample_view_angles
    from xmodal.data.sampling import farthest_point_sampling, sample_point_cloud

    s = ctx.settings
    n_views, n_points = s["effective_views"], s["points"]
    views_seed, points_seed = object_seeds(s["seed"], item.id)
    limit = s.get("mesh_limit")  # a MeshLimit: refuse a mesh too large to hold, before reading it
    if limit is not None and ctx.source.kind == "mesh" and item.path:
        limit.check_file(item.path)
    obj = ctx.source.load(item)
    where = item.path or item.id
    out: dict[str, np.ndarray] = {}
    angles = sample_view_angles(n_views, seed=views_seed) if n_views else None
    if isinstance(obj, Mesh):
        if limit is not None:  # formats without counts in the header, before sampling and rendering
            limit.check(where, len(obj.vertices), len(obj.faces))
        pc = sample_point_cloud(obj, n_points, oversample=s["oversample"], seed=points_seed)
        pts, labels = pc.points, pc.point_labels
        if n_views:
            out["images"] = ctx.renderer.render_mesh(obj, angles)
    elif isinstance(obj, PointCloud):
        pts = np.asarray(obj.points, dtype=np.float32)
        labels = obj.point_labels
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise MeshError(where, f"point cloud must be (N, 3), got {pts.shape}")
        if len(pts) < n_points:
            raise MeshError(where, f"has {len(pts)} points, fewer than the {n_points} asked for")
        if len(pts) > n_points:
            idx = farthest_point_sampling(pts, n_points, seed=points_seed)
            pts = pts[idx]
            labels = None if labels is None else np.asarray(labels)[idx]
        pts = normalize_unit_sphere(pts)[0].astype(np.float32)
        if n_views:
            out["images"] = ctx.renderer.render_points(pts, angles)
    else:
        raise TypeError(f"source returned {type(obj).__name__} for {item.id}, expected Mesh or PointCloud")
    if pts.shape != (n_points, 3) or not np.isfinite(pts).all():
        raise MeshError(where, f"sampled point cloud is invalid (shape {pts.shape}, finite {np.isfinite(pts).all()})")
    out["points"] = pts
    if ctx.has_point_labels:
        out["point_labels"] = np.full(n_points, -1, np.int16) if labels is None else np.asarray(labels, np.int16)
    if n_views:
        out["cameras"] = np.asarray(angles, dtype=np.float32)
    return out


def _failure_reason(exc: Exception, item: Item) -> str:
    """The ``reason`` recorded for a skipped object; it names the file at fault when that is
    not the object's own (e.g. a mesh's labels file)."""
    if not isinstance(exc, MeshError):
        return f"{type(exc).__name__}: {exc}"
    return exc.reason if exc.path in (item.path, item.id) else str(exc)


def _prepare_one(ctx: _Context, split: str, chunk: int, item: Item, rows: list, ok_items: list, failures: list,
                 crashes: dict, in_flight: crash.InFlight) -> int:
    """Prepare ``item`` into ``rows`` / ``ok_items``, or record its failure; returns 1 for a failure."""
    known = crash.crash_reason(crashes, item)  # it killed a process before, its file unchanged
    if known is None:
        in_flight(split, chunk, item)  # outside the try: a failed write stops the job, not the object
    try:
        if known is not None:
            raise MeshError(item.path or item.id, known)
        rows.append(_process_object(ctx, item))
        ok_items.append(item)
        return 0
    except PrepareError:  # the job's own set-up (the renderer), not this object: stop, record nothing
        raise
    except Exception as exc:  # any problem with one object skips that object only
        reason = _failure_reason(exc, item)
        failures.append({"path": item.path, "id": item.id, "reason": reason,
                         RETRY_KEY: _retry_record(exc, item, ctx.settings.get("limit_inputs"))})
        log.warning("skipping %s (%s): %s", item.id, item.path or "generated", reason)
        return 1


def _run_chunk(ctx: _Context, split: str, chunk: int, items: list[Item], report=None,
               should_stop: Optional[Callable[[], bool]] = None) -> Optional[tuple[int, int]]:
    """Prepare one chunk and write its failures and (last) its shard. Returns (ok, failed), or
    None when ``should_stop()`` turned true before an object: the chunk is abandoned, nothing written."""
    s = ctx.settings
    rows: list[dict[str, np.ndarray]] = []
    ok_items: list[Item] = []
    failures: list[dict] = []
    crashes = s.get("crashes") or {}
    with crash.InFlight(ctx.out) as in_flight:
        for item in items:
            if should_stop is not None and should_stop():
                return None
            bad = _prepare_one(ctx, split, chunk, item, rows, ok_items, failures, crashes, in_flight)
            if report is not None:
                report(1, bad)
    n, v, size = len(rows), s["effective_views"], s["image_size"]
    arrays: dict[str, Any] = {
        "ids": [it.id for it in ok_items],
        "labels": np.asarray([ctx.class_index[it.label] for it in ok_items], dtype=np.int64),
        "points": np.stack([r["points"] for r in rows]) if rows else np.zeros((0, s["points"], 3), np.float32),
    }
    if ctx.has_point_labels:
        arrays["point_labels"] = (
            np.stack([r["point_labels"] for r in rows]) if rows else np.zeros((0, s["points"]), np.int16)
        )
    if v:
        img_shape = (v, size, size) if s["grayscale"] else (v, size, size, 3)
        arrays["images"] = np.stack([r["images"] for r in rows]) if rows else np.zeros((0,) + img_shape, np.uint8)
        arrays["cameras"] = np.stack([r["cameras"] for r in rows]) if rows else np.zeros((0, v, 2), np.float32)
    failed_path = ctx.out / failed_relpath(split, chunk)
    if failures:
        write_json(failed_path, failures)
    elif failed_path.exists():  # stale record of an earlier attempt
        failed_path.unlink()
    # the shard is the chunk's completion marker: written last, atomically
    write_shard(ctx.out / shard_relpath(split, chunk), arrays, attrs={"split": split, "chunk": chunk})
    return n, len(failures)


#: the key of a ``failed/`` record that says when the object is worth trying again (not in the manifest)
RETRY_KEY = "retry"


# worker-process state (spawn context: set by the pool initializer)
_WORKER: dict[str, Any] = {}


def _worker_init(source: Source, settings: dict, out: str, classes: list[str], has_pl: bool, q, abandon,
                 main_pid: int) -> None:
    # SIGTERM/SIGINT sent to the whole process group (Ctrl-C, a scheduler) are the main
    # process's to handle: it sets ``abandon``, and a worker stops between two objects
    ignore_stop_signals()
    # a worker whose main process was killed (kill -9) would otherwise wait on its queue forever
    die_with_parent(main_pid)
    # Mesa's llvmpipe starts one raster thread per CPU in every process; with W worker
    # processes that oversubscribes the cores, so each worker rasterises on one thread
    # unless the user chose otherwise. Must be set before the GL context is created.
    os.environ.setdefault("LP_NUM_THREADS", "1")
    _WORKER["ctx"] = _Context(source, settings, Path(out), classes, has_pl)
    _WORKER["queue"] = q
    _WORKER["abandon"] = abandon
    _WORKER["parent"] = os.getppid()


def _worker_should_stop() -> bool:
    """A worker abandons its chunk when the main process asks it to, or has died (``kill -9``)."""
    return _WORKER["abandon"].is_set() or os.getppid() != _WORKER["parent"]


def _worker_chunk(split: str, chunk: int, items: list[Item]) -> Optional[tuple[int, int]]:
    q = _WORKER["queue"]
    key = (split, chunk)
    return _run_chunk(_WORKER["ctx"], split, chunk, items, report=lambda a, b: q.put((key, a, b)),
                      should_stop=_worker_should_stop)


# --------------------------------------------------------------------------- plan


def _plan_items(source: Source) -> dict[str, list[Item]]:
    """Items per split (train, test, others), in a fixed order.

    Meshes are ordered by id. Point-cloud sources (rows of HDF5 files) are ordered by
    ``(path, row)``: those files are compressed in blocks of rows, so reading rows in
    file order decompresses each block once (~100x faster than id order).
    """
    by_split: dict[str, list[Item]] = {}
    for it in source.items:
        by_split.setdefault(it.split, []).append(it)
    ordered = sorted(by_split, key=lambda s: (_SPLIT_ORDER.get(s, 2), s))
    if source.kind == "points":
        key = lambda it: (it.path or "", int(it.index), it.id)  # noqa: E731
    else:
        key = lambda it: it.id  # noqa: E731
    out = {}
    for split in ordered:
        items = sorted(by_split[split], key=key)
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise PrepareError(f"source has duplicate ids in split '{split}'")
        out[split] = items
    return out


def _item_record(it: Item) -> dict:
    return {"id": it.id, "label": it.label, "path": it.path, "index": int(it.index)}


def identity_settings(plan: dict) -> dict:
    """The settings of ``plan`` that make a dataset another one. Not ``test_ratio``: it only decides
    which objects are test objects, and the object list per split is compared on its own
    (:func:`plan_key`), so a ratio the source does not use (ModelNet's split folders) changes nothing."""
    return {k: v for k, v in (plan.get("settings") or {}).items() if k != "test_ratio"}


def plan_key(plan: dict) -> dict:
    """What must match for a resume: settings (but ``test_ratio``: its effect is the object list's),
    the source's seed, classes, the object list per split (not file paths) and the part.

    The source's own seed counts because a generated source (``builtin:shapes?seed=S``) draws other
    shapes under the same ids and labels; for file sources it is the settings' seed, or unused. Its
    up axis counts because one folder can be read by two readers with the same ids (a Labeled PSB
    folder, y-up with part labels, becomes a plain z-up mesh folder once its labels files go).
    """
    return {
        "format_version": plan.get("format_version"),
        "settings": identity_settings(plan),
        "source_seed": (plan.get("source") or {}).get("seed"),
        "source_up_axis": (plan.get("source") or {}).get("up_axis"),
        "classes": plan.get("classes"),
        "items": {s: [(r["id"], r["label"]) for r in recs] for s, recs in plan.get("items", {}).items()},
        "shard": plan.get("shard"),
    }


def _plan_shard(plan: dict) -> Optional[tuple[int, int]]:
    """``(I, N)`` of a part's plan, None for a whole dataset."""
    shard = plan.get("shard")
    return None if shard is None else (int(shard["index"]), int(shard["count"]))


def describe_difference(old: dict, new: dict) -> str:
    """The settings, lists and part in which two plans differ (``"points: 256 -> 128, the object list"``)."""
    a, b = plan_key(old), plan_key(new)
    diffs = []
    sa, sb = a["settings"] or {}, b["settings"] or {}
    for k in sorted(set(sa) | set(sb)):
        if sa.get(k) != sb.get(k):
            diffs.append(f"{k}: {sa.get(k)!r} -> {sb.get(k)!r}")
    for key, what in (("source_seed", "seed"), ("source_up_axis", "up axis")):
        if a[key] != b[key]:
            diffs.append(f"the source's {what}: {a[key]!r} -> {b[key]!r}")
    if a["classes"] != b["classes"]:
        diffs.append("the class list")
    if a["items"] != b["items"]:
        diffs.append("the object list")
    if a["format_version"] != b["format_version"]:
        diffs.append(f"format_version {a['format_version']} -> {b['format_version']}")
    if a["shard"] != b["shard"]:
        part_a, part_b = _plan_shard(old), _plan_shard(new)
        diffs.append(f"shard: {format_shard(part_a) if part_a else 'none'} -> "
                     f"{format_shard(part_b) if part_b else 'none'}")
    return ", ".join(diffs) or "unknown"


def clear_outputs(out: Path) -> None:
    """Remove what ``prepare`` writes (and nothing else) from ``out``."""
    for sub in ("shards", "failed"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    for name in (MANIFEST_NAME, PLAN_NAME):
        (out / name).unlink(missing_ok=True)


def _remove_stale_temps(out: Path) -> None:
    """Temporary files of a killed writer (``.<name>.*.tmp``) never become shards; drop them."""
    for sub in ("shards", "failed"):
        if (out / sub).is_dir():
            for p in (out / sub).rglob(".*.tmp"):
                p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- job


def _open(cfg: PrepareConfig, source: Optional[Source]) -> tuple[Source, Optional[str]]:
    """The source to prepare and its spec (None for a :class:`Source` object)."""
    if source is not None:
        if cfg.source:
            raise ConfigError(f"source: both a spec ({cfg.source!r}) and a Source object were given; give one")
        src, spec = source, None
    else:
        from xmodal.data.sources import open_source

        cfg.require_paths()
        src, spec = open_source(cfg.source, seed=cfg.seed, test_ratio=cfg.test_ratio), cfg.source
    if src.kind not in ("mesh", "points"):
        raise ValueError(f"source kind must be 'mesh' or 'points', got {src.kind!r}")
    return src, spec


def _settings(cfg: PrepareConfig, src: Source) -> dict:
    """The build settings recorded in ``plan.json`` and the manifest (a resume must match them)."""
    effective_views = cfg.views if (src.kind == "mesh" or cfg.render_points) else 0
    if cfg.views and not effective_views:
        log.info("render_points=False with a point-cloud source: the store will have no images")
    return {
        "views": int(cfg.views),
        "effective_views": int(effective_views),
        "points": int(cfg.points),
        "image_size": int(cfg.image_size),
        "grayscale": bool(cfg.grayscale),
        "seed": int(cfg.seed),
        "chunk_size": int(cfg.chunk_size),
        "test_ratio": float(cfg.test_ratio),
        "render_points": bool(cfg.render_points),
        "oversample": int(cfg.oversample),
    }


def _make_plan(src: Source, spec: Optional[str], settings: dict,
               shard: Optional[tuple[int, int]] = None) -> tuple[dict, dict[str, list[Item]]]:
    """The plan (settings, source, classes, object list: the whole dataset's, also for a part;
    the part ``shard``, if any) and the items per split."""
    classes = [str(c) for c in src.classes]
    items = _plan_items(src)
    unknown = sorted({it.label for its in items.values() for it in its} - set(classes))
    if unknown:
        raise PrepareError(f"source items have labels {unknown} that are not in its classes")
    plan = {
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "source": {**src.describe(), **({"spec": spec} if spec is not None else {})},
        "classes": classes,
        "items": {s: [_item_record(it) for it in its] for s, its in items.items()},
    }
    if shard is not None:
        plan["shard"] = {"index": shard[0], "count": shard[1]}
    return plan, items


def claim_output(out: Path, plan: dict, overwrite: bool, *,
                 hint: str = "use another output folder or overwrite=True (--overwrite) to replace it") -> dict:
    """Check that ``out`` is new, or holds this plan (a resume, a re-run), or may be overwritten
    (``overwrite``: its dataset files are removed); write the plan. Used by ``prepare`` and ``merge``.
    Returns the plan in effect: the one ``out`` holds, for a resume (its record stays as written,
    e.g. a ``test_ratio`` its source does not use), else ``plan``.

    Raises :class:`OutputExistsError` (naming ``out``, with ``hint``) when ``out`` holds another dataset."""
    plan_path = out / PLAN_NAME
    if plan_path.is_file():
        try:
            old = read_json(plan_path)
        except ValueError:
            old = {}
        if plan_key(old) == plan_key(plan):
            return old
        what = f"a dataset prepared with other settings ({describe_difference(old, plan)})"
    elif any((out / name).exists() for name in (MANIFEST_NAME, "shards", "failed")):
        what = f"a dataset without {PLAN_NAME} (not made by prepare, or older)"
    else:
        write_json(plan_path, plan)
        return plan
    if not overwrite:
        raise OutputExistsError(f"holds {what}", path=out, hint=hint)
    log.info("overwriting %s", out)
    clear_outputs(out)
    write_json(plan_path, plan)
    return plan


def _retry_record(exc: Exception, item: Item, limit_inputs: Optional[dict]) -> dict:
    """What a failed object's retry depends on (:func:`_worth_retrying`): the size and modification
    time of its files (None for one missing, e.g. a labels file not written yet), and the kind of
    failure: ``"file"`` (a :class:`MeshError`), ``"size"`` (:class:`MeshTooLarge`, with the
    ``max_faces`` and ``workers`` it was judged under and, for the memory-based limit, the bytes it
    was estimated to need) or ``"job"`` (anything else: memory, the file system...)."""
    files = [item.path] if item.path else []
    if isinstance(exc, MeshError) and exc.path and exc.path not in files:
        files.append(exc.path)  # e.g. a Labeled PSB labels file
    kind = "size" if isinstance(exc, MeshTooLarge) else "file" if isinstance(exc, MeshError) else "job"
    size = {}
    if kind == "size":
        size = {"limit": dict(limit_inputs or {})}
        if exc.need is not None:
            size["need"] = exc.need
    return {"kind": kind, "files": {f: file_stat(f) for f in files}, **size}


def _fits(need, memory) -> bool:
    """A mesh that needed ``need`` bytes fits a worker's share of ``memory`` bytes (both known)."""
    return isinstance(need, int) and isinstance(memory, int) and need <= memory


def _worth_retrying(failed_path: Path, limit_inputs: dict) -> bool:
    """Whether a chunk's ``failed/`` record holds an object worth trying again: one whose files
    changed since, one over the size limit of a job with another ``max_faces`` or fewer workers
    than now or whose memory share (``limit_inputs["memory"]``, bytes, for every worker the job
    may start) now covers what it needs, or one that failed for the job's sake rather than its
    files'. Records without :data:`RETRY_KEY` (older versions) are not retried."""
    if not failed_path.is_file():
        return False
    try:
        records = read_json(failed_path)
    except ValueError:
        return True  # a damaged record: build the chunk again, which rewrites it
    for rec in records if isinstance(records, list) else []:
        why = rec.get(RETRY_KEY) if isinstance(rec, dict) else None
        if not isinstance(why, dict):
            continue
        if any(file_stat(f) != st for f, st in (why.get("files") or {}).items()):
            return True
        if why.get("kind") == "job":
            return True
        then = why.get("limit") or {}
        if why.get("kind") == "size" and (then.get("max_faces") != limit_inputs.get("max_faces")
                                          or limit_inputs.get("workers", 1) < then.get("workers", 1)
                                          or _fits(why.get("need"), limit_inputs.get("memory"))):
            return True
    return False


def _pending_chunks(out: Path, items: dict[str, list[Item]], chunk_size: int,
                    chunks: list[tuple[str, int]], limit_inputs: Optional[dict] = None
                    ) -> list[tuple[str, int, list[Item]]]:
    """``(split, chunk, items)`` of every chunk of ``chunks`` whose shard is not written yet, is
    written but unreadable (a damaged file is built again, atomically replacing it), or lists an
    object that failed and is worth trying again (:func:`_worth_retrying`: a mesh fixed since, one
    over this job's size limit, a fault of the job rather than of the file)."""
    tasks, retried = [], 0
    for split, c in chunks:
        path = out / shard_relpath(split, c)
        written = shard_rows(path) is not None
        again = written and _worth_retrying(out / failed_relpath(split, c), limit_inputs or {})
        if not written or again:
            if path.exists() and not again:
                log.warning("%s: unreadable shard; building it again", path)
            retried += again
            tasks.append((split, c, items[split][c * chunk_size : (c + 1) * chunk_size]))
    if retried:
        log.info("%s: %d chunk(s) hold objects that failed before and may not fail now (a file changed, a size "
                 "limit, or a fault of the job, not of the file); building them again", out, retried)
    return tasks


def prepare(cfg: PrepareConfig, *, source: Optional[Source] = None, progress: bool = True) -> dict:
    """Render views and sample point clouds of every object of ``cfg.source`` into the store ``cfg.out``.

    Args:
        cfg: what to prepare and how (:class:`~xmodal.data.prepare_config.PrepareConfig`):
            ``source`` (a spec for :func:`xmodal.data.sources.open_source`), ``out`` (the
            dataset folder to create or resume), views, points, image size, ``shard``
            (``"I/N"``: only part I of N, see :mod:`xmodal.data.sharding`), ... The resolved
            config is written to ``out/prepare.yaml``.
        source: a :class:`~xmodal.data.types.Source` object to prepare instead of opening
            ``cfg.source`` (which must then be empty).
        progress: show a progress bar (objects, objects/s, failures).

    Returns:
        The manifest (also written to ``out/manifest.json``, last). A part's manifest describes
        the part's objects only and has a ``shard`` key (``{"index": I, "count": N}``).

    On SIGTERM or SIGINT the chunks in progress are abandoned after their current object, the
    written shards stay, and :class:`~xmodal.errors.Interrupted` is raised; the same call then
    finishes the job. A second process preparing into the same ``out`` is refused at once
    (:class:`~xmodal.errors.OutputLockedError`).

    Raises:
        ConfigError: a bad setting, or a missing ``source`` / ``out``.
        PrepareError: ``out`` holds a store or plan made with other settings (or another part)
            and ``cfg.overwrite`` is False; or not one object could be prepared (raised after the
            manifest, which lists every failure with its reason, is written).
    """
    cfg.validate()
    cfg.require_paths(source=source is None)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: output exists and is not a folder")
    with output_lock(out, "prepare"), StopRequest(until="the current object of each chunk in progress") as stop:
        return _prepare_into(cfg, out, source, progress, stop)


def _prepare_into(cfg: PrepareConfig, out: Path, source: Optional[Source], progress: bool, stop: StopRequest) -> dict:
    """:func:`prepare` once ``out`` is locked."""
    src, spec = _open(cfg, source)
    settings = _settings(cfg, src)
    shard = parse_shard(cfg.shard)
    plan, items = _make_plan(src, spec, settings, shard)
    plan = claim_output(out, plan, cfg.overwrite)
    settings = plan["settings"]
    save_config(cfg, out / CONFIG_NAME)
    chunks = shard_chunks({split: len(its) for split, its in items.items()}, cfg.chunk_size, shard)
    if shard is not None and not chunks:
        log.warning("part %s holds no objects: the plan has fewer chunks than parts (lower chunk_size)",
                    format_shard(shard))
    # what a mesh size limit depends on besides the machine (recorded with a MeshTooLarge failure)
    limit_inputs = {"max_faces": int(cfg.max_faces), "workers": int(cfg.workers)}
    # a mesh over the memory-based limit is tried again once a worker's share would hold it (the
    # share for every worker the job may start: the smallest it can be). The run's limit below is
    # worked out from the same reading of free memory, so a mesh judged to fit is not rebuilt
    # only to fail again under a second, lower reading.
    avail = mesh_limit.available_memory() if cfg.max_faces <= 0 else None
    memory = MeshLimit.sharing(cfg.max_faces, cfg.workers, avail).memory
    retry_inputs = {**limit_inputs, "memory": memory}
    has_pl = src.part_names is not None

    def check_suspects() -> tuple[int, int]:
        return _check_suspects(out, src, items, settings, plan["classes"], has_pl, cfg.max_faces,
                               lambda: stop.requested)

    def pending() -> list[tuple[str, int, list[Item]]]:
        return _pending_chunks(out, items, cfg.chunk_size, chunks, retry_inputs)

    check_suspects()  # objects in flight when an earlier job's process died: did one of them kill it?
    tasks = pending()
    if tasks:
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # no longer describes a complete store
        _remove_stale_temps(out)
        cs = cfg.chunk_size
        n_done_before = sum(len(items[sp][c * cs : (c + 1) * cs]) for sp, c in chunks) - sum(len(t[2]) for t in tasks)
        if n_done_before:
            log.info("resuming %s: %d objects already prepared", out, n_done_before)
        # the mesh limit travels with the settings to the workers but is not one of the
        # dataset's settings (plan.json): like workers, it depends on the machine
        limit = MeshLimit.sharing(cfg.max_faces, 1 if cfg.workers == 1 else max(1, min(cfg.workers, len(tasks))), avail)
        if src.kind == "mesh":
            log.info("mesh size limit: %s", limit.describe())
        run_settings = {**settings, "mesh_limit": limit, "limit_inputs": limit_inputs}
        isolate = False  # after a worker's death, even one chunk runs in a worker: a second such object
        while True:      # must not take the job down with it
            run_settings["crashes"] = crash.read_crashes(out)
            try:
                written = _execute(tasks, src, run_settings, out, plan["classes"], has_pl, workers=cfg.workers,
                                   progress=progress, should_stop=lambda: stop.requested, isolate=isolate)
                break
            except _PoolBroken as broken:
                suspects, found = check_suspects()
                tasks = pending()
                if stop.requested:
                    raise _interrupted(out, stop.signum, len(chunks) - len(tasks), len(chunks), shard) from broken
                if not found:
                    raise _pool_died(suspects) from broken
                isolate = True
        if written < len(tasks):
            raise _interrupted(out, stop.signum, len(chunks) - len(tasks) + written, len(chunks), shard)
        try:  # the markers' folder, when nothing failed (no process writes there any more)
            (out / "failed").rmdir()
        except OSError:
            pass
    manifest = finalize_store(out, plan, up_axis=src.up_axis, part_names=src.part_names)
    n_failed = len(manifest.get("failed", []))
    if n_failed and not sum(manifest["counts"].values()):
        first = manifest["failed"][0]
        raise PrepareError(
            f"none of the {n_failed} objects could be prepared (the first, {first.get('id')}: {first.get('reason')})",
            path=cfg.source or out,
            hint=f"every failure and its reason is listed under 'failed' in {out / MANIFEST_NAME}",
        )
    return manifest


def _pool_died(suspects: int) -> PrepareError:
    what = (f"each of the {suspects} objects in flight was prepared again alone, and none died" if suspects else
            "no object was in flight (it died starting, or writing its chunk)")
    return PrepareError(
        f"a worker process died (killed, e.g. for lack of memory, or a crash in native code); {what}",
        hint="run the same command with fewer --workers (the written shards are kept)",
    )


def _interrupted(out: Path, signum: Optional[int], written: int, total: int,
                 shard: Optional[tuple[int, int]]) -> Interrupted:
    signum = int(signum or signal.SIGTERM)
    what = f"part {format_shard(shard)}" if shard else "the dataset"
    return Interrupted(
        f"stopped by {signal.Signals(signum).name}: {written} of the {total} shards of {what} are written "
        "(the chunks in progress were abandoned; no manifest yet)",
        signum=signum, path=out,
        hint="run the same command again to finish; the written shards are kept, not rebuilt",
    )


def _execute(tasks, src, settings, out, classes, has_pl, *, workers: int, progress: bool,
             should_stop: Callable[[], bool], isolate: bool = False) -> int:
    """Prepare the chunks of ``tasks``; returns how many were written (fewer once ``should_stop()``).
    With ``workers`` > 1 they run in worker processes, a single chunk too when ``isolate``."""
    from tqdm.auto import tqdm

    total = sum(len(t[2]) for t in tasks)
    bar = tqdm(total=total, unit="obj", desc="prepare", disable=not progress, dynamic_ncols=True)
    failed = [0]

    def report(n: int, bad: int) -> None:
        bar.update(n)
        if bad:
            failed[0] += bad
            bar.set_postfix(failed=failed[0], refresh=False)

    try:
        if workers > 1 and (len(tasks) > 1 or isolate):
            return _execute_pool(tasks, src, settings, out, classes, has_pl, workers, report, should_stop)
        ctx = _Context(src, settings, out, classes, has_pl)
        written = 0
        try:
            for split, chunk, its in tasks:
                if _run_chunk(ctx, split, chunk, its, report=report, should_stop=should_stop) is None:
                    break
                written += 1
        finally:
            ctx.close()
        return written
    finally:
        bar.close()


class _QueueProgress:
    """Per-object progress that pool workers send through a queue, passed on to ``report``."""

    def __init__(self, q, tasks, report) -> None:
        self.q, self.report = q, report
        self.expected = {(s, c): len(its) for s, c, its in tasks}
        self.seen = {key: 0 for key in self.expected}

    def take(self, timeout: Optional[float]) -> bool:
        try:
            key, n, bad = self.q.get(timeout=timeout) if timeout else self.q.get_nowait()
        except queue_mod.Empty:
            return False
        self.seen[key] += n
        self.report(n, bad)
        return True

    def drain(self) -> None:
        while self.take(None):
            pass

    def finish(self, key) -> None:
        """The worker queued a chunk's progress before returning: collect the rest of it."""
        while self.seen[key] < self.expected[key] and self.take(5.0):
            pass


def _execute_pool(tasks, src, settings, out, classes, has_pl, workers, report, should_stop) -> int:
    """Run chunks in a pool of ``spawn`` processes; returns how many were written.

    Once ``should_stop()`` turns true, chunks not started are cancelled and running ones are
    abandoned after their current object (the ``abandon`` event); leaving by any other way
    (an error, a second Ctrl-C) sets it too, so the pool always shuts down within one object.
    """
    try:
        pickle.dumps(src)
    except Exception as exc:
        raise PrepareError(
            f"the source ({type(src).__name__}) cannot be sent to worker processes ({exc}); "
            "use workers=1 or a source defined in an importable module"
        ) from exc
    mpctx = mp.get_context("spawn")
    q, abandon = mpctx.Queue(), mpctx.Event()
    with cf.ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=mpctx,
        initializer=_worker_init,
        initargs=(src, settings, str(out), classes, has_pl, q, abandon, os.getpid()),
    ) as pool:
        futures = {pool.submit(_worker_chunk, s, c, its): (s, c) for s, c, its in tasks}
        try:
            return _collect(futures, _QueueProgress(q, tasks, report), should_stop, abandon)
        finally:
            abandon.set()
            for fut in futures:
                fut.cancel()


class _PoolBroken(Exception):
    """A pool worker died (killed, or a crash in native code); ``args[0]``: a chunk it left."""


def _probe_object(source: Source, settings: dict, out: str, classes: list[str], has_pl: bool, item: Item,
                  started, parent: int) -> None:
    """Prepare ``item`` alone in a fresh process (spawned by :func:`_probe`); its exit code is the answer."""
    ignore_stop_signals()
    die_with_parent(parent)
    os.environ.setdefault("LP_NUM_THREADS", "1")
    started.set()  # from here on a death is the object's (the arguments are unpickled, signals ignored)
    ctx = _Context(source, settings, Path(out), classes, has_pl)
    try:
        _process_object(ctx, item)
    except BaseException:  # noqa: BLE001 - an exception is the object's chunk's to record; only a death counts
        pass
    finally:
        ctx.close()


def _probe(source: Source, settings: dict, out: Path, classes: list[str], has_pl: bool, item: Item,
           should_stop: Callable[[], bool]) -> Optional[int]:
    """The exit code of a process that prepared ``item`` alone (0: it survived); None when there is
    no answer: the process died before it started on the object, or a stop was requested."""
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(target=_probe_object, daemon=True,
                       args=(source, settings, str(out), classes, has_pl, item, started, os.getpid()))
    proc.start()
    while proc.is_alive():
        if should_stop():
            proc.kill()
            proc.join()
            return None
        proc.join(0.1)
    return proc.exitcode if started.is_set() else None


def _check_suspects(out: Path, src: Source, items: dict[str, list[Item]], settings: dict, classes: list[str],
                    has_pl: bool, max_faces: int, should_stop: Callable[[], bool]) -> tuple[int, int]:
    """Prepare each object that was in flight when a process died again alone (see
    :mod:`xmodal.data.crash`); record those that kill that process too. Returns ``(suspects,
    recorded)``. A suspect without an answer (a stop, a probe that could not start) keeps its marker."""
    suspects = crash.find_suspects(out)
    if not suspects:
        return 0, 0
    try:
        pickle.dumps(src)
    except Exception:  # noqa: BLE001 - any pickling failure
        log.warning("%d objects were being prepared when a process died (%s); this source cannot be sent to a "
                    "process of its own to find out whether one of them killed it", len(suspects),
                    ", ".join(str(x["id"]) for x in suspects))
        return len(suspects), 0
    by_id = {(it.split, it.id): it for its in items.values() for it in its}
    alone = {**settings, "mesh_limit": MeshLimit.for_workers(max_faces, 1)}
    found = 0
    for suspect in suspects:
        item = by_id.get((str(suspect.get("split")), str(suspect["id"])))
        if item is None:  # not in this plan (any more): nothing to ask
            crash.drop_markers(suspect)
            continue
        code = _probe(src, alone, out, classes, has_pl, item, should_stop)
        if code is None:
            log.warning("%s was being prepared when a process died; whether it was the cause is not known yet "
                        "(asked again on the next run)", item.id)
            continue
        if code:
            rec = crash.record_crash(out, item, code)
            log.warning("%s (%s): %s", item.id, item.path or "generated", rec["reason"])
            found += 1
        else:
            log.info("%s was being prepared when a process died; prepared alone, it is fine", item.id)
        crash.drop_markers(suspect)
    return len(suspects), found


def _collect(futures: dict, progress: _QueueProgress, should_stop, abandon) -> int:
    """Wait for the pool's chunks; returns how many were written."""
    pending, written, stopping = set(futures), 0, False
    while pending:
        if not stopping and should_stop():
            stopping = True
            abandon.set()
            pending = {fut for fut in pending if not fut.cancel()}  # running or finished ones stay
        done, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
        progress.drain()
        for fut in done:
            if fut.cancelled():
                continue
            key = futures[fut]
            exc = fut.exception()
            if exc is not None:
                if stopping:  # e.g. a worker hit by the signal before it could ignore it: not written
                    continue
                if isinstance(exc, cf.process.BrokenProcessPool):  # a worker died: see xmodal.data.crash
                    raise _PoolBroken(key) from exc
                if isinstance(exc, (XmodalError, OSError)):  # the disk, a file: reported as they are
                    raise exc
                raise RuntimeError(f"prepare: chunk {key[1]} of split '{key[0]}' failed: {exc}") from exc
            if fut.result() is not None:
                written += 1
                progress.finish(key)
    return written


def finalize_store(out: Path, plan: dict, *, up_axis: str, part_names: Optional[list[str]]) -> dict:
    """Check that every shard of ``plan`` (of its part, for a part's plan) exists, gather counts and
    failures, and write the manifest, last. Used by ``prepare`` and by ``merge``."""
    s = plan["settings"]
    chunks = shard_chunks({split: len(recs) for split, recs in plan["items"].items()}, s["chunk_size"],
                          _plan_shard(plan))
    shards: dict[str, list[str]] = {split: [] for split in plan["items"]}
    sizes: dict[str, list[int]] = {split: [] for split in plan["items"]}
    failed: list[dict] = []
    failed_ids: set[tuple[str, str]] = set()
    for split, c in chunks:
        rel = shard_relpath(split, c)
        path = out / rel
        rows = shard_rows(path)
        if rows is None:
            what = "unreadable" if path.exists() else "missing"
            raise PrepareError(f"shard {what} after prepare (changed meanwhile?)", path=path,
                               hint="re-run `xmodal prepare` of this dataset (or part) to build it again")
        sizes[split].append(rows)
        shards[split].append(rel)
        fpath = out / failed_relpath(split, c)
        if fpath.is_file():
            recs = read_json(fpath)
            failed.extend({k: v for k, v in rec.items() if k != RETRY_KEY} for rec in recs)
            failed_ids.update((split, rec.get("id")) for rec in recs)
    contents = StoreContents(
        views=s["effective_views"], points=s["points"], image_size=s["image_size"], grayscale=s["grayscale"],
        up_axis=up_axis, part_names=part_names,
    )
    manifest = make_manifest(
        classes=plan["classes"],
        counts={split: sum(v) for split, v in sizes.items()},
        shards=shards,
        contents=contents,
        source=plan["source"],
        settings=s,
        failed=failed,
        shard_sizes=sizes,
    )
    if "shard" in plan:
        manifest["shard"] = dict(plan["shard"])
    write_json(out / MANIFEST_NAME, manifest)
    if failed:
        log.warning("%d of %d objects failed; see %s", len(failed), sum(map(sum, sizes.values())) + len(failed),
                    out / MANIFEST_NAME)
        _warn_emptied_classes(plan, failed_ids)
    return manifest


def _warn_emptied_classes(plan: dict, gone: set[tuple[str, str]]) -> None:
    """Name the classes that failures (``(split, id)``) left without an object in a split (all
    their training objects, or all their test objects, failed): they stay classes of the store."""
    for split, recs in plan["items"].items():
        total: dict[str, int] = {}
        left: dict[str, int] = {}
        for r in recs:
            total[r["label"]] = total.get(r["label"], 0) + 1
            left[r["label"]] = left.get(r["label"], 0) + ((split, r["id"]) not in gone)
        emptied = sorted(c for c, n in left.items() if n == 0)
        if emptied:
            log.warning("no object of class(es) %s could be prepared for split '%s' (all %s failed; they stay "
                        "classes of the store)", reprlib.repr(emptied), split, "/".join(str(total[c]) for c in emptied))
