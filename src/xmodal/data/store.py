"""The on-disk dataset store: HDF5 shards plus a ``manifest.json``.

Layout of a dataset folder ``DIR``::

    DIR/manifest.json                     # written last, atomically
    DIR/plan.json                         # ordered object list + settings (written by ``prepare``)
    DIR/shards/<split>/<chunk:05d>.h5     # one per chunk of objects, written atomically
    DIR/failed/<split>-<chunk:05d>.json   # failures of that chunk (path + reason)
    DIR/failed/crashed.json               # objects that killed the process preparing them (xmodal.data.crash)

Each shard holds, for its ``n`` successfully prepared objects:

==================  ===================  ==========================================
dataset             shape                dtype
==================  ===================  ==========================================
``ids``             (n,)                 variable-length UTF-8 string
``labels``          (n,)                 int64 (index into ``manifest["classes"]``)
``points``          (n, N, 3)            float32, inside the unit sphere
``point_labels``    (n, N)               int16 (optional, global part ids)
``images``          (n, V, S, S[, 3])    uint8 (optional; one HDF5 chunk per image)
``cameras``         (n, V, 2)            float32 ``[azimuth, polar]`` degrees (optional)
==================  ===================  ==========================================

Images are stored with HDF5 chunks of one image, so reading view ``v`` of object
``i`` decompresses exactly one image, and gzip level 4 (see :data:`IMAGE_COMPRESSION`
for the measurement behind that choice).

The reader (:class:`ShapeStore`, :class:`SplitView`) opens the shard files lazily
and per process: a store object can be pickled into ``torch.utils.data.DataLoader``
workers (or inherited through ``fork``) and each process opens its own handles.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import reprlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from xmodal.errors import MissingInputError, StoreError
from xmodal.utils.io import atomic_path, read_json, write_json

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PLAN_NAME",
    "StoreError",
    "shard_relpath",
    "shard_path",
    "validate_manifest",
    "check_stored",
    "H5_ERRORS",
    "failed_relpath",
    "write_shard",
    "read_shard",
    "shard_rows",
    "StoreContents",
    "make_manifest",
    "write_store",
    "ShapeStore",
    "SplitView",
]

log = logging.getLogger(__name__)

#: what h5py raises for a damaged file (it has no exception type of its own)
H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError)
#: an HDF5 dataset may declare this many bytes, or 100 times what the file stores of it, at most:
#: a header claiming far more than the file holds must not make a reader allocate it
MAX_UNSTORED_BYTES = 256 << 20

#: version of the on-disk layout; readers refuse other versions
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"

# Compression of the images (the bulk of a store), measured on 14 objects x 12 views of
# 224 px grayscale builtin-shape renders (8.4 MB raw), one HDF5 chunk per image:
#   gzip-1 10.5x, gzip-4 12.0x, gzip-6 12.3x, lzf 8.6x smaller than raw;
#   one uncached image reads in ~0.08 ms with gzip-4 (write 0.05 s for all 168).
# gzip-4 keeps the store ~30% smaller than lzf at a read cost negligible next to a
# ResNet forward pass, and every HDF5 build (h5py, h5dump, MATLAB, ...) can read it.
IMAGE_COMPRESSION = ("gzip", 4)

# Shard files one process keeps open at once (the least recently used one is closed to open
# another). An open shard costs about 0.5 MB of HDF5 state whatever was read from it (HDF5 2.0,
# h5py 3; the same for a one-dataset file), plus up to 1 MB of decompressed image chunks: with
# every shard of a 10,000-object store open (313 shards of 32 objects) a process held ~160 MB
# more than with one, and pre-training with every shard open peaked 360 MB higher on 10,000
# objects than on 1,000 -- growth with the dataset. The price of the bound is reopening:
# ~0.5 ms per shard, so random batches over many more shards than this read slower (measured
# on 32 px images: 9 ms -> 54 ms per batch of 32 from 313 shards).
MAX_OPEN_SHARDS = 64

_REQUIRED_KEYS = (
    "format_version",
    "classes",
    "counts",
    "views",
    "points",
    "image_size",
    "grayscale",
    "up_axis",
    "part_names",
    "source",
    "settings",
    "failed",
    "shards",
)
_SHARD_KEYS = ("ids", "labels", "points", "point_labels", "images", "cameras")


def _h5py():
    import h5py  # core dependency; imported lazily to keep ``import xmodal`` light

    return h5py


# --------------------------------------------------------------------------- writer


def shard_relpath(split: str, chunk: int) -> str:
    """Relative path of shard ``chunk`` of ``split`` inside a dataset folder."""
    return f"shards/{split}/{int(chunk):05d}.h5"


def failed_relpath(split: str, chunk: int) -> str:
    """Relative path of the failure record of chunk ``chunk`` of ``split``."""
    return f"failed/{split}-{int(chunk):05d}.json"


def _check_shard_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    unknown = sorted(set(arrays) - set(_SHARD_KEYS))
    if unknown:
        raise ValueError(f"unknown shard arrays {unknown}; expected a subset of {list(_SHARD_KEYS)}")
    for key in ("ids", "labels", "points"):
        if key not in arrays or arrays[key] is None:
            raise ValueError(f"shard arrays need '{key}'")
    ids = [str(s) for s in arrays["ids"]]
    n = len(ids)
    out: dict[str, np.ndarray] = {"ids": np.asarray(ids, dtype=object).reshape(n)}
    out["labels"] = np.asarray(arrays["labels"], dtype=np.int64).reshape(-1)
    pts = np.asarray(arrays["points"], dtype=np.float32)
    if pts.ndim != 3 or pts.shape[2] != 3:
        raise ValueError(f"'points' must be (n, N, 3), got {pts.shape}")
    out["points"] = pts
    if arrays.get("point_labels") is not None:
        pl = np.asarray(arrays["point_labels"])
        if pl.shape != pts.shape[:2]:
            raise ValueError(f"'point_labels' must be (n, N) = {pts.shape[:2]}, got {pl.shape}")
        if pl.size and (pl.min() < np.iinfo(np.int16).min or pl.max() > np.iinfo(np.int16).max):
            raise ValueError("'point_labels' do not fit in int16")
        out["point_labels"] = pl.astype(np.int16)
    if arrays.get("images") is not None:
        im = np.asarray(arrays["images"])
        if im.dtype != np.uint8:
            raise ValueError(f"'images' must be uint8, got {im.dtype}")
        if im.ndim not in (4, 5) or im.shape[2] != im.shape[3] or (im.ndim == 5 and im.shape[4] != 3):
            raise ValueError(f"'images' must be (n, V, S, S) or (n, V, S, S, 3), got {im.shape}")
        out["images"] = im
    if arrays.get("cameras") is not None:
        cam = np.asarray(arrays["cameras"], dtype=np.float32)
        if cam.ndim != 3 or cam.shape[2] != 2:
            raise ValueError(f"'cameras' must be (n, V, 2), got {cam.shape}")
        out["cameras"] = cam
    for key, arr in out.items():
        if arr.shape[0] != n:
            raise ValueError(f"'{key}' has {arr.shape[0]} rows but there are {n} ids")
    if "images" in out and "cameras" in out and out["cameras"].shape[1] != out["images"].shape[1]:
        raise ValueError(
            f"'cameras' has {out['cameras'].shape[1]} views but 'images' has {out['images'].shape[1]}"
        )
    return out


def write_shard(path: str | os.PathLike, arrays: Mapping[str, Any], *, attrs: Optional[dict] = None) -> Path:
    """Write one shard atomically (temporary file in the same folder, then rename).

    ``arrays``: ``ids`` (n,), ``labels`` (n,), ``points`` (n, N, 3) and optionally
    ``point_labels`` (n, N), ``images`` (n, V, S, S[, 3]) uint8, ``cameras`` (n, V, 2).
    A writer that fails midway leaves no file at ``path``.
    """
    h5py = _h5py()
    path = Path(path)
    data = _check_shard_arrays(arrays)
    n = len(data["ids"])
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
            f.create_dataset("ids", data=data["ids"], dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("labels", data=data["labels"])
            # points/labels are small next to the images and read whole; no compression.
            f.create_dataset("points", data=data["points"])
            if "point_labels" in data:
                f.create_dataset("point_labels", data=data["point_labels"])
            if "cameras" in data:
                f.create_dataset("cameras", data=data["cameras"])
            if "images" in data:
                im = data["images"]
                kw: dict[str, Any] = {}
                if n > 0 and im.shape[1] > 0:  # HDF5 chunks may not exceed a (non-extendable) shape
                    kw = dict(
                        chunks=(1, 1) + im.shape[2:],
                        compression=IMAGE_COMPRESSION[0],
                        compression_opts=IMAGE_COMPRESSION[1],
                        shuffle=False,
                    )
                f.create_dataset("images", data=im, **kw)
    return path


def read_shard(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a whole shard into memory (``ids`` as a str array). Mostly for tests and tools."""
    h5py = _h5py()
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            out = {}
            for key in _SHARD_KEYS:
                if key in f:
                    ds = f[key]
                    out[key] = np.asarray(ds.asstr()[()], dtype=str) if key == "ids" else ds[()]
            return out
    except H5_ERRORS as exc:
        raise StoreError(f"cannot read shard ({exc})", path=path) from exc


