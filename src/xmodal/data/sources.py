"""Where the objects of ``xmodal prepare`` come from.

:func:`open_source` turns a spec string into a :class:`~xmodal.data.types.Source`:

* ``builtin:shapes`` (``builtin:shapes?train=32&test=8&seed=0``): procedural shapes,
  :class:`xmodal.data.builtin.BuiltinSource`;
* a folder holding ``ply_data_*.h5`` files (the ModelNet40 HDF5 point-cloud release):
  :class:`ModelNetH5Source`;
* a Princeton Shape Benchmark folder (``DIR/db/`` and ``DIR/classification/v1/``;
  ``DIR?classification=coarse1`` picks a granularity, ``base`` by default):
  :class:`xmodal.data.psb.PsbSource`;
* a folder of category sub-folders whose meshes each have a ``<stem>_labels.txt`` (Labeled
  PSB, per-face part labels): :class:`xmodal.data.labeled_psb.LabeledPSBSource`;
* a folder in the Princeton ModelNet layout ``<root>/<class>/<split>/*.off``, or a folder
  of class sub-folders with meshes in any of :data:`~xmodal.data.mesh_io.MESH_EXTENSIONS`:
  :class:`MeshFolderSource`.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import reprlib
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import parse_qs

import numpy as np

from xmodal.data.mesh_io import MESH_EXTENSIONS, is_mesh_file, load_mesh
from xmodal.data.psb import PsbSource, is_psb_root
from xmodal.data.store import H5_ERRORS, check_stored
from xmodal.data.types import Item, Mesh, MeshError, PointCloud, Source
from xmodal.errors import ConfigError, DataError, MissingInputError
from xmodal.utils.io import read_json
from xmodal.utils.optional import require

__all__ = ["open_source", "MeshFolderSource", "ModelNetH5Source", "stratified_holdout", "BUILTIN_PARAMS", "PSB_PARAMS"]

logger = logging.getLogger(__name__)

SPLIT_DIRS = ("train", "test")
#: names of split folders a store has no split for: their meshes are named in a warning, not read
OTHER_SPLIT_DIRS = ("val", "valid", "validation", "dev")

#: query keys of ``builtin:shapes?…`` -> keyword of ``BuiltinSource``
BUILTIN_PARAMS = {"train": "train_per_class", "test": "test_per_class", "seed": "seed"}
#: query keys of ``<PSB folder>?…`` -> keyword of ``PsbSource``
PSB_PARAMS = {"classification": "classification"}

ACCEPTED_FORMS = (
    "accepted sources: 'builtin:shapes' (optionally 'builtin:shapes?train=32&test=8&seed=0'); "
    "a folder with ModelNet40 HDF5 files 'ply_data_*.h5'; a Princeton Shape Benchmark folder "
    "'<root>/db/' + '<root>/classification/v1/' (optionally '<root>?classification=coarse1'); a folder in ModelNet layout "
    "'<root>/<class>/<train|test>/*.off' (or '<root>/<train|test>/<class>/'); a Labeled PSB folder '<root>/<category>/<stem>.{off,ply,obj}' "
    "with '<stem>_labels.txt' beside each mesh; a folder of class sub-folders '<root>/<class>/**/*"
    f"{{{','.join(MESH_EXTENSIONS)}}}'"
)


def open_source(spec: "str | os.PathLike", *, seed: int = 0, test_ratio: float = 0.2) -> Source:
    """Open the objects named by ``spec``.

    Args:
        spec: ``"builtin:shapes[?train=N&test=M&seed=S]"``, a folder path, or a PSB folder
            path with options ``"DIR?classification=coarse1"`` (see module doc).
        seed: seed of the train/test split of folders without one (and default seed of
            the built-in shapes).
        test_ratio: fraction of each class held out as ``test`` where the data has no split.

    Raises:
        MissingInputError: the path does not exist (a FileNotFoundError).
        ConfigError: ``test_ratio`` outside [0, 1).
        DataError: an unknown ``builtin:`` name or parameter, a file instead of a folder,
            or a folder without usable data; the hint lists the accepted forms.
    """
    _check_ratio(test_ratio)
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith("builtin:"):
        return _open_builtin(text, seed=seed)
    query = ""
    if "?" in text and not Path(text).expanduser().exists():
        text, _, query = text.partition("?")
    # absolute: item paths are recorded (failed objects, their retry records), and a job resumed
    # from another working directory must find the same files
    path = Path(text).expanduser().absolute()
    if not path.exists():
        raise MissingInputError("source does not exist", path=text, hint=ACCEPTED_FORMS)
    if not path.is_dir():
        raise DataError("source is a file, not a folder", path=text, hint=ACCEPTED_FORMS)
    if is_psb_root(path):
        return PsbSource(path, seed=seed, test_ratio=test_ratio, **_parse_options(os.fspath(spec), query, PSB_PARAMS))
    if query:
        raise DataError(f"options '?{query}' are only understood for builtin:shapes and Princeton Shape Benchmark "
                        f"folders, and {text!r} is neither; {ACCEPTED_FORMS}")
    if any(path.glob("ply_data_*.h5")):
        return ModelNetH5Source(path, seed=seed, test_ratio=test_ratio)
    labeled = importlib.import_module("xmodal.data.labeled_psb")  # imports this module
    labelled, meshes = labeled.labeled_mesh_counts(path)
    if labelled:  # at least half of what either reader would take: stray labels files fail no other mesh
        meshes = max(meshes, mesh_folder_count(path))
        if 2 * labelled >= meshes:
            return labeled.LabeledPSBSource(path, seed=seed, test_ratio=test_ratio)
        logger.warning("%s: %d of %d meshes have a '<stem>%s' beside them, fewer than half: read as a plain mesh "
                       "collection, those part labels ignored (a Labeled PSB folder labels at least half its "
                       "meshes)", path, labelled, meshes, labeled.LABELS_SUFFIX)
    return MeshFolderSource(path, seed=seed, test_ratio=test_ratio)


def _parse_options(spec: str, query: str, valid: dict[str, str]) -> dict[str, str]:
    """``{keyword: value}`` of the ``key=value&…`` options of ``spec``; keys from ``valid``
    (query key -> keyword), each at most once."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise DataError(f"malformed query in {spec!r}: {exc}") from None
    out = {}
    for key, values in params.items():
        if key not in valid:
            raise DataError(f"unknown parameter {key!r} in {spec!r}; valid parameters: {', '.join(valid)}")
        if len(values) != 1:
            raise DataError(f"parameter {key!r} given {len(values)} times in {spec!r}")
        out[valid[key]] = values[0]
    return out


