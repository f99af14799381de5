"""ShapeNet-Part (part segmentation) data: readers for its two public layouts and xmodal stores.

Every reader returns the same in-memory :class:`PartSegData`:

* per split (``"train"``, ``"val"``, ``"test"``): ``points`` (n, N, 3) float32 (centred,
  in the unit sphere), ``seg`` (n, N) int64 *global* part ids, ``category`` (n,) int64;
* ``category_names`` (C,), ``part_names`` (P,) and ``category_parts`` — for each
  category the sorted list of the global part ids it owns (used to restrict predictions
  and to compute the ShapeNet-Part IoUs).

Readers:

* :func:`load_shapenetpart_txt` — ``shapenetcore_partanno_segmentation_benchmark_v0_normal``
  (``synsetoffset2category.txt``, ``<synset>/<shape>.txt`` rows ``x y z nx ny nz part``,
  ``train_test_split/shuffled_{train,val,test}_file_list.json``);
* :func:`load_shapenetpart_h5` — the HDF5 release (``ply_data_{train,val,test}*.h5`` with
  ``data`` (n, 2048, 3), ``label`` (n, 1), ``pid`` (n, 2048));
* :func:`from_store` — an xmodal dataset store with per-point labels (e.g. a prepared
  ``builtin:shapes``);
* :func:`from_source` — a part-labelled mesh source (``builtin:shapes``, a Labeled PSB
  folder), sampled on the fly; each shape keeps its faces (:class:`ShapeFaces`) for the
  face labelling accuracy;
* :func:`load_partseg` — dispatch on what a path (or object) is.

:func:`stratified_subset` draws the seeded, per-category training fractions of Table 4.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from xmodal.data.labeled_psb import LabeledPSBSource, is_labeled_mesh_folder
from xmodal.data.geometry import face_areas, face_centers, normalize_unit_sphere
from xmodal.data.sampling import sample_mesh_points
from xmodal.data.sources import open_source
from xmodal.data.store import ShapeStore
from xmodal.data.types import Mesh, MeshError, Source
from xmodal.errors import PartSegError

__all__ = [
    "SHAPENETPART_CATEGORIES",
    "SHAPENETPART_PARTS",
    "PartSegError",
    "ShapeFaces",
    "PartSegSplit",
    "PartSegData",
    "standard_category_parts",
    "resample_points",
    "stratified_subset",
    "load_shapenetpart_txt",
    "load_shapenetpart_h5",
    "from_store",
    "sample_labelled_mesh",
    "from_source",
    "load_partseg",
]

logger = logging.getLogger(__name__)

# The standard ShapeNet-Part mapping: 16 categories, 50 global part ids, each category owning
# a contiguous range (category -> number of parts, in the benchmark's category order).
_STANDARD_COUNTS = (
    ("Airplane", 4),
    ("Bag", 2),
    ("Cap", 2),
    ("Car", 4),
    ("Chair", 4),
    ("Earphone", 3),
    ("Guitar", 3),
    ("Knife", 2),
    ("Lamp", 4),
    ("Laptop", 2),
    ("Motorbike", 6),
    ("Mug", 2),
    ("Pistol", 3),
    ("Rocket", 3),
    ("Skateboard", 3),
    ("Table", 3),
)
SHAPENETPART_CATEGORIES: tuple[str, ...] = tuple(name for name, _ in _STANDARD_COUNTS)


def _standard_parts() -> dict[str, list[int]]:
    out, start = {}, 0
    for name, k in _STANDARD_COUNTS:
        out[name] = list(range(start, start + k))
        start += k
    return out


#: ``{category: [global part ids]}`` of the standard benchmark (Airplane 0-3 ... Table 47-49).
SHAPENETPART_PARTS: dict[str, list[int]] = _standard_parts()
_NUM_STANDARD_PARTS = 50

SPLITS = ("train", "val", "test")


@dataclass
class ShapeFaces:
    """What the face labelling accuracy needs of one mesh, in the frame of its point cloud.

    ``centroids`` (F, 3) float32 face centres (normalised like the shape's points),
    ``areas`` (F,) float64 face areas (same frame), ``labels`` (F,) int64 global part ids.
    """

    centroids: np.ndarray
    areas: np.ndarray
    labels: np.ndarray


@dataclass
class PartSegSplit:
    """One split held in memory.

    ``points`` (n, N, 3) float32, ``seg`` (n, N) int64 global part ids, ``category`` (n,)
    int64, ``ids`` (n,) stable shape ids (``"<category>/<shape>"`` or a row reference),
    ``faces`` (n,) :class:`ShapeFaces` for data sampled from meshes, else None.
    """

    points: np.ndarray
    seg: np.ndarray
    category: np.ndarray
    ids: list[str] = field(default_factory=list)
    faces: Optional[list[ShapeFaces]] = None

    def __post_init__(self):
        self.points = np.ascontiguousarray(self.points, dtype=np.float32)
        self.seg = np.ascontiguousarray(self.seg, dtype=np.int64)
        self.category = np.ascontiguousarray(self.category, dtype=np.int64).reshape(-1)
        n = self.points.shape[0]
        if self.points.ndim != 3 or self.points.shape[2] != 3:
            raise ValueError(f"points must be (n, N, 3), got {self.points.shape}")
        if self.seg.shape != self.points.shape[:2]:
            raise ValueError(f"seg must be (n, N) = {self.points.shape[:2]}, got {self.seg.shape}")
        if self.category.shape != (n,):
            raise ValueError(f"category must be ({n},), got {self.category.shape}")
        if not self.ids:
            self.ids = [str(i) for i in range(n)]
        if len(self.ids) != n:
            raise ValueError(f"ids has {len(self.ids)} entries for {n} shapes")
        if self.faces is not None and len(self.faces) != n:
            raise ValueError(f"faces has {len(self.faces)} entries for {n} shapes")

    @property
    def n(self) -> int:
        return int(self.points.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.points.shape[1])

    def subset(self, index: Sequence[int] | np.ndarray) -> "PartSegSplit":
        """The shapes ``index`` (a copy)."""
        index = np.asarray(index, dtype=np.int64)
        faces = None if self.faces is None else [self.faces[i] for i in index]
        return PartSegSplit(self.points[index], self.seg[index], self.category[index], [self.ids[i] for i in index], faces)

    def resampled(self, num_points: int, *, seed: int = 0) -> "PartSegSplit":
        """Every shape resampled to ``num_points`` points (seeded; see :func:`resample_points`)."""
        if num_points == self.num_points:
            return self
        rng = np.random.default_rng(seed)
        pts = np.empty((self.n, num_points, 3), np.float32)
        seg = np.empty((self.n, num_points), np.int64)
        for i in range(self.n):
            idx = resample_points(self.num_points, num_points, rng=rng)
            pts[i], seg[i] = self.points[i, idx], self.seg[i, idx]
        return PartSegSplit(pts, seg, self.category.copy(), list(self.ids), self.faces)


@dataclass
class PartSegData:
    """A part-segmentation dataset in memory (see the module docstring for the arrays)."""

    splits: dict[str, PartSegSplit]
    category_names: list[str]
    part_names: list[str]
    category_parts: list[list[int]]
    source: str = ""
    #: shapes of the source that could not be used: ``{"id", "reason"}`` each (skipped, not fatal)
    failed: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if len(self.category_parts) != len(self.category_names):
            raise PartSegError(
                f"category_parts has {len(self.category_parts)} entries for {len(self.category_names)} categories",
                path=self.source or None,
            )
        self.category_parts = [sorted(int(p) for p in parts) for parts in self.category_parts]
        where = self.source or "part-segmentation data"
        for name, parts in zip(self.category_names, self.category_parts):
            if not parts:
                raise PartSegError(f"category '{name}' has no parts", path=where)
            if min(parts) < 0 or max(parts) >= self.num_parts:
                raise PartSegError(f"category '{name}' has part ids outside 0..{self.num_parts - 1}", path=where)
        for sname, sp in self.splits.items():
            if sp.n and (sp.category.min() < 0 or sp.category.max() >= self.num_categories):
                raise PartSegError(f"split '{sname}' has category ids outside 0..{self.num_categories - 1}", path=where)
            if sp.n and (sp.seg.min() < 0 or sp.seg.max() >= self.num_parts):
                raise PartSegError(f"split '{sname}' has part ids outside 0..{self.num_parts - 1}", path=where)

    @property
    def num_parts(self) -> int:
        return len(self.part_names)

    @property
    def num_categories(self) -> int:
        return len(self.category_names)

    def split(self, name: str) -> PartSegSplit:
        try:
            return self.splits[name]
        except KeyError:
            raise PartSegError(f"no split '{name}' (has {sorted(self.splits)})",
                               path=self.source or "part-segmentation data") from None

    def part_mask(self) -> np.ndarray:
        """``(C, P)`` bool: ``mask[c, p]`` is True when part ``p`` belongs to category ``c``."""
        mask = np.zeros((self.num_categories, self.num_parts), dtype=bool)
        for c, parts in enumerate(self.category_parts):
            mask[c, parts] = True
        return mask

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v.n}" for k, v in self.splits.items())
        return (
            f"PartSegData({counts}; {self.num_categories} categories, {self.num_parts} parts"
            f"{'; ' + self.source if self.source else ''})"
        )


# ---------------------------------------------------------------------------------------
# small numpy helpers
# ---------------------------------------------------------------------------------------


def standard_category_parts(category_names: Sequence[str]) -> list[Optional[list[int]]]:
    """The standard global part ids of each name (case-insensitive), None where unknown."""
    lookup = {k.lower(): v for k, v in SHAPENETPART_PARTS.items()}
    return [list(lookup[n.lower()]) if n.lower() in lookup else None for n in category_names]


def resample_points(n_have: int, n_want: int, *, rng: np.random.Generator) -> np.ndarray:
    """Indices ``(n_want,)`` int64 of a random choice of ``n_want`` of ``n_have`` points;
    drawn with replacement only when ``n_have < n_want``."""
    if n_have <= 0:
        raise ValueError("cannot resample a shape with no points")
    return rng.choice(n_have, size=n_want, replace=n_have < n_want).astype(np.int64)


def _unit_clouds(points: np.ndarray) -> np.ndarray:
    """float32 ``points`` (n, N, 3), each cloud centred on its mean with max norm 1 (a cloud of
    one repeated point is only centred)."""
    return normalize_unit_sphere(points, strict=False)[0].astype(np.float32, copy=False)


def stratified_subset(category: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray:
    """Seeded stratified subset of the shapes: ``round(fraction * n_c)`` (at least 1) of each
    category ``c`` present in ``category`` (n,). Returns sorted indices (k,) int64.

    ``fraction`` in (0, 1]; 1 returns every index.
    """
    category = np.asarray(category).reshape(-1)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return np.arange(category.shape[0], dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(category):
        idx = np.flatnonzero(category == c)
        k = max(1, int(round(fraction * idx.size)))
        keep.append(rng.choice(idx, size=min(k, idx.size), replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, np.int64)


def _derive_category_parts(
    category_names: Sequence[str], splits: dict[str, PartSegSplit], *, where: str
) -> tuple[list[list[int]], int]:
    """Each category's parts: the standard ones when the data fits them, else those seen in the data.

    The part ids seen for a category over every loaded split are compared with the standard
    ShapeNet-Part table: when they lie inside the category's standard range (the usual case,
    and the only safe choice when a rare part is missing from the loaded splits) the full
    standard range is used; otherwise (a custom numbering) the parts seen in the data are
    used. Categories with no shapes fall back to the table. Returns (parts, num_parts).
    """
    seen: list[set[int]] = [set() for _ in category_names]
    for sp in splits.values():
        for c in np.unique(sp.category):
            seen[int(c)].update(np.unique(sp.seg[sp.category == c]).tolist())
    table = standard_category_parts(category_names)
    out = []
    for c, name in enumerate(category_names):
        std = table[c]
        if std is not None and (not seen[c] or seen[c] <= set(std)):
            out.append(std)
        elif seen[c]:
            if std is not None:
                logger.warning(
                    "%s: category '%s' uses part ids %s outside the standard ShapeNet-Part range %s; "
                    "using the part ids found in the data", where, name, sorted(seen[c] - set(std)), std,
                )
            out.append(sorted(seen[c]))
        else:
            raise PartSegError(f"{where}: category '{name}' has no shapes and is not a standard ShapeNet-Part category")
    max_part = max(max(p) for p in out)
    num_parts = max(max_part + 1, _NUM_STANDARD_PARTS if all(t is not None for t in table) else 0)
    return out, num_parts


def _part_names(category_names: Sequence[str], category_parts: Sequence[Sequence[int]], num_parts: int) -> list[str]:
    names = [f"part{p}" for p in range(num_parts)]
    for name, parts in zip(category_names, category_parts):
        for j, p in enumerate(parts):
            names[p] = f"{name}/part{j}"
    return names


def _finish(
    raw: dict[str, PartSegSplit], category_names: list[str], *, where: str, source: str
) -> PartSegData:
    parts, num_parts = _derive_category_parts(category_names, raw, where=where)
    return PartSegData(
        splits=raw,
        category_names=list(category_names),
        part_names=_part_names(category_names, parts, num_parts),
        category_parts=parts,
        source=source,
    )


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


# ---------------------------------------------------------------------------------------
# txt / normal layout
# ---------------------------------------------------------------------------------------


def _read_category_file(path: Path) -> list[tuple[str, str]]:
    """``(name, synset)`` rows of ``synsetoffset2category.txt`` / ``all_object_categories.txt``."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 2:
                raise PartSegError(f"{path}: line {lineno}: expected '<category name> <synset id>', got {line!r}")
            rows.append((fields[0], fields[1]))
    if not rows:
        raise PartSegError(f"{path}: no categories listed")
    return rows