def shard_rows(path: str | os.PathLike) -> Optional[int]:
    """The number of objects in the shard file ``path``; None when there is no such file or it
    cannot be read as a shard (truncated, not HDF5, no ``labels``): a job that wrote it was cut
    short and the shard is to be built again."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with _h5py().File(path, "r") as f:
            labels = f["labels"]
            return int(labels.shape[0]) if labels.ndim == 1 else None
    except H5_ERRORS:
        return None


@dataclass(frozen=True)
class StoreContents:
    """What every object of a store holds, as the manifest records it."""

    #: V stored views (0: no images)
    views: int
    #: N points per cloud
    points: int
    #: S, the image side in pixels (None without images)
    image_size: Optional[int]
    grayscale: bool = True
    #: the up axis of the clouds and renders
    up_axis: str = "z"
    #: global part names when clouds carry per-point part labels, else None
    part_names: Optional[Sequence[str]] = None


def make_manifest(
    *,
    classes: Sequence[str],
    counts: Mapping[str, int],
    shards: Mapping[str, Sequence[str]],
    contents: StoreContents,
    source: Any = None,
    settings: Optional[dict] = None,
    failed: Optional[list] = None,
    shard_sizes: Optional[Mapping[str, Sequence[int]]] = None,
) -> dict:
    """Assemble a manifest dict with every contract key (plus ``shard_sizes``)."""
    c = contents
    man = {
        "format_version": FORMAT_VERSION,
        "classes": [str(name) for name in classes],
        "counts": {str(s): int(n) for s, n in counts.items()},
        "views": int(c.views),
        "points": int(c.points),
        "image_size": None if c.image_size is None else int(c.image_size),
        "grayscale": bool(c.grayscale),
        "up_axis": str(c.up_axis),
        "part_names": None if c.part_names is None else [str(p) for p in c.part_names],
        "source": source,
        "settings": dict(settings or {}),
        "failed": list(failed or []),
        "shards": {str(s): [str(p) for p in v] for s, v in shards.items()},
    }
    if shard_sizes is not None:
        man["shard_sizes"] = {str(s): [int(x) for x in v] for s, v in shard_sizes.items()}
    return man


def write_store(
    root: str | os.PathLike,
    *,
    classes: Sequence[str],
    splits: Mapping[str, Mapping[str, Any]],
    settings: Optional[dict] = None,
    part_names: Optional[Sequence[str]] = None,
    up_axis: str = "z",
    source: Any = None,
    chunk_size: Optional[int] = None,
    grayscale: Optional[bool] = None,
    failed: Optional[list] = None,
) -> "ShapeStore":
    """Write a complete store from in-memory arrays and return it opened.

    ``splits``: ``{split: {"ids", "labels", "points", "images"?, "cameras"?, "point_labels"?}}``
    with the shapes of :func:`write_shard`. Each split is cut into shards of
    ``chunk_size`` objects (one shard per split when None). The manifest is
    written last. Used by ``prepare``'s tests and by converters of other datasets.
    """
    root = Path(root)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    classes = [str(c) for c in classes]
    counts: dict[str, int] = {}
    shards: dict[str, list[str]] = {}
    sizes: dict[str, list[int]] = {}
    views = points = None
    image_size = None
    is_gray = True
    for split, arrays in splits.items():
        data = _check_shard_arrays(arrays)
        n = len(data["ids"])
        if n and (data["labels"].min() < 0 or data["labels"].max() >= len(classes)):
            raise ValueError(f"split '{split}': labels must lie in [0, {len(classes)})")
        v = data["images"].shape[1] if "images" in data else 0
        p = data["points"].shape[1]
        if views is None:
            views, points = v, p
        elif (views, points) != (v, p):
            raise ValueError(
                f"split '{split}' has {v} views / {p} points but an earlier split has {views} / {points}"
            )
        if "images" in data:
            image_size = int(data["images"].shape[2])
            is_gray = data["images"].ndim == 4
        step = n if chunk_size is None else chunk_size
        starts = range(0, n, step) if n else [0]
        counts[split], shards[split], sizes[split] = n, [], []
        for c, s in enumerate(starts):
            part = {k: a[s : s + step] for k, a in data.items()}
            rel = shard_relpath(split, c)
            write_shard(root / rel, part, attrs={"split": split, "chunk": c})
            shards[split].append(rel)
            sizes[split].append(len(part["ids"]))
    settings = dict(settings or {})
    man = make_manifest(
        classes=classes,
        counts=counts,
        shards=shards,
        contents=StoreContents(
            views=views or 0,
            points=points or 0,
            image_size=image_size if image_size is not None else settings.get("image_size"),
            grayscale=is_gray if grayscale is None else grayscale,
            up_axis=up_axis,
            part_names=part_names,
        ),
        source=source,
        settings=settings,
        failed=failed,
        shard_sizes=sizes,
    )
    write_json(root / MANIFEST_NAME, man)
    return ShapeStore(root)


# --------------------------------------------------------------------------- reader


def check_stored(ds, path: Path) -> None:
    """Refuse an HDF5 dataset ``ds`` of file ``path`` whose declared size is far beyond what the
    file stores of it (a forged or damaged header; real data never compresses 100-fold)."""
    nominal = int(np.prod(ds.shape, dtype=object)) * ds.dtype.itemsize
    if nominal > MAX_UNSTORED_BYTES:
        stored = int(ds.id.get_storage_size())
        if nominal > 100 * stored:
            raise StoreError(f"dataset '{ds.name}' declares {ds.shape} ({nominal} bytes) but the file stores "
                             f"{stored} bytes of it", path=path)


def _is_int(x: Any, lo: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def shard_path(root: Path, rel: Any, manifest: Path) -> Path:
    """``root / rel`` for a shard path read from ``manifest``; it must stay inside ``root``.

    Raises:
        StoreError: ``rel`` is not a string, is absolute, or climbs out of the folder (``..``).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise StoreError(f"shard path {rel!r} is not a file name", path=manifest)
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or Path(rel).is_absolute() or ".." in parts or ":" in parts[0]:
        raise StoreError(f"shard path {rel!r} leaves the dataset folder (only paths inside it are read)",
                         path=manifest)
    return root / rel


