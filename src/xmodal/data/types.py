"""Plain data types shared by the data modules (numpy-level, no torch)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from xmodal.errors import MeshError

__all__ = ["MeshError", "Mesh", "PointCloud", "Item", "Source"]


@dataclass
class Mesh:
    """A triangle mesh. ``vertices`` (V, 3) float64, ``faces`` (F, 3) int64,
    ``face_labels`` (F,) int64 global part ids or None."""

    vertices: np.ndarray
    faces: np.ndarray
    face_labels: Optional[np.ndarray] = None


@dataclass
class PointCloud:
    """A point cloud. ``points`` (N, 3) float32, ``point_labels`` (N,) int64 or None."""

    points: np.ndarray
    point_labels: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Item:
    """One object of a source.

    ``id`` is unique and stable within a source (e.g. ``"chair/train/chair_0001"``);
    ``label`` the class name; ``split`` ``"train"`` or ``"test"``; ``path`` the file
    it comes from (None for procedural shapes); ``index`` a row number inside
    ``path`` (HDF5 sources) or the generator seed (built-in shapes).
    """

    id: str
    label: str
    split: str
    path: Optional[str] = None
    index: int = -1


class Source(ABC):
    """A collection of objects to prepare. ``kind`` is ``"mesh"`` or ``"points"``."""

    kind: str = "mesh"
    #: name of the up axis of the objects: "x", "y" or "z"
    up_axis: str = "z"

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.classes: list[str] = []
        #: global part names (index = part id) when objects carry part labels
        self.part_names: Optional[list[str]] = None
        #: short description written into the manifest
        self.description: str = ""

    @abstractmethod
    def load(self, item: Item) -> "Mesh | PointCloud":
        """Load one object; raises :class:`MeshError` when it cannot be used."""

    def describe(self) -> dict:
        return {"kind": self.kind, "description": self.description, "up_axis": self.up_axis}
