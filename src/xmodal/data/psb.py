"""The Princeton Shape Benchmark (PSB) as a mesh source, and its ``.cla`` classification files.

The benchmark's own layout (Shilane et al., SMI 2004)::

    ROOT/db/<id // 100>/m<id>/m<id>.off        one folder per model (.ply accepted too)
    ROOT/classification/v1/<granularity>/*.cla  base, coarse1, coarse2, coarse3

Each granularity folder holds one ``.cla`` file per half of the benchmark: ``train.cla``
/ ``test.cla`` (base) or ``<granularity>Train.cla`` / ``<granularity>Test.cla``. A file
whose name ends in neither ``train`` nor ``test`` (such as a classification of all models
at once) is ignored.

``.cla`` format (:func:`read_cla`)::

    PSB 1
    <numClasses> <numModels>
    <name> <parent> <count>      # parent 0 is the root; hierarchy-only nodes have count 0
    <model id>                   # count lines, one id each
    ...

Blank lines may appear anywhere. Class names are unique within a file; a parent must be
defined before its children (as the benchmark's own parser requires).

:class:`PsbSource` makes one item per listed model: its split is the half whose ``.cla``
lists it, its class the leaf class that lists it in the chosen granularity (``base`` by
default), its id ``"<class>/<split>/m<id>"``. Only classes that list models are classes.
A model listed but absent on disk stays an item whose :meth:`PsbSource.load` raises
:class:`~xmodal.errors.MeshError`, so ``prepare`` records it under ``failed`` and goes on.
PSB models are not aligned; most are y-up, so the source says ``up_axis = "y"``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmodal.data.mesh_io import load_mesh
from xmodal.data.types import Item, Mesh, Source
from xmodal.errors import DataError, MeshError

__all__ = [
    "ROOT_PARENT",
    "MISC_CLASS",
    "PSB_MESH_EXTENSIONS",
    "ClaClass",
    "Classification",
    "read_cla",
    "is_psb_root",
    "cla_split",
    "psb_mesh_path",
    "PsbSource",
]

#: parent name of top-level classes
ROOT_PARENT = "0"
#: name of the benchmark's "miscellaneous" class (``MISC_CLASS`` of its ``PSBClaParse.h``);
#: its models are never queries in the benchmark's statistics
MISC_CLASS = "-1"
#: model file extensions looked for, in this order (the distribution ships .off)
PSB_MESH_EXTENSIONS = (".off", ".ply")
_CLASSIFICATION_DIR = ("classification", "v1")
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class ClaClass:
    """One class of a ``.cla`` file: ``name``, ``parent`` (``"0"`` = root), the model ids it
    lists (empty for a hierarchy-only node) and ``line``, the 1-based line of its header."""

    name: str
    parent: str
    models: tuple[int, ...]
    line: int


@dataclass(frozen=True)
class Classification:
    """A parsed ``.cla`` file: its ``path`` and its classes in file order."""

    path: str
    classes: tuple[ClaClass, ...]

    @property
    def num_models(self) -> int:
        return sum(len(c.models) for c in self.classes)

    def class_of(self) -> dict[int, str]:
        """Model id -> name of the class listing it."""
        return {m: c.name for c in self.classes for m in c.models}

    def class_names(self) -> list[str]:
        """Names of the classes that list at least one model, in file order."""
        return [c.name for c in self.classes if c.models]


class _Lines:
    """Non-blank lines of a text as ``(1-based line number, tokens)``, with one-line look-ahead."""

    def __init__(self, text: str):
        self._rows = [(i + 1, ln.split()) for i, ln in enumerate(text.splitlines()) if ln.strip()]
        self._pos = 0

    def peek(self):
        return self._rows[self._pos] if self._pos < len(self._rows) else None

    def take(self):
        row = self.peek()
        self._pos += row is not None
        return row


def _int(token: str):
    """The integer a token spells in plain ASCII digits (optionally signed), else None; None
    too beyond 18 digits (no count or model id is that large, and Python refuses to convert
    the longest digit strings)."""
    return int(token) if re.fullmatch(r"[+-]?[0-9]{1,18}", token) else None


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not a text file ({exc.reason} at byte {exc.start})", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot be read ({exc.strerror or exc})", path=path) from None


def _read_header(lines: _Lines, path: Path) -> tuple[int, int, int]:
    """``(numClasses, numModels, line of the counts)`` from the first two non-blank lines."""
    row = lines.take()
    if row is None:
        raise DataError("line 1: expected the header 'PSB 1', the file is empty", path=path)
    if row[1] != ["PSB", "1"]:
        raise DataError(f"line {row[0]}: expected the header 'PSB 1', got {' '.join(row[1])!r}", path=path)
    header_line, row = row[0], lines.take()
    if row is None:
        raise DataError(f"line {header_line}: the file ends after the header, without '<numClasses> <numModels>'",
                        path=path)
    counts = [_int(t) for t in row[1]]
    if len(counts) != 2 or None in counts or min(counts) < 0:
        raise DataError(f"line {row[0]}: expected '<numClasses> <numModels>' (two integers >= 0), "
                        f"got {' '.join(row[1])!r}", path=path)
    return counts[0], counts[1], row[0]


def _read_class(lines: _Lines, path: Path, defined: dict[str, int], owner: dict[int, str]) -> ClaClass:
    """The class whose header is the next line, with its model ids; checks names and ids."""
    line, tokens = lines.take()
    count = _int(tokens[2]) if len(tokens) == 3 else None
    if count is None or count < 0:
        raise DataError(f"line {line}: expected a class line '<name> <parent> <count>', got {' '.join(tokens)!r}"
                        + (" (more model ids than the previous class's count?)" if len(tokens) == 1 else ""),
                        path=path)
    name, parent = tokens[0], tokens[1]
    if name == ROOT_PARENT:
        raise DataError(f"line {line}: {ROOT_PARENT!r} names the root, it cannot be a class", path=path)
    if name in defined:
        raise DataError(f"line {line}: class {name!r} is already defined on line {defined[name]}", path=path)
    if parent != ROOT_PARENT and parent not in defined:
        raise DataError(f"line {line}: parent {parent!r} of class {name!r} is not a class defined above", path=path)
    models = []
    for k in range(count):
        row = lines.peek()
        if row is None or len(row[1]) != 1:
            after = "the file ends" if row is None else f"line {row[0]} is not a model id"
            raise DataError(f"line {line}: class {name!r} lists {count} models but {after} after {k}", path=path)
        mline, (token,) = lines.take()
        mid = _int(token)
        if mid is None or mid < 0:
            raise DataError(f"line {mline}: model id {token!r} of class {name!r} is not an integer >= 0", path=path)
        if mid in owner:
            raise DataError(f"line {mline}: model {mid} is listed in class {owner[mid]!r} and again in {name!r}",
                            path=path)
        owner[mid] = name
        models.append(mid)
    defined[name] = line
    return ClaClass(name, parent, tuple(models), line)


def read_cla(path: "str | os.PathLike") -> Classification:
    """Parse and check one PSB ``.cla`` classification file (format: module doc).

    Returns:
        a :class:`Classification` with every class (hierarchy nodes included) in file order.

    Raises:
        DataError: naming the file and line: a bad header, a malformed class line, a class
            defined twice or whose parent is not defined above it, a model id that is not an
            integer, a model listed twice, fewer ids than a class's count, or class / model
            totals that differ from the second line's.
    """
    path = Path(path)
    lines = _Lines(_read_text(path))
    n_classes, n_models, counts_line = _read_header(lines, path)
    classes: list[ClaClass] = []
    defined: dict[str, int] = {}
    owner: dict[int, str] = {}
    while lines.peek() is not None:
        classes.append(_read_class(lines, path, defined, owner))
    if len(classes) != n_classes:
        raise DataError(f"line {counts_line}: declares {n_classes} classes but the file defines {len(classes)}", path=path)
    if len(owner) != n_models:
        raise DataError(f"line {counts_line}: declares {n_models} models but the classes list {len(owner)}", path=path)
    return Classification(str(path), tuple(classes))


# --------------------------------------------------------------------------- layout


def is_psb_root(path: "str | os.PathLike") -> bool:
    """True when ``path`` has the benchmark's layout: ``db/`` and ``classification/v1/``."""
    path = Path(path)
    return (path / "db").is_dir() and path.joinpath(*_CLASSIFICATION_DIR).is_dir()