def _check_counts(man: dict, path: Path) -> None:
    """``counts``, ``shards`` and ``shard_sizes`` describe the same splits and add up."""
    counts, shards = man["counts"], man["shards"]
    if not isinstance(counts, dict) or not all(_is_int(n) for n in counts.values()):
        raise StoreError("'counts' must map each split to a number of objects >= 0", path=path)
    if not isinstance(shards, dict) or not all(_is_str_list(v) for v in shards.values()):
        raise StoreError("'shards' must map each split to a list of shard paths", path=path)
    sizes_of = man.get("shard_sizes", {})
    if not isinstance(sizes_of, dict):
        raise StoreError("'shard_sizes' must map each split to a list of sizes", path=path)
    for split, n in counts.items():
        if split not in shards:
            raise StoreError(f"split '{split}' has a count but no shard list", path=path)
        sizes = sizes_of.get(split)
        if sizes is not None:
            if not isinstance(sizes, list) or not all(_is_int(x) for x in sizes):
                raise StoreError(f"shard_sizes of split '{split}' must be a list of integers >= 0", path=path)
            if len(sizes) != len(shards[split]) or sum(sizes) != n:
                raise StoreError(f"shard_sizes of split '{split}' do not add up to counts ({n})", path=path)


def _check_contents(man: dict, path: Path) -> None:
    """The types and ranges of what every object holds (views, points, image size, ...)."""
    problems = []
    if not _is_str_list(man["classes"]):
        problems.append("'classes' must be a list of names")
    if not _is_int(man["views"]) or not _is_int(man["points"]):
        problems.append("'views' and 'points' must be integers >= 0")
    size = man["image_size"]
    if not (size is None or _is_int(size, 1)) or (man["views"] and size is None):
        problems.append("'image_size' must be an integer >= 1 (null only without views)")
    if not isinstance(man["grayscale"], bool):
        problems.append("'grayscale' must be true or false")
    if man["up_axis"] not in ("x", "y", "z"):
        problems.append(f"'up_axis' must be 'x', 'y' or 'z', got {reprlib.repr(man['up_axis'])}")
    if not (man["part_names"] is None or _is_str_list(man["part_names"])):
        problems.append("'part_names' must be null or a list of names")
    if not isinstance(man["failed"], list) or not isinstance(man["settings"], dict):
        problems.append("'failed' must be a list and 'settings' an object")
    if problems:
        raise StoreError("; ".join(problems), path=path, hint="re-create the dataset with `xmodal prepare`")