def _open_builtin(spec: str, *, seed: int) -> Source:
    name, _, query = spec[len("builtin:"):].partition("?")
    if name != "shapes":
        raise DataError("unknown built-in source: the only one is 'builtin:shapes'", path=spec, hint=ACCEPTED_FORMS)
    kwargs: dict[str, int] = {"seed": int(seed)}
    keys = {kw: key for key, kw in BUILTIN_PARAMS.items()}
    for kw, value in _parse_options(spec, query, BUILTIN_PARAMS).items():
        try:
            kwargs[kw] = int(value)
        except ValueError:
            raise DataError(f"parameter {keys[kw]!r} in {spec!r} must be an integer, got {value!r}") from None
    builtin = importlib.import_module("xmodal.data.builtin")
    return builtin.BuiltinSource(**kwargs)


def _check_ratio(test_ratio: float) -> None:
    if not 0.0 <= float(test_ratio) < 1.0:
        raise ConfigError(f"test_ratio must be in [0, 1), got {test_ratio}")


def stratified_holdout(
    labels: np.ndarray, test_ratio: float, *, seed: int, keys: Optional[Iterable[int]] = None
) -> np.ndarray:
    """Seeded stratified train/test split.

    Each class with ``n`` objects gets ``round(n * test_ratio)`` test objects, clamped to
    ``[1, n - 1]`` when ``n >= 2`` and ``test_ratio > 0`` (a single object stays train).
    The choice within a class depends only on ``seed``, that class's key and its own
    objects, so adding a class does not reshuffle the others.

    Args:
        labels: (n,) int class index of each object, in a fixed order.
        test_ratio: fraction to hold out, in [0, 1).
        seed: random seed.
        keys: optional stable int key per class index (default: the class index).

    Returns:
        (n,) bool, True for test objects.
    """
    _check_ratio(test_ratio)
    labels = np.asarray(labels)
    is_test = np.zeros(len(labels), dtype=bool)
    if test_ratio == 0 or len(labels) == 0:
        return is_test
    key_of = dict(enumerate(keys)) if keys is not None else None
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = len(members)
        if n < 2:
            continue
        n_test = min(max(int(round(n * test_ratio)), 1), n - 1)
        key = key_of[int(c)] if key_of is not None else int(c)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(key) & 0xFFFFFFFF])
        is_test[members[rng.permutation(n)[:n_test]]] = True
    return is_test