def _read_shape_txt(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (ValueError, OSError) as exc:
        raise PartSegError(f"{path}: cannot parse point rows 'x y z nx ny nz part' ({exc})") from exc
    if arr.shape[0] == 0:
        raise PartSegError(f"{path}: no points")
    if arr.shape[1] not in (4, 7):
        raise PartSegError(f"{path}: expected 7 columns 'x y z nx ny nz part' (or 4 'x y z part'), got {arr.shape[1]}")
    label = arr[:, -1]
    if not np.all(np.isfinite(arr[:, :3])):
        raise PartSegError(f"{path}: non-finite coordinates")
    if np.any(label != np.round(label)) or np.any(label < 0):
        raise PartSegError(f"{path}: the last column must hold non-negative integer part ids")
    return arr[:, :3], label.astype(np.int64)


def load_shapenetpart_txt(
    root: str | os.PathLike,
    *,
    num_points: int = 2048,
    seed: int = 0,
    categories: Optional[Iterable[str]] = None,
    splits: Sequence[str] = SPLITS,
    progress: bool = False,
) -> PartSegData:
    """Read ``shapenetcore_partanno_segmentation_benchmark_v0_normal``.

    Each shape is centred and scaled into the unit sphere (all its points, as the usual
    loaders do), then resampled to ``num_points`` (seeded random choice, with replacement only
    when it has fewer points). ``categories``
    (names, case-insensitive) restricts the categories kept; category indices follow the
    order of ``synsetoffset2category.txt``, part ids stay global. Shapes are read in the
    order of the split files; a split file may list a shape of a category not kept.
    """
    root = Path(root)
    cat_file = root / "synsetoffset2category.txt"
    if not cat_file.is_file():
        raise PartSegError(f"{root}: not a ShapeNet-Part txt folder (expected synsetoffset2category.txt)")
    rows = _read_category_file(cat_file)
    if categories is not None:
        want = {c.lower() for c in categories}
        unknown = want - {n.lower() for n, _ in rows}
        if unknown:
            raise PartSegError(f"{cat_file}: unknown categories {sorted(unknown)} (has {[n for n, _ in rows]})")
        rows = [(n, s) for n, s in rows if n.lower() in want]
    names = [n for n, _ in rows]
    synset_to_cat = {s: i for i, (_, s) in enumerate(rows)}
    rng = np.random.default_rng(seed)
    out: dict[str, PartSegSplit] = {}
    for split in splits:
        list_file = root / "train_test_split" / f"shuffled_{split}_file_list.json"
        if not list_file.is_file():
            raise PartSegError(f"{root}: split '{split}' has no file list (expected {list_file.relative_to(root)})")
        try:
            with open(list_file, encoding="utf-8") as fh:
                entries = json.load(fh)
        except json.JSONDecodeError as exc:
            raise PartSegError(f"{list_file}: not valid JSON ({exc})") from exc
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise PartSegError(f"{list_file}: expected a JSON list of 'shape_data/<synset>/<shape id>' strings")
        todo = []
        for e in entries:
            bits = e.strip("/").split("/")
            if len(bits) < 2:
                raise PartSegError(f"{list_file}: bad entry {e!r} (expected 'shape_data/<synset>/<shape id>')")
            synset, shape = bits[-2], bits[-1]
            if synset in synset_to_cat:
                todo.append((synset, shape))
        pts = np.empty((len(todo), num_points, 3), np.float32)
        seg = np.empty((len(todo), num_points), np.int64)
        cat = np.empty(len(todo), np.int64)
        ids = []
        for i, (synset, shape) in enumerate(_progress(todo, len(todo), f"ShapeNet-Part {split}", progress)):
            path = root / synset / f"{shape}.txt"
            if not path.is_file():
                raise PartSegError(f"{path}: listed in {list_file.name} but missing")
            xyz, lab = _read_shape_txt(path)
            xyz = _unit_clouds(xyz[None])[0]
            idx = resample_points(xyz.shape[0], num_points, rng=rng)
            pts[i], seg[i] = xyz[idx], lab[idx]
            cat[i] = synset_to_cat[synset]
            ids.append(f"{names[cat[i]]}/{shape}")
        out[split] = PartSegSplit(pts, seg, cat, ids)
    data = _finish(out, names, where=str(root), source=str(root))
    logger.info("loaded %r", data)
    return data


# ---------------------------------------------------------------------------------------
# HDF5 layout
# ---------------------------------------------------------------------------------------


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _h5_files(root: Path, split: str) -> list[Path]:
    return sorted(
        (p for p in root.glob(f"ply_data_{split}*.h5") if re.fullmatch(rf"ply_data_{split}_?\d*\.h5", p.name)),
        key=_natural_key,
    )


def _read_shapenetpart_files(h5py, files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The clouds (n, N, 3), part ids (n, N), categories (n,) and ids ``file:row`` of one split's files."""
    P, S, C, I = [], [], [], []
    for f in files:
        try:
            h = h5py.File(f, "r")
        except OSError as exc:
            raise PartSegError(f"{f}: cannot open HDF5 file ({exc})") from exc
        with h:
            seg_key = "pid" if "pid" in h else ("seg" if "seg" in h else None)
            if "data" not in h or "label" not in h or seg_key is None:
                raise PartSegError(
                    f"{f}: expected datasets 'data', 'label' and 'pid' (has {sorted(h.keys())}); "
                    "a file without 'pid' is a classification release, not ShapeNet-Part"
                )
            d, lab, pid = h["data"][()], h["label"][()], h[seg_key][()]
        if d.ndim != 3 or d.shape[2] < 3:
            raise PartSegError(f"{f}: 'data' must be (n, N, 3), got {d.shape}")
        d = d[:, :, :3]
        lab = np.asarray(lab).reshape(-1)
        if lab.shape[0] != d.shape[0] or pid.shape != d.shape[:2]:
            raise PartSegError(f"{f}: 'label' {lab.shape} / 'pid' {pid.shape} do not match 'data' {d.shape}")
        P.append(d.astype(np.float32))
        S.append(pid.astype(np.int64))
        C.append(lab.astype(np.int64))
        I.extend(f"{f.name}:{r}" for r in range(d.shape[0]))
    return np.concatenate(P), np.concatenate(S), np.concatenate(C), I


def load_shapenetpart_h5(
    root: str | os.PathLike,
    *,
    num_points: Optional[int] = None,
    seed: int = 0,
    categories: Optional[Iterable[str]] = None,
    splits: Sequence[str] = SPLITS,
) -> PartSegData:
    """Read the ShapeNet-Part HDF5 release (``ply_data_{split}*.h5`` with ``data`` (n, 2048, 3),
    ``label`` (n, 1) category, ``pid`` (n, 2048) global part id).

    Category names come from ``all_object_categories.txt`` when present (else the 16 standard
    names when the labels fit them, else ``category<i>``). Splits without files are skipped,
    but ``train`` and ``test`` must exist. ``num_points`` resamples each shape (seeded);
    ``categories`` restricts the categories kept (category indices are then renumbered in
    the order of the names, part ids stay global). Clouds are re-centred into the unit sphere.
    """
    from xmodal.utils.optional import require

    h5py = require("h5py", "reading ShapeNet-Part HDF5 files")
    root = Path(root)
    found = {s: _h5_files(root, s) for s in splits}
    missing = [s for s in ("train", "test") if s in splits and not found[s]]
    if missing:
        raise PartSegError(
            f"{root}: not a ShapeNet-Part HDF5 folder (no ply_data_{missing[0]}*.h5; expected "
            f"ply_data_{{train,val,test}}*.h5 with datasets 'data', 'label', 'pid')"
        )
    raw = {split: _read_shapenetpart_files(h5py, files) for split, files in found.items() if files}
    n_cat = int(max(r[2].max() for r in raw.values() if r[2].size) + 1)
    names_file = root / "all_object_categories.txt"
    if names_file.is_file():
        names = [n for n, _ in _read_category_file(names_file)]
        if len(names) < n_cat:
            raise PartSegError(f"{names_file}: lists {len(names)} categories but the labels go up to {n_cat - 1}")
    elif n_cat <= len(SHAPENETPART_CATEGORIES):
        names = list(SHAPENETPART_CATEGORIES)
    else:
        names = [f"category{i}" for i in range(n_cat)]
    keep = list(range(len(names)))
    if categories is not None:
        want = {c.lower() for c in categories}
        unknown = want - {n.lower() for n in names}
        if unknown:
            raise PartSegError(f"{root}: unknown categories {sorted(unknown)} (has {names})")
        keep = [i for i, n in enumerate(names) if n.lower() in want]
    remap = np.full(len(names), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    rng = np.random.default_rng(seed)
    out = {}
    for split, (pts, seg, cat, ids) in raw.items():
        sel = np.flatnonzero(remap[cat] >= 0)
        sp = PartSegSplit(_unit_clouds(pts[sel]) if sel.size else pts[sel], seg[sel], remap[cat[sel]], [ids[i] for i in sel])
        if num_points is not None:
            sp = sp.resampled(num_points, seed=int(rng.integers(2**31)))
        out[split] = sp
    data = _finish(out, [names[i] for i in keep], where=str(root), source=str(root))
    logger.info("loaded %r", data)
    return data


# ---------------------------------------------------------------------------------------
# xmodal store
# ---------------------------------------------------------------------------------------


def from_store(store: Any, *, num_points: Optional[int] = None, seed: int = 0, splits: Optional[Sequence[str]] = None) -> PartSegData:
    """Part-segmentation data from an xmodal dataset store with per-point labels.

    ``store`` is a :class:`xmodal.data.store.ShapeStore` (or a path to one). The object class
    is the category; each category's parts are the global part ids whose name (``part_names``,
    ``"<class>/<part>"``) starts with the class name (falling back to the labels seen in the
    data for a class no name matches). ``splits`` defaults to every split of the store.
    """
    if isinstance(store, (str, os.PathLike)):
        store = ShapeStore(store)
    where = str(store.root if store.root is not None else store)
    part_names = list(store.part_names or [])
    if not part_names:
        raise PartSegError(f"{where}: the store has no part_names; it was not prepared from a part-labelled source")
    classes = list(store.classes)
    if splits is None:
        splits = store.splits
    rng = np.random.default_rng(seed)
    out: dict[str, PartSegSplit] = {}
    for split in splits:
        view = store.split(split)
        n = view.n
        if n == 0:
            continue
        pts = view.all_points()
        seg = np.empty(pts.shape[:2], np.int64)
        for i in range(n):
            lab = view.point_labels(i)
            if lab is None:
                raise PartSegError(f"{where}: split '{split}' has no point_labels (prepare it from a part-labelled source)")
            seg[i] = lab
        sp = PartSegSplit(_unit_clouds(pts), seg, np.asarray(view.labels), list(view.ids))
        if num_points is not None:
            sp = sp.resampled(num_points, seed=int(rng.integers(2**31)))
        out[split] = sp
    if not out:
        raise PartSegError(f"{where}: no shapes in splits {list(splits)}")
    parts = _category_parts_from_names(classes, part_names, out, where=where)
    return PartSegData(out, classes, part_names, parts, source=where, failed=list(store.failed))


def _category_parts_from_names(classes, part_names, splits, *, where: str) -> list[list[int]]:
    seen: list[set[int]] = [set() for _ in classes]
    for sp in splits.values():
        for c in np.unique(sp.category):
            seen[int(c)].update(np.unique(sp.seg[sp.category == c]).tolist())
    parts = []
    for c, name in enumerate(classes):
        own = [j for j, pn in enumerate(part_names) if pn.split("/", 1)[0] == name] or sorted(seen[c])
        if not own:
            raise PartSegError(f"{where}: class '{name}' has no part names and no labelled shapes")
        parts.append(own)
    return parts


def sample_labelled_mesh(mesh: Mesh, num_points: int, *, seed=None) -> tuple[np.ndarray, np.ndarray, ShapeFaces]:
    """Points of a part-labelled mesh, as :func:`xmodal.data.sampling.sample_point_cloud` makes
    them (area-weighted samples -> FPS -> unit sphere), with the mesh's faces in the same frame.

    Args:
        mesh: a :class:`~xmodal.data.types.Mesh` with ``face_labels`` (F,).
        num_points: N.
        seed: seed of the sampling.

    Returns:
        ``points`` (N, 3) float32, ``seg`` (N,) int64 (the label of the face each point lies
        on) and the mesh's :class:`ShapeFaces`.
    """
    raw, face_index = sample_mesh_points(mesh, num_points, seed=seed)
    points, center, scale = normalize_unit_sphere(raw)
    labels = mesh.face_labels
    vertices = (mesh.vertices - center) / scale  # the similarity that made the points
    faces = ShapeFaces(
        centroids=face_centers(vertices, mesh.faces).astype(np.float32),
        areas=face_areas(vertices, mesh.faces),
        labels=labels,
    )
    return points.astype(np.float32), labels[face_index], faces


def from_source(
    source: Any, *, num_points: int = 2048, seed: int = 0, splits: Sequence[str] = ("train", "test"), progress: bool = False
) -> PartSegData:
    """Part-segmentation data sampled from a part-labelled mesh source (``builtin:shapes``, Labeled PSB).

    ``source`` is a :class:`xmodal.data.types.Source` (or a spec for
    :func:`xmodal.data.sources.open_source`) whose meshes carry ``face_labels``; each mesh is
    sampled with :func:`sample_labelled_mesh` (seed ``(seed, item index, split index)``) and
    keeps its :class:`ShapeFaces`. A mesh that cannot be loaded (a broken file, a labels file
    that does not cover its faces exactly once) is skipped with a warning and listed in
    :attr:`PartSegData.failed`, as ``xmodal prepare`` lists it under ``failed``.
    """
    if isinstance(source, (str, os.PathLike)):
        source = open_source(source, seed=seed)
    where = str(getattr(source, "root", None) or type(source).__name__)
    part_names = list(source.part_names or [])
    if not part_names or getattr(source, "kind", "mesh") != "mesh":
        raise PartSegError(f"{where}: not a part-labelled mesh source (no part_names)")
    classes = list(source.classes)
    out: dict[str, PartSegSplit] = {}
    failed: list[dict] = []
    for split in splits:
        items = [it for it in source.items if it.split == split]
        kept, pts, seg, faces = [], [], [], []
        for i, it in enumerate(_progress(items, len(items), f"sampling {split}", progress)):
            try:
                mesh = source.load(it)
            except MeshError as exc:
                logger.warning("skipping %s: %s", it.id, exc)
                failed.append({"id": it.id, "reason": str(exc)})
                continue
            if mesh.face_labels is None:
                raise PartSegError(f"{where}: object '{it.id}' has no face labels")
            p, sg, shape_faces = sample_labelled_mesh(mesh, num_points, seed=(int(seed), i, len(out)))
            kept.append(it)
            pts.append(p)
            seg.append(sg)
            faces.append(shape_faces)
        if not kept:
            continue
        cat = np.array([classes.index(it.label) for it in kept], np.int64)
        out[split] = PartSegSplit(np.stack(pts).astype(np.float32), np.stack(seg).astype(np.int64), cat,
                                  [it.id for it in kept], faces)
    if not out:
        raise PartSegError(f"{where}: no objects in splits {list(splits)}")
    parts = _category_parts_from_names(classes, part_names, out, where=where)
    return PartSegData(out, classes, part_names, parts, source=where, failed=failed)


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------


def _layout(path: Path) -> Optional[str]:
    if (path / "synsetoffset2category.txt").is_file():
        return "txt"
    if any(path.glob("ply_data_*.h5")):
        return "h5"
    if (path / "manifest.json").is_file():
        return "store"
    if is_labeled_mesh_folder(path):
        return "labeled"
    return None


def load_partseg(
    path_or_store: Any,
    *,
    num_points: Optional[int] = None,
    seed: int = 0,
    categories: Optional[Iterable[str]] = None,
    progress: bool = False,
    test_ratio: float = 0.2,
) -> PartSegData:
    """Load part-segmentation data from whatever ``path_or_store`` is.

    * a :class:`PartSegData` -> returned as is (resampled when ``num_points`` differs);
    * a mesh ``Source`` or a ``"builtin:..."`` spec -> :func:`from_source` (``num_points``
      defaults to 2048 there);
    * an object with ``.split`` and ``.part_names`` (a ``ShapeStore``) -> :func:`from_store`;
    * a folder with ``synsetoffset2category.txt`` -> :func:`load_shapenetpart_txt`
      (``num_points`` defaults to 2048 there);
    * a folder with ``ply_data_*.h5`` -> :func:`load_shapenetpart_h5`;
    * a folder with ``manifest.json`` (an xmodal store) -> :func:`from_store`;
    * a Labeled PSB folder (category folders of meshes with ``<stem>_labels.txt``) ->
      :func:`from_source` of a :class:`~xmodal.data.labeled_psb.LabeledPSBSource` (split
      from ``train``/``test`` folders, else seeded with ``test_ratio``; ``num_points``
      defaults to 2048);
    * a folder holding exactly one sub-folder of those kinds (e.g. the unpacked archive).
    """
    if isinstance(path_or_store, PartSegData):
        if num_points is None:
            return path_or_store
        rng = np.random.default_rng(seed)
        d = path_or_store
        return PartSegData(
            {k: v.resampled(num_points, seed=int(rng.integers(2**31))) for k, v in d.splits.items()},
            d.category_names, d.part_names, d.category_parts, d.source, d.failed,
        )
    if isinstance(path_or_store, ShapeStore):
        return from_store(path_or_store, num_points=num_points, seed=seed)
    if isinstance(path_or_store, Source):
        return from_source(path_or_store, num_points=2048 if num_points is None else num_points, seed=seed, progress=progress)
    if not isinstance(path_or_store, (str, os.PathLike)):
        raise TypeError(f"cannot load part-segmentation data from a {type(path_or_store).__name__}")
    if os.fspath(path_or_store).startswith("builtin:"):
        return from_source(
            os.fspath(path_or_store), num_points=2048 if num_points is None else num_points, seed=seed, progress=progress
        )
    path = Path(path_or_store)
    if not path.exists():
        raise PartSegError(f"{path}: no such folder")
    if not path.is_dir():
        raise PartSegError(f"{path}: expected a folder (ShapeNet-Part txt or HDF5 layout, an xmodal store or Labeled PSB)")
    kind = _layout(path)
    if kind is None:
        subs = [(p, _layout(p)) for p in sorted(path.iterdir()) if p.is_dir()]
        subs = [(p, k) for p, k in subs if k is not None]
        if len(subs) == 1:
            path, kind = subs[0]
    if kind == "txt":
        return load_shapenetpart_txt(
            path, num_points=2048 if num_points is None else num_points, seed=seed, categories=categories, progress=progress
        )
    if kind == "h5":
        return load_shapenetpart_h5(path, num_points=num_points, seed=seed, categories=categories)
    if kind == "store":
        return from_store(path, num_points=num_points, seed=seed)
    if kind == "labeled":
        source = LabeledPSBSource(path, seed=seed, test_ratio=test_ratio)
        return from_source(source, num_points=2048 if num_points is None else num_points, seed=seed, progress=progress)
    raise PartSegError(
        f"{path}: not a part-segmentation dataset; expected synsetoffset2category.txt + <synset>/*.txt + "
        "train_test_split/ (ShapeNet-Part txt layout), ply_data_{train,test}*.h5 with 'pid' (HDF5 layout), "
        "an xmodal store (manifest.json) with point labels, or a Labeled PSB folder "
        "(<category>/<stem>.{off,ply,obj} with <stem>_labels.txt)"
    )