def validate_manifest(man: Any, path: Path) -> dict:
    """``man`` (read from ``path``) checked against the manifest contract: keys, types, ranges,
    shard paths inside the folder; a :class:`StoreError` naming ``path`` otherwise."""
    if not isinstance(man, dict):
        raise StoreError(f"manifest must be a JSON object, got {type(man).__name__}", path=path)
    version = man.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"unsupported format_version {reprlib.repr(version)} (this xmodal reads version {FORMAT_VERSION})",
            path=path, hint="re-create the dataset with `xmodal prepare`",
        )
    missing = [k for k in _REQUIRED_KEYS if k not in man]
    if missing:
        raise StoreError(f"manifest lacks keys {missing}", path=path)
    _check_counts(man, path)
    _check_contents(man, path)
    for rels in man["shards"].values():
        for rel in rels:
            shard_path(path.parent, rel, path)
    return man


def _object_shapes(store: "ShapeStore") -> dict[str, tuple[tuple, str]]:
    """``{dataset: (shape of one object's entry, accepted dtype kinds)}`` of a store's shards;
    ``"uint8"`` accepts that dtype only."""
    n_pts, views, size = store.num_points, store.views, store.image_size
    image = (views, size, size) if store.grayscale else (views, size, size, 3)
    return {
        "ids": ((), "OSU"), "labels": ((), "iu"), "points": ((n_pts, 3), "f"), "point_labels": ((n_pts,), "iu"),
        "images": (image, "uint8"), "cameras": ((views, 2), "f"),
    }