def _text(name: str) -> str:
    """A file or folder name as text any file format can store: a name that is not valid UTF-8
    (``os.listdir`` gives its bytes as surrogates) gets them as ``\\xNN`` escapes (``caf\\xe9``)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _class_key(name: str) -> int:
    """Stable int key of a class name (independent of Python's hash seed)."""
    return zlib.crc32(name.encode("utf-8", "surrogateescape"))


def _unique_ids(ids: list[str], alternatives: list[str]) -> list[str]:
    """Replace colliding ids by their ``alternatives`` (then ``~k`` suffixes), deterministically."""
    count: dict[str, int] = defaultdict(int)
    for i in ids:
        count[i] += 1
    out = [alt if count[i] > 1 else i for i, alt in zip(ids, alternatives)]
    seen: dict[str, int] = defaultdict(int)
    result = []
    for i in out:
        seen[i] += 1
        result.append(i if seen[i] == 1 else f"{i}~{seen[i]}")
    return result


# --------------------------------------------------------------------------- meshes


def _mesh_files(folder: Path) -> list[Path]:
    """Mesh files below ``folder`` (recursive, hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.startswith(".") and is_mesh_file(fn):
                found.append(Path(dirpath) / fn)
    return found


def _meshes_directly_in(folder: Path) -> list[Path]:
    """The mesh files in ``folder`` itself (not below it)."""
    return [p for p in folder.iterdir() if p.is_file() and is_mesh_file(p)]


def _split_folders(cdir: Path) -> dict[str, Path]:
    """``{split: folder}`` of a class folder's ``train``/``test`` sub-folders (any case)."""
    return {d.name.lower(): d for d in cdir.iterdir() if d.is_dir() and d.name.lower() in SPLIT_DIRS}


def _class_folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _mesh_folders(cdir: Path) -> list[tuple[Optional[str], Path]]:
    """Where a class folder's meshes are read, by both mesh readers: ``(split, folder)`` for each of
    its ``train``/``test`` sub-folders (in :data:`SPLIT_DIRS` order), or ``[(None, cdir)]`` when it
    has none (a seeded split)."""
    splits = _split_folders(cdir)
    return [(s, splits[s]) for s in SPLIT_DIRS if s in splits] or [(None, cdir)]


def mesh_folder_count(root: "str | os.PathLike") -> int:
    """How many meshes :class:`MeshFolderSource` reads under ``root``, without its warnings."""
    return sum(len(_mesh_files(folder)) for cdir in _class_folders(Path(root)) for _, folder in _mesh_folders(cdir))


def _warn_unread(cdir: Path, splits: str) -> None:
    """Warn of the meshes of a class folder with split sub-folders that are not read: beside those
    folders, or in its other sub-folders (``val/``...)."""
    beside = _meshes_directly_in(cdir)
    if beside:
        logger.warning("%s: %d mesh files beside its %s folder(s) are not used (a class folder with "
                       "train/ or test/ takes its meshes from those)", cdir, len(beside), splits)
    others = [d for d in _class_folders(cdir) if d.name.lower() not in SPLIT_DIRS]
    n = sum(len(_mesh_files(d)) for d in others)
    if n:
        logger.warning("%s: %d mesh files in its sub-folder(s) %s are not used (a class folder with train/ or test/ "
                       "takes its meshes from those)", cdir, n, ", ".join(_text(d.name) + "/" for d in others))


def _warn_empty(root: Path, empty: list[str]) -> None:
    if empty:
        logger.warning("%s: %d class folders hold no mesh file (%s) and are not classes (mesh files: %s)", root,
                       len(empty), reprlib.repr(empty), ", ".join(MESH_EXTENSIONS))


def _split_first(tops: list[Path]) -> bool:
    """Whether the folders of a mesh collection's root are its splits (``<root>/<split>/<class>/``):
    each is named for a split, and ``train`` or ``test`` is among them."""
    names = {d.name.lower() for d in tops}
    return bool(names) and names <= {*SPLIT_DIRS, *OTHER_SPLIT_DIRS} and bool(names & set(SPLIT_DIRS))


class MeshFolderSource(Source):
    """Meshes in class sub-folders.

    Three layouts:

    * split folders first: ``<root>/train/<class>/…`` and/or ``<root>/test/<class>/…`` (every
      folder of the root named for a split); the split comes from the path;
    * otherwise decided per class folder: Princeton ModelNet, ``<root>/<class>/train/…`` and/or
      ``<root>/<class>/test/…``, the split from the path (files of other sub-folders of such a
      class are not read); plain, meshes anywhere below ``<root>/<class>/``, a seeded stratified
      ``test_ratio`` of each class becomes ``test`` (:func:`stratified_holdout`).

    Meshes the layout does not read (in ``val/`` folders, beside split folders, directly in the
    root) and class folders without a mesh file are named in warnings.

    Items are sorted by id ``"<class>/<split>/<stem>"``; ids that would collide (same
    stem in two sub-folders or with two extensions) use the relative path instead.
    Meshes are z-up (ModelNet convention).
    """

    kind = "mesh"
    up_axis = "z"

    def __init__(self, root: "str | os.PathLike", *, seed: int = 0, test_ratio: float = 0.2):
        super().__init__()
        _check_ratio(test_ratio)
        self.root = Path(root)
        self.seed = int(seed)
        self.test_ratio = float(test_ratio)
        if not self.root.is_dir():
            raise MissingInputError("mesh folder does not exist or is not a folder", path=self.root)

        tops = _class_folders(self.root)
        split_first = _split_first(tops)
        if split_first:
            entries, split_classes, plain_classes = self._split_first_entries(tops), [], []
        else:
            entries, split_classes, plain_classes = self._class_first_entries(tops)
        loose = [p.name for p in _meshes_directly_in(self.root)]
        if not entries:
            hint = (
                f" ({len(loose)} mesh files lie directly in it: put them in class sub-folders)" if loose else ""
            )
            if split_first:
                hint = (f" (its folders {', '.join(d.name for d in tops)} are read as splits, <root>/<split>/<class>/; "
                        "for the train/test folders of one class, give the folder that holds the class folders)")
            raise DataError(f"no mesh files found in class sub-folders{hint}", path=self.root, hint=ACCEPTED_FORMS)

        if loose:
            logger.warning("%s: %d mesh files lie directly in it and are not used (only class sub-folders are "
                           "read)", self.root, len(loose))
        ids = [f"{c}/{s}/{_text(p.stem)}" for c, s, p, _ in entries]
        alts = []
        for c, s, p, base in entries:
            rel = p.relative_to(base)
            parts = tuple(_text(x) for x in rel.parent.parts) + (f"{_text(rel.stem)}_{rel.suffix[1:].lower()}",)
            alts.append(f"{c}/{s}/" + "__".join(parts))
        ids = _unique_ids(ids, alts)
        self.items = sorted(
            (Item(id=i, label=c, split=s, path=str(p)) for i, (c, s, p, _) in zip(ids, entries)),
            key=lambda it: it.id,
        )
        self.classes = sorted({c for c, *_ in entries})
        self.layout = "modelnet" if not plain_classes else ("class-folders" if not split_classes else "mixed")
        if split_first:
            self.layout = "split-folders"
        counts = {s: sum(it.split == s for it in self.items) for s in SPLIT_DIRS}
        how = {
            "split-folders": "splits from the <split>/<class>/ folders",
            "modelnet": "splits from the <class>/<split>/ folders",
            "class-folders": f"seeded (seed {self.seed}) stratified split, test_ratio {self.test_ratio:g}",
            "mixed": f"splits from folders for {len(split_classes)} classes, seeded (seed {self.seed}) "
            f"stratified test_ratio {self.test_ratio:g} split for {len(plain_classes)}",
        }[self.layout]
        self.description = (
            f"meshes in {self.root} ({self.layout} layout): {len(self.classes)} classes, "
            f"{counts['train']} train / {counts['test']} test; {how}"
        )

    def _class_first_entries(self, tops: list[Path]) -> tuple[list, list[str], list[str]]:
        """``(entries, classes with split folders, classes split by seed)`` of ``<root>/<class>/…``;
        an entry: ``(class, split, file, folder its id is relative to)``."""
        entries: list[tuple[str, str, Path, Path]] = []
        split_classes, plain_classes, empty = [], [], []
        for cdir in tops:
            cname = _text(cdir.name)
            folders = _mesh_folders(cdir)
            if folders[0][0] is not None:
                n_before = len(entries)
                for split, folder in folders:
                    entries += [(cname, split, p, folder) for p in _mesh_files(folder)]
                if len(entries) > n_before:
                    split_classes.append(cname)
                else:
                    empty.append(cname)
                _warn_unread(cdir, "/".join(sorted(split for split, _ in folders)))
            else:
                files = _mesh_files(cdir)
                if not files:
                    empty.append(cname)
                    continue
                plain_classes.append(cname)
                # label 0 for every file: the split is stratified per class by construction
                is_test = stratified_holdout(
                    np.zeros(len(files), np.int64), self.test_ratio, seed=self.seed, keys=[_class_key(cname)]
                )
                entries += [(cname, "test" if t else "train", p, cdir) for p, t in zip(files, is_test)]
        _warn_empty(self.root, empty)
        return entries, split_classes, plain_classes

    def _split_first_entries(self, tops: list[Path]) -> list:
        """The entries of ``<root>/<split>/<class>/…`` (see :meth:`_class_first_entries`)."""
        entries: list[tuple[str, str, Path, Path]] = []
        empty = set()
        for sdir in tops:
            split = sdir.name.lower()
            if split not in SPLIT_DIRS:
                n = len(_mesh_files(sdir))
                if n:
                    logger.warning("%s: %d mesh files in it are not used (a store has the splits %s only)", sdir, n,
                                   " and ".join(SPLIT_DIRS))
                continue
            for cdir in _class_folders(sdir):
                files = _mesh_files(cdir)
                entries += [(_text(cdir.name), split, p, cdir) for p in files]
                if not files:
                    empty.add(_text(cdir.name))
            loose = _meshes_directly_in(sdir)
            if loose:
                logger.warning("%s: %d mesh files lie directly in it and are not used (read as <root>/<split>/"
                               "<class>/: put them in class sub-folders)", sdir, len(loose))
        _warn_empty(self.root, sorted(empty - {c for c, *_ in entries}))
        return entries

    def load(self, item: Item) -> Mesh:
        """Load ``item``'s mesh with :func:`~xmodal.data.mesh_io.load_mesh` (raises MeshError)."""
        return load_mesh(item.path)

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "layout": self.layout,
                "seed": self.seed, "test_ratio": self.test_ratio}


