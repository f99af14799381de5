"""In-memory datasets with the reader API of :class:`xmodal.data.store.ShapeStore`.

A raw ModelNet40 HDF5 folder (``ply_data_*.h5``) holds only point clouds; the 3D tasks
and pre-training read it through a :class:`MemoryStore` built by :func:`open_points_h5`,
so every consumer of a dataset sees one API whether the objects live in shard files or
in arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from xmodal.data.sources import ModelNetH5Source, open_source
from xmodal.data.store import ShapeStore, SplitView, StoreContents, make_manifest, validate_manifest
from xmodal.errors import StoreError

__all__ = ["ArraySplitView", "MemoryStore", "open_points_h5"]

#: the arrays an in-memory split may hold (``ids``, ``labels`` and ``points`` are required)
ARRAY_KEYS = ("ids", "labels", "points", "point_labels", "images", "cameras")


class ArraySplitView(SplitView):
    """One split held in arrays, read as a single in-memory "shard".

    ``arrays`` maps :data:`ARRAY_KEYS` to arrays with one row per object (``ids``,
    ``labels`` and ``points`` required; a key mapped to None is absent). The inherited
    reads index the shard with ``arrays[key][row]``, which numpy arrays answer like the
    HDF5 datasets of a shard file.
    """

    def __init__(self, store: "MemoryStore", name: str, arrays: Mapping[str, Optional[np.ndarray]]):
        present = {k: v for k, v in arrays.items() if v is not None}
        unknown = sorted(set(present) - set(ARRAY_KEYS))
        missing = [k for k in ("ids", "labels", "points") if k not in present]
        if unknown or missing:
            raise StoreError(f"in-memory split '{name}': missing arrays {missing}, unknown arrays {unknown}")
        n = len(present["labels"])
        if any(len(v) != n for v in present.values()):
            raise StoreError(f"in-memory split '{name}': arrays of different lengths "
                             f"{ {k: len(v) for k, v in present.items()} }")
        super().__init__(store, name, shard_paths=[], sizes=[n])
        self._arrays = dict(present)
        self._arrays["points"] = np.ascontiguousarray(present["points"], dtype=np.float32)

    def __repr__(self) -> str:
        return f"SplitView({self.name!r}, n={self.n}, in memory)"

    # the one "shard" is the dict of arrays: no file to open, check or close
    def _open(self, k: int):
        return self._arrays

    def _has_key(self, key: str) -> bool:
        return key in self._arrays

    def _concat(self, key: str, decode: bool = False) -> np.ndarray:
        return np.asarray(self._arrays[key], dtype=object if decode else None)

    def close(self) -> None:
        pass

    def points_range(self, start: int, stop: int) -> np.ndarray:
        return self._arrays["points"][max(int(start), 0) : max(int(stop), 0)].copy()

    def _images_ds(self, k: int, i: int):
        if "images" not in self._arrays:
            raise StoreError(f"this in-memory dataset has no images; object {i}")
        return self._arrays["images"]


class MemoryStore(ShapeStore):
    """A dataset held in memory: ``manifest`` (as :func:`make_manifest` writes it, with no
    shards) and ``splits`` ``{split: {array name: array}}`` (see :class:`ArraySplitView`)."""

    def __init__(self, manifest: dict, splits: Mapping[str, Mapping[str, Optional[np.ndarray]]]):
        self._init(None, validate_manifest(manifest, Path("<in memory>")))
        for name, arrays in splits.items():
            self._views[name] = ArraySplitView(self, name, arrays)


def open_points_h5(path: str | Path, *, seed: int = 0, test_ratio: float = 0.2) -> MemoryStore:
    """A ModelNet40 HDF5 folder (``ply_data_*.h5``) as a points-only :class:`MemoryStore`.

    Its splits are those of :class:`xmodal.data.sources.ModelNetH5Source`: ``seed`` and
    ``test_ratio`` pick the held-out ``test`` split when the folder has no test files.
    """
    src = open_source(str(path), seed=seed, test_ratio=test_ratio)
    if not isinstance(src, ModelNetH5Source):
        raise StoreError("not a ModelNet40 HDF5 folder (ply_data_*.h5)", path=path)
    split_names = sorted({it.split for it in src.items}, key=lambda s: (s != "train", s != "test", s))
    arrays = {}
    for split in split_names:
        points, labels, ids = src.load_all(split)
        arrays[split] = {"ids": ids, "labels": labels, "points": points}
    manifest = make_manifest(
        classes=src.classes,
        counts={s: len(a["labels"]) for s, a in arrays.items()},
        shards={s: [] for s in arrays},
        contents=StoreContents(views=0, points=src.num_points or 0, image_size=None, grayscale=True,
                               up_axis=src.up_axis, part_names=None),
        source=src.describe(),
        settings={"seed": seed, "test_ratio": test_ratio, "in_memory": True},
    )
    return MemoryStore(manifest, arrays)