def _dtype_ok(dtype: np.dtype, kinds: str) -> bool:
    return dtype == np.uint8 if kinds == "uint8" else dtype.kind in kinds


class SplitView:
    """Read access to one split of a store, indexed ``0 .. n-1`` across its shards.

    Shard files are opened on first use in each process (the process id is
    checked on every access, so a view inherited through ``fork`` or unpickled
    in a DataLoader worker opens its own handles), and at most ``max_open``
    (:data:`MAX_OPEN_SHARDS`) of them are open at once: the least recently used
    one is closed when another is needed, so memory does not grow with the
    number of shards. Only ``labels`` and ``ids`` are read whole (and kept);
    points and images are read per object (:meth:`points`, :meth:`images`) or
    per range of objects (:meth:`points_range`).
    """

    #: shard files open at once in one process
    max_open: int = MAX_OPEN_SHARDS

    def __init__(self, store: "ShapeStore", name: str, shard_paths: Sequence[Path], sizes: Optional[Sequence[int]]):
        self._store_root = store.root
        self.name = name
        self._paths = [Path(p) for p in shard_paths]
        self._points_per_obj = store.num_points
        self._num_classes = store.num_classes
        self._shapes = _object_shapes(store)
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._datasets: dict[tuple[int, str], Any] = {}
        self._pid = os.getpid()
        if sizes is None:  # manifest without shard_sizes: read them from the shards (checked on opening)
            sizes = [self._open(k)["labels"].shape[0] for k in range(len(self._paths))]
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)
        self._bounds = [int(x) for x in self._offsets]  # for bisect: cheaper than numpy per item
        self._labels: Optional[np.ndarray] = None
        self._ids: Optional[list[str]] = None
        self._id_index: Optional[dict[str, int]] = None
        self._has: dict[str, bool] = {}

    # -- pickling / process safety ---------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        state["_datasets"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _open(self, k: int):
        pid = os.getpid()
        if pid != self._pid:
            # handles inherited through fork share file state with the parent:
            # forget them (never close them here, the parent still uses them).
            self._files = OrderedDict()
            self._datasets = {}
            self._pid = pid
        f = self._files.get(k)
        if f is not None:
            self._files.move_to_end(k)
        else:
            while len(self._files) >= max(int(self.max_open), 1):
                self._close_shard(next(iter(self._files)))
            path = self._paths[k]
            try:
                is_file = path.is_file()
            except (OSError, ValueError) as exc:  # a name the OS refuses (too long, ...)
                raise StoreError(f"shard listed in {self._store_root / MANIFEST_NAME} cannot be opened ({exc})",
                                 path=path) from None
            if not is_file:
                raise StoreError(f"shard listed in {self._store_root / MANIFEST_NAME} is missing", path=path)
            try:
                f = _h5py().File(path, "r")
            except H5_ERRORS as exc:
                raise StoreError(f"cannot open shard ({exc})", path=path) from exc
            try:
                self._check_shard(k, f)
            except BaseException:
                f.close()
                raise
            self._files[k] = f
        return f

    def _check_shard(self, k: int, f) -> None:
        """The datasets of shard ``k`` against the manifest: present, shaped and typed as it
        says, as many rows as it lists (reads no data, only the HDF5 headers)."""
        path = self._paths[k]
        with self._reading(k, "its datasets"):
            missing = [key for key in ("ids", "labels", "points") if key not in f]
            if missing:
                raise StoreError(f"shard lacks the datasets {missing}", path=path)
            n = f["labels"].shape[0] if f["labels"].ndim == 1 else -1
            expected = sizes[k] if (sizes := getattr(self, "_sizes", None)) is not None else n
            if n != expected:
                raise StoreError(f"shard holds {n} objects, the manifest lists {expected}", path=path)
            for key, (shape, kinds) in self._shapes.items():
                if key in f:
                    ds = f[key]
                    if ds.shape != (n, *shape) or not _dtype_ok(ds.dtype, kinds):
                        raise StoreError(f"dataset '{key}' is {ds.dtype} {ds.shape}, expected {(n, *shape)} "
                                         f"({'/'.join(kinds)})", path=path)
                    check_stored(ds, path)

    @contextlib.contextmanager
    def _reading(self, k: int, what: str):
        """Turn h5py's errors while reading shard ``k`` into a :class:`StoreError` naming it."""
        try:
            yield
        except StoreError:
            raise
        except H5_ERRORS as exc:
            raise StoreError(f"cannot read {what} ({type(exc).__name__}: {exc})", path=self._paths[k]) from exc

    def _close_shard(self, k: int) -> None:
        """Forget shard ``k`` and its datasets: HDF5 closes the file as their last handles go
        (measured 3x cheaper than ``File.close()``, which first looks up every open object)."""
        del self._files[k]
        for key in [key for key in self._datasets if key[0] == k]:
            del self._datasets[key]

    def _dataset(self, k: int, key: str):
        """h5py dataset ``key`` of shard ``k`` (None when absent), cached per process:
        looking datasets up by name costs more than reading one small image."""
        f = self._open(k)  # also resets the caches after a fork
        try:
            return self._datasets[(k, key)]
        except KeyError:
            ds = f[key] if key in f else None
            self._datasets[(k, key)] = ds
            return ds

    def close(self) -> None:
        """Close the shard handles this process opened (they reopen on next use)."""
        if os.getpid() == self._pid:
            for f in self._files.values():
                try:
                    f.close()
                except Exception:  # pragma: no cover - closing is best effort
                    pass
        self._files = OrderedDict()
        self._datasets = {}

    # -- indexing ----------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self._offsets[-1])

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"SplitView({self.name!r}, n={self.n}, shards={len(self._paths)})"

    def _locate(self, i: int) -> tuple[int, int]:
        i = int(i)
        n = self.n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for split '{self.name}' with {n} objects")
        k = bisect.bisect_right(self._bounds, i) - 1
        return k, i - self._bounds[k]

    def _has_key(self, key: str) -> bool:
        if key not in self._has:
            nonempty = [k for k in range(len(self._paths)) if self._sizes[k] > 0]
            probe = nonempty[0] if nonempty else (0 if self._paths else None)
            if probe is None:
                self._has[key] = False
            else:
                with self._reading(probe, f"'{key}'"):
                    self._has[key] = key in self._open(probe)
        return self._has[key]

    def _concat(self, key: str, decode: bool = False) -> np.ndarray:
        parts = []
        for k in range(len(self._paths)):
            with self._reading(k, f"'{key}'"):
                ds = self._open(k)[key]
                parts.append(np.asarray(ds.asstr()[()], dtype=object) if decode else ds[()])
        if not parts:
            return np.zeros((0,), dtype=object if decode else np.int64)
        return np.concatenate(parts)

    # -- per-split arrays ----------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        """Class indices ``(n,)`` int64."""
        if self._labels is None:
            labels = self._concat("labels").astype(np.int64)
            if labels.size and (labels.min() < 0 or labels.max() >= self._num_classes):
                raise StoreError(f"split '{self.name}' has class labels outside 0..{self._num_classes - 1} "
                                 f"(the manifest names {self._num_classes} classes)", path=self._store_root)
            self._labels = labels
        return self._labels

    @property
    def ids(self) -> list[str]:
        """Object ids ``(n,)`` in store order."""
        if self._ids is None:
            self._ids = [str(s) for s in self._concat("ids", decode=True)]
        return self._ids

    def index_of(self, object_id: str) -> int:
        """Index of the object with id ``object_id``; KeyError when absent."""
        if self._id_index is None:
            self._id_index = {s: i for i, s in enumerate(self.ids)}
        try:
            return self._id_index[object_id]
        except KeyError:
            raise KeyError(f"no object '{object_id}' in split '{self.name}'") from None

    @property
    def has_images(self) -> bool:
        return self._has_key("images")

    @property
    def has_point_labels(self) -> bool:
        return self._has_key("point_labels")

    # -- per-object reads ------------------------------------------------------
    def points(self, i: int) -> np.ndarray:
        """Point cloud of object ``i``: ``(N, 3)`` float32."""
        k, r = self._locate(i)
        with self._reading(k, f"the points of object {r}"):
            pts = self._dataset(k, "points")[r]
        if not np.isfinite(pts).all():
            raise StoreError(f"object {r} has NaN or infinite point coordinates", path=self._paths[k])
        return pts

    def points_range(self, start: int, stop: int) -> np.ndarray:
        """Point clouds of objects ``start .. stop-1``: ``(stop-start, N, 3)`` float32.

        Reads only the shards holding those objects, one read per shard; indices are
        clipped to ``[0, n]`` like a slice (so ``points_range(0, n)`` is every cloud).
        Raises :class:`StoreError` for an unreadable shard or NaN/infinite coordinates.
        """
        start, stop = max(int(start), 0), min(int(stop), self.n)
        if stop <= start:
            return np.empty((0, self._points_per_obj, 3), dtype=np.float32)
        first = bisect.bisect_right(self._bounds, start) - 1
        last = bisect.bisect_left(self._bounds, stop) - 1
        for k in range(first, last + 1):  # open (and check) the shards before allocating
            self._open(k)
        out = np.empty((stop - start, self._points_per_obj, 3), dtype=np.float32)
        for k in range(first, len(self._paths)):
            a, b = max(self._bounds[k], start), min(self._bounds[k + 1], stop)
            if a >= stop:
                break
            if b > a:
                src = np.s_[a - self._bounds[k] : b - self._bounds[k]]
                dest = np.s_[a - start : b - start]
                with self._reading(k, "'points'"):
                    self._open(k)["points"].read_direct(out, source_sel=src, dest_sel=dest)
                bad = np.flatnonzero(~np.isfinite(out[dest]).all(axis=(1, 2)))
                if bad.size:
                    raise StoreError(f"object {int(bad[0]) + a - self._bounds[k]} has NaN or infinite point "
                                     "coordinates", path=self._paths[k])
        return out

    def all_points(self) -> np.ndarray:
        """Every point cloud of the split: ``(n, N, 3)`` float32 (one read per shard).

        The whole split in memory: code that must not grow with the dataset reads blocks
        with :meth:`points_range` instead."""
        return self.points_range(0, self.n)

    def point_labels(self, i: int) -> Optional[np.ndarray]:
        """Per-point part labels of object ``i``: ``(N,)`` int64, or None when the store has none."""
        if not self.has_point_labels:
            return None
        k, r = self._locate(i)
        with self._reading(k, f"the point labels of object {r}"):
            return self._dataset(k, "point_labels")[r].astype(np.int64)

    def cameras(self, i: int) -> Optional[np.ndarray]:
        """Camera angles of object ``i``: ``(V, 2)`` float32 ``[azimuth, polar]`` degrees, or None."""
        k, r = self._locate(i)
        with self._reading(k, f"the cameras of object {r}"):
            ds = self._dataset(k, "cameras")
            return None if ds is None else ds[r]

    def _images_ds(self, k: int, i: int):
        with self._reading(k, "'images'"):
            ds = self._dataset(k, "images")
        if ds is None:
            raise StoreError(f"this dataset has no images (prepared with views=0); object {i}", path=self._paths[k])
        return ds

    def image(self, i: int, view: int) -> np.ndarray:
        """View ``view`` of object ``i``: ``(S, S)`` uint8 (``(S, S, 3)`` for colour stores)."""
        k, r = self._locate(i)
        ds = self._images_ds(k, i)
        v = int(view)
        if not -ds.shape[1] <= v < ds.shape[1]:
            raise IndexError(f"view {view} out of range: the dataset has {ds.shape[1]} views")
        with self._reading(k, f"view {v} of object {r}"):
            return ds[r, v % ds.shape[1]]

    def images(self, i: int, views: Optional[Iterable[int]] = None) -> np.ndarray:
        """Several views of object ``i``: ``(k, S, S)`` uint8 (``(k, S, S, 3)`` for colour stores).

        ``views`` in any order, repeats and negative indices allowed (None: all views).
        The unique views are read as contiguous runs, one HDF5 slice read per run,
        then reordered. (h5py's list ("fancy") selection would be a single call but
        measured ~30x slower: 13 ms vs 0.4 ms for 2 of 12 gzip'd 224 px views.)
        """
        k, r = self._locate(i)
        ds = self._images_ds(k, i)
        nv = ds.shape[1]
        v = None if views is None else np.asarray(list(views), dtype=np.int64).reshape(-1)
        if v is not None and v.size and (v.min() < -nv or v.max() >= nv):
            raise IndexError(f"views {v.tolist()} out of range: the dataset has {nv} views")
        with self._reading(k, f"the views of object {r}"):
            return self._read_views(ds, r, v)

    @staticmethod
    def _read_views(ds, r: int, v: Optional[np.ndarray]) -> np.ndarray:
        """Views ``v`` (in range; None: all) of row ``r`` of the images dataset ``ds``."""
        nv = ds.shape[1]
        if v is None:
            return ds[r]
        if v.size == 0:
            return np.empty((0,) + tuple(ds.shape[2:]), dtype=np.uint8)
        v = v % nv
        uniq, inverse = np.unique(v, return_inverse=True)
        if uniq.size == nv:
            block = ds[r]
        else:
            block = np.empty((uniq.size,) + tuple(ds.shape[2:]), dtype=ds.dtype)
            breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
            for run_start, run in zip(np.concatenate([[0], breaks]), np.split(uniq, breaks)):
                block[run_start : run_start + run.size] = ds[r, int(run[0]) : int(run[-1]) + 1]
        return block[inverse.reshape(-1)]