def cla_split(path: "str | os.PathLike"):
    """The half a ``.cla`` file describes, from its name: ``"train"`` for ``train.cla`` /
    ``*Train.cla``, ``"test"`` for ``test.cla`` / ``*Test.cla`` (any case), else None."""
    stem = Path(path).stem.lower()
    return next((s for s in _SPLITS if stem.endswith(s)), None)


def psb_mesh_path(root: "str | os.PathLike", model_id: int) -> Path:
    """File of model ``model_id``: ``root/db/<id // 100>/m<id>/m<id>`` with the first of
    :data:`PSB_MESH_EXTENSIONS` that exists (``.off`` when none does)."""
    folder = Path(root) / "db" / str(model_id // 100) / f"m{model_id}"
    for ext in PSB_MESH_EXTENSIONS:
        candidate = folder / f"m{model_id}{ext}"
        if candidate.is_file():
            return candidate
    return folder / f"m{model_id}{PSB_MESH_EXTENSIONS[0]}"


def _split_files(cla_dir: Path) -> dict[str, Path]:
    """``{split: .cla file}`` of one granularity folder; at most one file per split."""
    found: dict[str, list[Path]] = {s: [] for s in _SPLITS}
    for p in sorted(cla_dir.glob("*.cla")):
        split = cla_split(p)
        if split is not None:
            found[split].append(p)
    for split, files in found.items():
        if len(files) > 1:
            raise DataError(f"{len(files)} {split} classifications ({', '.join(p.name for p in files)}); "
                            "keep one", path=cla_dir)
    out = {s: files[0] for s, files in found.items() if files}
    if not out:
        raise DataError("no train.cla / *Train.cla or test.cla / *Test.cla file", path=cla_dir)
    return out


class PsbSource(Source):
    """Meshes of a Princeton Shape Benchmark folder (layout: module doc).

    Args:
        root: the benchmark folder (holding ``db/`` and ``classification/v1/``).
        classification: granularity, a folder name under ``classification/v1/``
            (``base``, ``coarse1``, ``coarse2``, ``coarse3`` in the distribution).
        test_ratio, seed: only for a folder with a single half (no test ``.cla``): a seeded
            ``test_ratio`` of its *classes* becomes the ``test`` split, whole classes at a time,
            as in the benchmark itself, whose halves hold largely different classes and whose
            retrieval queries and gallery come from one half. 0 keeps the single split.

    Attributes beyond :class:`~xmodal.data.types.Source`: ``root``, ``classification``,
    ``cla_files`` (``{split: path relative to root}``) and ``missing`` (ids of the items
    listed but without a file on disk; they fail at :meth:`load`).

    Raises:
        DataError: no such granularity, no train/test ``.cla`` file, a malformed ``.cla``
            (:func:`read_cla`), or a model listed in both halves.
    """

    kind = "mesh"
    up_axis = "y"

    def __init__(self, root: "str | os.PathLike", *, classification: str = "base", test_ratio: float = 0.0,
                 seed: int = 0):
        super().__init__()
        self.root = Path(root)
        self.classification = str(classification)
        base = self.root.joinpath(*_CLASSIFICATION_DIR)
        cla_dir = base / self.classification
        have = sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
        if self.classification not in have:
            raise DataError(f"no classification {self.classification!r} (choose from: {', '.join(have) or 'none'})",
                            path=base)
        files = _split_files(cla_dir)
        self.cla_files = {s: p.relative_to(self.root).as_posix() for s, p in files.items()}
        self._listed_in: dict[str, str] = {}
        seen: dict[int, str] = {}
        items = []
        for split, cla_path in files.items():
            for mid, name in read_cla(cla_path).class_of().items():
                if mid in seen:
                    raise DataError(f"model {mid} is listed in both {seen[mid]} and {self.cla_files[split]}",
                                    path=cla_dir)
                seen[mid] = self.cla_files[split]
                item = Item(id=f"{name}/{split}/m{mid}", label=name, split=split, path=str(psb_mesh_path(self.root, mid)))
                self._listed_in[item.id] = self.cla_files[split]
                items.append(item)
        self.held_out_classes: list[str] = []
        if "test" not in files and test_ratio > 0:
            items = self._hold_out_classes(items, float(test_ratio), int(seed))
        self.items = sorted(items, key=lambda it: it.id)
        self.classes = sorted({it.label for it in self.items})
        self.missing = [it.id for it in self.items if not os.path.isfile(it.path)]
        counts = {s: sum(it.split == s for it in self.items) for s in _SPLITS}
        self.description = (
            f"Princeton Shape Benchmark in {self.root} ({self.classification} classification): "
            f"{len(self.classes)} classes, {counts['train']} train / {counts['test']} test models listed "
            f"({len(self.missing)} missing on disk); splits from {', '.join(self.cla_files.values())}"
        )
        if self.held_out_classes:
            self.description += (
                f"; no test classification, so {len(self.held_out_classes)} of the classes (test_ratio "
                f"{test_ratio}, seed {seed}) were held out whole as the test split"
            )

    def _hold_out_classes(self, items: list[Item], test_ratio: float, seed: int) -> list[Item]:
        """Move a seeded ``test_ratio`` of the classes (all their models) to the ``test`` split."""
        names = sorted({it.label for it in items})
        n_hold = min(max(int(round(test_ratio * len(names))), 1), len(names) - 1) if len(names) > 1 else 0
        rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x505342])
        self.held_out_classes = sorted(names[i] for i in rng.permutation(len(names))[:n_hold])
        held = set(self.held_out_classes)
        out = []
        for it in items:
            if it.label in held:
                new = Item(id=f"{it.label}/test/m{it.id.rsplit('/m', 1)[1]}", label=it.label, split="test", path=it.path)
                self._listed_in[new.id] = self._listed_in.pop(it.id)
                it = new
            out.append(it)
        return out

    def load(self, item: Item) -> Mesh:
        """Load ``item``'s mesh; raises :class:`~xmodal.errors.MeshError` when its file is missing or unusable."""
        if not os.path.isfile(item.path):
            folder = Path(item.path).parent
            names = " or ".join(f"{folder.name}{ext}" for ext in PSB_MESH_EXTENSIONS)
            raise MeshError(item.path, f"listed in {self._listed_in.get(item.id, 'the classification')} "
                                       f"but missing (no {names})")
        return load_mesh(item.path)

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "classification": self.classification,
                "cla_files": dict(self.cla_files), "missing": list(self.missing),
                "held_out_classes": list(self.held_out_classes)}
