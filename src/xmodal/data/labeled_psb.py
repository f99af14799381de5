"""Labeled PSB (Kalogerakis, Hertzmann & Singh, SIGGRAPH 2010): meshes with a part label on every face.

Layout (recognised by :func:`is_labeled_mesh_folder`)::

    <root>/<Category>/<stem>.{off,ply,obj}       a mesh
    <root>/<Category>/<stem>_labels.txt          its face labels
    <root>/<Category>/{train,test}/...           optional split level, same files inside

A labels file holds pairs of lines: a part name, then the 1-based indices of the faces with
that part (:func:`read_face_labels`). Face ``i`` is the file's ``i``-th triangle, so meshes
are read without dropping anything before the labels are attached (degenerate faces are
removed afterwards together with their labels). Part names are shared within a category;
:class:`LabeledPSBSource` gives each ``"<Category>/<part>"`` a global part id, like
``builtin:shapes`` and ShapeNet-Part do.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from xmodal.data.mesh_io import read_mesh_arrays
from xmodal.data.sources import (
    SPLIT_DIRS,
    _check_ratio,
    _class_folders,
    _class_key,
    _mesh_folders,
    _split_folders,
    _text,
    stratified_holdout,
)
from xmodal.data.types import Item, Mesh, Source
from xmodal.errors import DataError, LabelsError, MissingInputError

__all__ = [
    "LABELS_SUFFIX",
    "LABELED_MESH_EXTENSIONS",
    "labels_path",
    "read_face_labels",
    "is_labeled_mesh_folder",
    "labeled_mesh_counts",
    "LabeledPSBSource",
]

log = logging.getLogger(__name__)

LABELS_SUFFIX = "_labels.txt"
#: mesh formats that keep the file's face order when read (what the labels index)
LABELED_MESH_EXTENSIONS = (".off", ".ply", ".obj")

_INT = re.compile(r"[+-]?\d+")
_SHOWN = 5  # faces named in a "left out" message


def labels_path(mesh_path: "str | os.PathLike") -> Path:
    """The labels file of a mesh: ``<dir>/<stem>.ply`` -> ``<dir>/<stem>_labels.txt``."""
    p = Path(mesh_path)
    return p.with_name(p.stem + LABELS_SUFFIX)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LabelsError(path, "labels file is missing") from None
    except OSError as exc:
        raise LabelsError(path, f"cannot read labels file: {exc.strerror or exc}") from exc
    if b"\x00" in raw:
        raise LabelsError(path, "binary data, not a text labels file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabelsError(path, f"not UTF-8 text (byte {exc.start})") from None


def _parse_parts(path: Path) -> list[tuple[str, list[tuple[int, np.ndarray]]]]:
    """``[(part name, [(line number, 1-based face indices (k,) int64), ...]), ...]`` in file order.

    A line of integers lists faces of the last named part; any other non-blank line must be
    one word, a part name. A name given twice continues that part.
    """
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    current: Optional[str] = None
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if _INT.fullmatch(tokens[0]):
            if not all(_INT.fullmatch(t) for t in tokens):
                bad = next(t for t in tokens if not _INT.fullmatch(t))
                raise LabelsError(path, f"line {lineno}: {bad[:30]!r} is not a face index (integers only)")
            if current is None:
                raise LabelsError(path, f"line {lineno}: face indices before any part name")
            try:
                parts[current].append((lineno, np.array(tokens, dtype=np.int64)))
            except (ValueError, OverflowError):  # more digits than any face count
                big = max(tokens, key=len)
                raise LabelsError(path, f"line {lineno}: face index {big[:30]}{'...' if len(big) > 30 else ''} "
                                  "is out of range") from None
        elif len(tokens) == 1 and not _is_number(tokens[0]):
            current = tokens[0]
            parts.setdefault(current, [])
        else:
            raise LabelsError(path, f"line {lineno}: expected a part name (one word) or face indices, got {line[:60]!r}")
    if not parts:
        raise LabelsError(path, "no part labels in the file")
    return list(parts.items())


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_face_labels(path: "str | os.PathLike", num_faces: int) -> tuple[np.ndarray, list[str]]:
    """Read a Labeled-PSB labels file and check that it labels every face exactly once.

    The file holds pairs of lines: a part name (one word), then the 1-based indices of the
    faces of that part (a part's indices may span several lines; a name given twice
    continues that part). Blank lines are ignored.

    Args:
        path: the ``<stem>_labels.txt`` file.
        num_faces: F, the number of faces of the mesh (triangles, in file order).

    Returns:
        ``labels`` (F,) int64, the index of each face's part in ``names``, and ``names``
        (the part names in order of first appearance).

    Raises:
        LabelsError: the file is missing or unreadable, a line is neither a name nor
            integers, a face index is out of ``1..F``, a face is listed twice, or a face
            is left out (the message names the file and the first faces concerned, 1-based).
    """
    path = Path(path)
    parts = _parse_parts(path)
    names = [name for name, _ in parts]
    owner = np.full(num_faces, -1, dtype=np.int64)
    for j, (name, chunks) in enumerate(parts):
        for lineno, idx in chunks:
            bad = (idx < 1) | (idx > num_faces)
            if bad.any():
                raise LabelsError(
                    path, f"line {lineno}: face {int(idx[bad][0])} is out of range 1..{num_faces} "
                    f"(the mesh has {num_faces} faces; indices are 1-based)",
                )
            zero = idx - 1
            uniq, counts = np.unique(zero, return_counts=True)
            taken = owner[uniq] >= 0
            if taken.any() or (counts > 1).any():
                face = int(uniq[taken][0] if taken.any() else uniq[counts > 1][0])
                first = names[owner[face]] if owner[face] >= 0 else name
                raise LabelsError(
                    path, f"face {face + 1} is listed twice (under '{first}' and '{name}', line {lineno})"
                )
            owner[zero] = j
    missing = np.flatnonzero(owner < 0)
    if missing.size:
        shown = ", ".join(str(int(f) + 1) for f in missing[:_SHOWN]) + (", ..." if missing.size > _SHOWN else "")
        raise LabelsError(path, f"{missing.size} of {num_faces} faces have no part label (faces {shown})")
    return owner, names


def _scan_part_names(path: Path) -> list[str]:
    """The part names of a labels file, [] when it cannot be read (its mesh fails at load)."""
    try:
        return [name for name, _ in _parse_parts(path)]
    except LabelsError as exc:
        log.debug("part table: ignoring %s", exc)
        return []


def _folder_meshes(folder: Path, *, quiet: bool = False) -> list[Path]:
    """Meshes directly in ``folder``, one per stem (the first of :data:`LABELED_MESH_EXTENSIONS`);
    ``quiet``: no warning for two meshes of one stem (when only counting)."""
    by_stem: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        ext = p.suffix.lower()
        if p.name.startswith(".") or not p.is_file() or ext not in LABELED_MESH_EXTENSIONS:
            continue
        old = by_stem.get(p.stem)
        if old is None or LABELED_MESH_EXTENSIONS.index(ext) < LABELED_MESH_EXTENSIONS.index(old.suffix.lower()):
            if old is not None and not quiet:
                log.warning("%s: two meshes share the labels of stem %r; using %s", folder, p.stem, p.name)
            by_stem[p.stem] = p
    return [by_stem[s] for s in sorted(by_stem)]


def is_labeled_mesh_folder(root: "str | os.PathLike") -> bool:
    """True when some category folder of ``root`` (or its ``train``/``test`` level) holds a
    mesh ``<stem>.{off,ply,obj}`` with a ``<stem>_labels.txt`` beside it."""
    root = Path(root)
    if not root.is_dir():
        return False
    for cdir in _class_folders(root):
        for folder in [cdir, *_split_folders(cdir).values()]:
            for lab in folder.glob("*" + LABELS_SUFFIX):
                stem = lab.name[: -len(LABELS_SUFFIX)]
                if any((folder / (stem + e)).is_file() for ext in LABELED_MESH_EXTENSIONS for e in (ext, ext.upper())):
                    return True
    return False


def labeled_mesh_counts(root: "str | os.PathLike") -> tuple[int, int]:
    """``(labelled, meshes)``: the meshes the Labeled PSB layout reads under ``root`` (each category
    folder and its ``train``/``test`` level, one per stem), and how many of them have a
    ``<stem>_labels.txt`` beside them."""
    root = Path(root)
    labelled = meshes = 0
    if not root.is_dir():
        return 0, 0
    for cdir in _class_folders(root):
        for _, folder in _mesh_folders(cdir):
            found = _folder_meshes(folder, quiet=True)
            meshes += len(found)
            labelled += sum(labels_path(m).is_file() for m in found)
    return labelled, meshes


class LabeledPSBSource(Source):
    """Labeled PSB meshes (see the module doc): category from the folder, per-face global part ids.

    Split: from a ``<Category>/<train|test>/`` level where a category has one, else a seeded
    stratified ``test_ratio`` of the category (:func:`~xmodal.data.sources.stratified_holdout`).
    Items are sorted by id ``"<Category>/<split>/<stem>"``.

    Part table: each category's parts are the sorted union of the names in its labels files;
    global ids follow the sorted categories, then that order (``part_names`` holds
    ``"<Category>/<part>"``, ``category_parts`` the local names per category). ``load``
    raises :class:`~xmodal.errors.LabelsError` for a labels file that is missing or does
    not label every face exactly once, so ``prepare`` skips that mesh and lists it under
    ``failed``. Orientation varies across the benchmark; most upright categories are y-up.
    """

    kind = "mesh"
    up_axis = "y"

    def __init__(self, root: "str | os.PathLike", *, seed: int = 0, test_ratio: float = 0.2):
        super().__init__()
        _check_ratio(test_ratio)
        self.root = Path(root)
        self.seed = int(seed)
        self.test_ratio = float(test_ratio)
        if not self.root.is_dir():
            raise MissingInputError("Labeled PSB folder does not exist or is not a folder", path=self.root)
        entries: list[tuple[str, str, Path]] = []
        from_folders = []
        for cdir in _class_folders(self.root):
            found = self._category_entries(cdir)
            entries += found
            if found and _split_folders(cdir):
                from_folders.append(_text(cdir.name))
        if not entries:
            raise DataError(f"no meshes {LABELED_MESH_EXTENSIONS} in category folders", path=self.root)
        self.items = sorted(
            (Item(id=f"{c}/{s}/{_text(p.stem)}", label=c, split=s, path=str(p)) for c, s, p in entries),
            key=lambda it: it.id,
        )
        self.classes = sorted({c for c, _, _ in entries})
        self._build_part_table()
        counts = {s: sum(it.split == s for it in self.items) for s in SPLIT_DIRS}
        seeded = f"seeded (seed {self.seed}) stratified split, test_ratio {self.test_ratio:g}"
        if len(from_folders) == len(self.classes):
            self.layout, how = "split-folders", "splits from the <Category>/<split>/ folders"
        elif not from_folders:
            self.layout, how = "seeded-split", seeded
        else:
            self.layout = "mixed"
            how = f"splits from folders for {len(from_folders)} categories, {seeded} for the rest"
        self.description = (
            f"Labeled PSB meshes in {self.root}: {len(self.classes)} categories, {len(self.part_names)} parts, "
            f"{counts['train']} train / {counts['test']} test; {how}"
        )

    def _category_entries(self, cdir: Path) -> list[tuple[str, str, Path]]:
        folders, cname = _mesh_folders(cdir), _text(cdir.name)
        if folders[0][0] is not None:
            return [(cname, s, p) for s, folder in folders for p in _folder_meshes(folder)]
        files = _folder_meshes(cdir)
        is_test = stratified_holdout(
            np.zeros(len(files), np.int64), self.test_ratio, seed=self.seed, keys=[_class_key(cname)]
        )
        return [(cname, "test" if t else "train", p) for p, t in zip(files, is_test)]

    def _build_part_table(self) -> None:
        local: dict[str, set[str]] = {c: set() for c in self.classes}
        for it in self.items:
            local[it.label].update(_scan_part_names(labels_path(it.path)))
        self.category_parts: dict[str, list[str]] = {c: sorted(local[c]) for c in self.classes}
        self.part_names = [f"{c}/{p}" for c in self.classes for p in self.category_parts[c]]
        self._part_id = {name: i for i, name in enumerate(self.part_names)}

    def load(self, item: Item) -> Mesh:
        """The mesh of ``item`` with ``face_labels`` (F,) global part ids.

        Raises:
            MeshError: the mesh cannot be used; LabelsError (a MeshError) when its labels
                file is missing, malformed or does not label every face exactly once.
        """
        vertices, faces = read_mesh_arrays(item.path)
        lab_path = labels_path(item.path)
        local, names = read_face_labels(lab_path, len(faces))
        unknown = [n for n in names if f"{item.label}/{n}" not in self._part_id]
        if unknown:
            raise LabelsError(lab_path, f"parts {unknown} are not in the part table of '{item.label}'")
        ids = np.array([self._part_id[f"{item.label}/{n}"] for n in names], dtype=np.int64)
        return Mesh(vertices, faces, ids[local], source=item.path)  # validates; degenerate faces leave with their labels

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "layout": self.layout,
                "seed": self.seed, "test_ratio": self.test_ratio}