class ShapeStore:
    """A prepared dataset folder (see the module docstring for the layout).

    >>> store = ShapeStore("data/shapes")            # doctest: +SKIP
    >>> train = store.split("train")                 # doctest: +SKIP
    >>> train.images(0, [3, 7]).shape                # doctest: +SKIP
    (2, 224, 224)
    """

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        path = root / MANIFEST_NAME
        if not root.is_dir():
            raise MissingInputError("dataset folder does not exist", path=root)
        if not path.is_file():
            raise MissingInputError(
                "no manifest; this folder is not a finished xmodal dataset", path=path,
                hint="run `xmodal prepare`, or re-run it to finish an interrupted job",
            )
        try:
            man = read_json(path)
        except ValueError as exc:
            raise StoreError(f"corrupt manifest ({getattr(exc, 'problem', exc)})", path=path) from exc
        self._init(root, validate_manifest(man, path))

    def _init(self, root: Optional[Path], manifest: dict) -> None:
        """The state every store holds (``root`` None for one held in memory)."""
        self.root = root
        self.manifest = manifest
        self._views: dict[str, SplitView] = {}

    # -- metadata ------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def num_points(self) -> int:
        return int(self.manifest["points"])

    @property
    def image_size(self) -> Optional[int]:
        s = self.manifest["image_size"]
        return None if s is None else int(s)

    @property
    def grayscale(self) -> bool:
        return bool(self.manifest["grayscale"])

    @property
    def up_axis(self) -> str:
        return str(self.manifest["up_axis"])

    @property
    def has_images(self) -> bool:
        return self.views > 0

    @property
    def part_names(self) -> Optional[list[str]]:
        p = self.manifest["part_names"]
        return None if p is None else list(p)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.manifest["counts"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["counts"])

    @property
    def failed(self) -> list[dict]:
        return list(self.manifest["failed"])

    def split(self, name: str) -> SplitView:
        """The :class:`SplitView` of split ``name`` (``"train"``, ``"test"``)."""
        view = self._views.get(name)
        if view is None:
            if name not in self.manifest["counts"]:
                where = self.root if self.root is not None else "this dataset"
                raise StoreError(f"no split '{name}' (splits: {', '.join(self.splits) or 'none'})", path=where)
            rels = self.manifest["shards"][name]
            sizes = self.manifest.get("shard_sizes", {}).get(name)
            manifest = self.root / MANIFEST_NAME
            view = SplitView(self, name, [shard_path(self.root, r, manifest) for r in rels], sizes)
            self._views[name] = view
        return view

    def close(self) -> None:
        for v in self._views.values():
            v.close()

    def __enter__(self) -> "ShapeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.root) if self.root is not None else "<memory>"
        return (
            f"ShapeStore({where!r}, classes={self.num_classes}, counts={self.counts}, "
            f"views={self.views}, points={self.num_points}, image_size={self.image_size})"
        )
