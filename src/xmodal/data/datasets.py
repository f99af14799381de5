"""Open whatever a user names as a dataset: a prepared store or a raw ModelNet40 HDF5 folder."""

from __future__ import annotations

import os
from pathlib import Path

from xmodal.data.memory import open_points_h5
from xmodal.data.store import MANIFEST_NAME, PLAN_NAME, ShapeStore
from xmodal.errors import MissingInputError, StoreError

__all__ = ["open_dataset"]


def open_dataset(path: str | os.PathLike, *, seed: int = 0, test_ratio: float = 0.2) -> ShapeStore:
    """Open a prepared store, or a raw ModelNet40 HDF5 folder as a points-only store.

    * ``path`` with a ``manifest.json`` -> :class:`~xmodal.data.store.ShapeStore`.
    * ``path`` with ``ply_data_*.h5`` files -> a :class:`~xmodal.data.memory.MemoryStore`
      (``views == 0``) holding that release's points; ``seed``/``test_ratio`` pick the
      held-out ``test`` split when the folder has no test files.
    """
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return ShapeStore(path)
    if path.is_dir() and any(path.glob("ply_data_*.h5")):
        return open_points_h5(path, seed=seed, test_ratio=test_ratio)
    if not path.exists():
        raise MissingInputError("dataset does not exist", path=path)
    if (path / PLAN_NAME).is_file():
        raise MissingInputError(
            "unfinished dataset (plan.json but no manifest.json)", path=path,
            hint="re-run `xmodal prepare` to finish it",
        )
    raise StoreError(
        "not a dataset: expected a prepared store (manifest.json) or a ModelNet40 HDF5 folder (ply_data_*.h5)",
        path=path,
    )