# --------------------------------------------------------------------------- HDF5 points

#: most classes a ModelNet40 HDF5 folder without ``shape_names.txt`` may label (named class_<k>)
MAX_UNNAMED_CLASSES = 10_000
_H5_NAME = re.compile(r"ply_data_(train|test)_?(\d*)\.h5$")


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False also for a name the OS refuses (too long, bad bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class ModelNetH5Source(Source):
    """The ModelNet40 HDF5 point-cloud release (PointNet's ``modelnet40_ply_hdf5_2048`` layout).

    ``root`` holds ``ply_data_train*.h5`` / ``ply_data_test*.h5`` (datasets ``data``
    (N, P, 3) float32 and ``label`` (N, 1) int), ``shape_names.txt`` (class index -> name),
    optionally ``train_files.txt`` / ``test_files.txt`` (file order) and
    ``ply_data_<split>_<k>_id2file.json`` (original shape id of each row, e.g.
    ``"chair/chair_0001.off"``, giving item ids ``"chair/<split>/chair_0001"``).

    Without any test file a seeded stratified ``test_ratio`` of train is held out as
    ``test``; then ``held_out`` is True and the description says so. The release is y-up.
    Item ``path`` is the h5 file, ``index`` the row.
    """

    kind = "points"
    up_axis = "y"

    def __init__(self, root: "str | os.PathLike", *, seed: int = 0, test_ratio: float = 0.2):
        super().__init__()
        _check_ratio(test_ratio)
        self.root = Path(root)
        self.seed = int(seed)
        self.test_ratio = float(test_ratio)
        if not self.root.is_dir():
            raise MissingInputError("HDF5 folder does not exist or is not a folder", path=self.root)

        files = {s: self._split_files(s) for s in SPLIT_DIRS}
        if not files["train"] and not files["test"]:
            raise DataError("no ply_data_train*.h5 or ply_data_test*.h5 files", path=self.root, hint=ACCEPTED_FORMS)
        raw_names = self._read_names()
        rows = self._read_rows(files, raw_names)
        if raw_names is None:
            n_cls = max(lab for *_, lab, _ in rows) + 1 if rows else 0
            if n_cls > MAX_UNNAMED_CLASSES:
                raise DataError(f"class labels go up to {n_cls - 1} and there is no shape_names.txt to name them",
                                path=self.root, hint="add shape_names.txt (one class name per line)")
            raw_names = [f"class_{i:02d}" for i in range(n_cls)]
            logger.warning("%s: no shape_names.txt; naming classes class_00 .. class_%02d", self.root, n_cls - 1)
        self.classes = sorted(raw_names)

        self.held_out = not files["test"]
        if self.held_out:
            is_test = stratified_holdout(np.array([lab for *_, lab, _ in rows]), self.test_ratio, seed=self.seed)
            rows = [("test" if t else s, f, r, lab, o) for (s, f, r, lab, o), t in zip(rows, is_test)]
        self.items = self._make_items(rows, raw_names)
        # labels of load_all() index self.classes (sorted), whatever the order of shape_names.txt
        self._label_index = {n: i for i, n in enumerate(self.classes)}
        self.description = self._describe()
        self._handles: dict[str, object] = {}
        self._blocks: dict[str, tuple[int, np.ndarray]] = {}
        self._pid = os.getpid()

    def _read_names(self) -> Optional[list[str]]:
        """Class names of ``shape_names.txt`` in file order (index = stored label), or None without it."""
        names_file = self.root / "shape_names.txt"
        if not names_file.is_file():
            return None
        try:
            text = names_file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text (byte {exc.start})", path=names_file) from None
        raw_names = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if len(set(raw_names)) != len(raw_names):
            raise DataError("duplicate class names", path=names_file)
        return raw_names

    def _read_rows(self, files: dict, raw_names: Optional[list[str]]) -> list[tuple]:
        """``(split, file, row, raw label, original id or None)`` of every row; checks the files
        and sets ``num_points``."""
        rows: list[tuple[str, Path, int, int, Optional[str]]] = []
        self.num_points = None
        for split in SPLIT_DIRS:
            for f in files[split]:
                labels = self._read_labels(f, raw_names)
                orig = self._original_ids(f, len(labels))
                rows += [(split, f, r, int(lab), orig[r] if orig else None) for r, lab in enumerate(labels)]
        return rows

    def _read_labels(self, f: Path, raw_names: Optional[list[str]]) -> np.ndarray:
        """The (N,) int64 labels of one file, after checking its datasets' layout and sizes."""
        h5py = require("h5py", "reading ModelNet40 HDF5 files")
        try:
            h5 = h5py.File(f, "r")
        except H5_ERRORS as exc:
            raise DataError(f"cannot open HDF5 file ({exc})", path=f) from exc
        with h5:
            try:
                if not all(isinstance(h5.get(k), h5py.Dataset) for k in ("data", "label")):
                    raise DataError(f"expected datasets 'data' and 'label', found {sorted(h5.keys())}", path=f)
                data, label = h5["data"], h5["label"]
                self._check_file(f, data, label)
                labels = np.asarray(label[...]).reshape(-1).astype(np.int64)
            except H5_ERRORS as exc:
                raise DataError(f"cannot read 'label' ({type(exc).__name__}: {exc})", path=f) from exc
        if labels.size and labels.min() < 0:
            raise DataError(f"negative class label {labels.min()}", path=f)
        if raw_names is not None and labels.size and labels.max() >= len(raw_names):
            raise DataError(f"class label {labels.max()} out of range for the {len(raw_names)} names in "
                            f"{self.root / 'shape_names.txt'}", path=f)
        return labels

    def _check_file(self, f: Path, data, label) -> None:
        """Shapes, types and stored sizes of one file's ``data`` (N, P, 3) and ``label`` (N[, 1])."""
        shape = data.shape
        if len(shape) != 3 or shape[2] != 3 or shape[1] < 1 or data.dtype.kind not in "fiu":
            raise DataError(f"dataset 'data' must be numbers of shape (N, P, 3) with P >= 1, got {data.dtype} {shape}",
                            path=f)
        if label.shape not in ((shape[0],), (shape[0], 1)) or label.dtype.kind not in "iu":
            raise DataError(f"'label' ({label.dtype} {label.shape}) must hold one integer per row of 'data' {shape}",
                            path=f)
        for ds in (data, label):
            check_stored(ds, f)
        if self.num_points is None:
            self.num_points = int(shape[1])
        elif shape[1] != self.num_points:
            raise DataError(f"{shape[1]} points per shape, other files have {self.num_points}", path=f)

    @staticmethod
    def _make_items(rows: list, raw_names: list[str]) -> list[Item]:
        """One item per row, train before test; ids from the original shape ids where known."""
        ids, alts = [], []
        for split, f, r, lab, orig in rows:
            name = raw_names[lab]
            stem = Path(orig).stem if orig else f"{f.stem}_{r:05d}"
            ids.append(f"{name}/{split}/{stem}")
            alts.append(f"{name}/{split}/{stem}__{f.stem}_{r:05d}")
        ids = _unique_ids(ids, alts)
        order = {s: i for i, s in enumerate(SPLIT_DIRS)}
        return [
            Item(id=i, label=raw_names[lab], split=s, path=str(f), index=r)
            for i, (s, f, r, lab, _) in sorted(zip(ids, rows), key=lambda t: order[t[1][0]])
        ]

    def _describe(self) -> str:
        counts = {s: sum(it.split == s for it in self.items) for s in SPLIT_DIRS}
        description = (
            f"ModelNet40 HDF5 points in {self.root}: {len(self.classes)} classes, {self.num_points} points, "
            f"{counts['train']} train / {counts['test']} test"
        )
        if self.held_out:
            description += (
                f"; no test file: test is a stratified held-out {self.test_ratio:g} of the train files "
                f"(seed {self.seed})"
            )
        return description

    # ---------------------------------------------------------------- discovery helpers

    def _split_files(self, split: str) -> list[Path]:
        listing = self.root / f"{split}_files.txt"
        present = sorted(
            (p for p in self.root.glob(f"ply_data_{split}*.h5") if _H5_NAME.search(p.name)),
            key=lambda p: _natural_key(p.name),
        )
        if not listing.is_file():
            return present
        out = []
        try:
            text = listing.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text (byte {exc.start})", path=listing) from None
        for ln in text.splitlines():
            if not ln.strip():
                continue
            p = self.root / Path(ln.strip()).name  # listed relative to some other folder: keep the name
            if not _is_file(p):
                raise MissingInputError(f"lists {reprlib.repr(ln.strip())} but {reprlib.repr(str(p))} does not exist",
                                        path=listing)
            out.append(p)
        unlisted = set(present) - set(out)
        if unlisted:
            logger.warning("%s: ignoring h5 files not listed there: %s", listing, sorted(p.name for p in unlisted))
        return out

    def _original_ids(self, h5_path: Path, n: int) -> Optional[list[str]]:
        m = _H5_NAME.search(h5_path.name)
        split, num = m.group(1), m.group(2)
        for cand in (f"ply_data_{split}_{num}_id2file.json", f"ply_data_{split}{num}_id2file.json"):
            p = self.root / cand
            if p.is_file():
                try:
                    ids = read_json(p)
                except (OSError, ValueError) as exc:
                    raise DataError(f"unreadable id list ({getattr(exc, 'problem', exc)})", path=p) from None
                if not isinstance(ids, list) or len(ids) != n:
                    logger.warning("%s: expected a list of %d ids; ignoring it", p, n)
                    return None
                return [str(i) for i in ids]
        return None

    # ---------------------------------------------------------------- reading

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_blocks"] = {}, {}  # h5py handles do not cross processes
        return state

    def _file(self, path: str):
        if self._pid != os.getpid():  # forked: never share the parent's HDF5 handles
            self._handles, self._blocks, self._pid = {}, {}, os.getpid()
        h5 = self._handles.get(path)
        if h5 is None:
            h5py = require("h5py", "reading ModelNet40 HDF5 files")
            try:
                h5 = h5py.File(path, "r")
            except H5_ERRORS as exc:
                raise MeshError(path, f"cannot open HDF5 file: {exc}") from exc
            self._handles[path] = h5
        return h5

    def load(self, item: Item) -> PointCloud:
        """Points of one row: ``points`` (P, 3) float32, ``point_labels`` None.

        Rows are read one chunk-aligned block at a time (the release stores ``data`` in
        gzip chunks of 128 rows, so a single row costs a whole chunk anyway); the last
        block of each file is kept, which makes reading items in order cheap.
        """
        row = int(item.index)
        try:
            ds = self._file(item.path)["data"]
            if not 0 <= row < ds.shape[0]:
                raise MeshError(item.path, f"row {row} out of range [0, {ds.shape[0]})")
            step = ds.chunks[0] if ds.chunks else 1
            start = row - row % step
            cached = self._blocks.get(item.path)
            if cached is None or cached[0] != start:
                cached = (start, np.asarray(ds[start : start + step], dtype=np.float32))
                self._blocks[item.path] = cached
        except H5_ERRORS as exc:
            raise MeshError(item.path, f"cannot read row {row} ({type(exc).__name__}: {exc})") from exc
        pts = np.array(cached[1][row - start], dtype=np.float32)
        if not np.isfinite(pts).all():
            raise MeshError(item.path, f"row {row}: non-finite point coordinates")
        return PointCloud(points=pts)

    def load_all(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """All objects of ``split`` at once, reading each file whole.

        Returns:
            ``points`` (n, P, 3) float32, ``labels`` (n,) int64 indices into
            :attr:`classes`, ``ids`` (n,) list of item ids – in the order of :attr:`items`.
        """
        items = [it for it in self.items if it.split == split]
        if not items and split not in SPLIT_DIRS:
            raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLIT_DIRS)}")
        points = np.empty((len(items), self.num_points or 0, 3), dtype=np.float32)
        by_file: dict[str, list[int]] = defaultdict(list)
        for pos, it in enumerate(items):
            by_file[it.path].append(pos)
        for path, positions in by_file.items():
            try:
                data = self._file(path)["data"][...]
            except H5_ERRORS as exc:
                raise DataError(f"cannot read 'data' ({type(exc).__name__}: {exc})", path=path) from exc
            points[positions] = data[[items[p].index for p in positions]]
        bad = np.flatnonzero(~np.isfinite(points).all(axis=(1, 2)))
        if bad.size:
            it = items[int(bad[0])]
            raise DataError(f"row {it.index}: non-finite point coordinates ({bad.size} shapes of split '{split}')",
                            path=it.path)
        labels = np.array([self._label_index[it.label] for it in items], dtype=np.int64)
        return points, labels, [it.id for it in items]

    def close(self) -> None:
        """Close the HDF5 files this process opened."""
        for h5 in self._handles.values():
            try:
                h5.close()
            except Exception:  # already closed / interpreter shutting down
                pass
        self._handles, self._blocks = {}, {}

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "held_out": self.held_out,
                "seed": self.seed, "test_ratio": self.test_ratio, "num_points": self.num_points}
