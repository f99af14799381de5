"""Shared pytest fixtures.

``shared_data`` points at the read-only real data of the dev checkout
(``../shared/data`` beside the repository, or ``$XMODAL_SHARED_DATA``); tests
that need it skip cleanly where it is absent. ``labeled_tree`` writes a tiny
Labeled PSB folder (two-box meshes with per-face part labels).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path | None:
    env = os.environ.get("XMODAL_SHARED_DATA")
    cands = [Path(env)] if env else []
    cands.append(REPO.parent / "shared" / "data")
    for c in cands:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = _shared_data_dir()
    if d is None:
        pytest.skip("real data folder ../shared/data is not present")
    return d


@pytest.fixture(scope="session")
def modelnet_off_dir(shared_data) -> Path:
    d = shared_data / "modelnet_off"
    if not d.is_dir():
        pytest.skip("../shared/data/modelnet_off is not present")
    return d


@pytest.fixture(scope="session")
def modelnet_h5_dir(shared_data) -> Path:
    d = shared_data / "modelnet40_hdf5_1024"
    if not d.is_dir():
        pytest.skip("../shared/data/modelnet40_hdf5_1024 is not present")
    return d


@pytest.fixture(scope="session")
def labeled_psb_dir(shared_data) -> Path:
    d = shared_data / "labeled_psb"
    if not d.is_dir():
        pytest.skip("../shared/data/labeled_psb is not present")
    return d


# --------------------------------------------------------------------------- tiny Labeled PSB trees

#: category -> its two parts; each fake mesh is two boxes, one per part
LABELED_PARTS = {"Cup": ("body", "handle"), "Table": ("leg", "top")}

_BOX_V = [(x, y, z) for x in (0, 1) for y in (0, 1) for z in (0, 1)]
_BOX_F = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1),
          (2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3)]


def labeled_mesh_text(seed: int) -> tuple[str, list[int], list[int]]:
    """A two-box OFF mesh (24 faces) and the 1-based faces of its two parts.

    Box 0 (part 0) sits at x in [0, a], box 1 (part 1) at x in [a + 0.5, a + 0.5 + b]; the
    parts' faces are interleaved in the face list, so a labels file is not one block per part.
    """
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.8, 1.5, 2)
    verts, faces, part = [], [], []
    for k, (x0, w) in enumerate(((0.0, a), (a + 0.5, b))):
        verts += [(x0 + x * w, y * (1 + k), z * 0.7) for x, y, z in _BOX_V]
        faces += [(i + 8 * k, j + 8 * k, l + 8 * k) for i, j, l in _BOX_F]
        part += [k] * 12
    order = np.argsort(np.arange(24) % 12 * 2 + np.array(part), kind="stable")  # interleave the parts
    faces, part = [faces[o] for o in order], [part[o] for o in order]
    text = f"OFF\n{len(verts)} {len(faces)} 0\n" + "".join(f"{x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in verts)
    text += "".join(f"3 {i} {j} {l}\n" for i, j, l in faces)
    return text, [f + 1 for f in range(24) if part[f] == 0], [f + 1 for f in range(24) if part[f] == 1]


def write_labeled_psb(root: Path, *, per_category: int = 4, split_levels: bool = False, test_per_category: int = 1) -> Path:
    """A tiny Labeled PSB tree under ``root``: categories of :data:`LABELED_PARTS`, two-box meshes
    ``<id>.off`` with ``<id>_labels.txt``; with ``split_levels`` the last ``test_per_category``
    meshes of each category go to ``<Category>/test/``, the others to ``<Category>/train/``."""
    sid = 0
    for cat, (p0, p1) in LABELED_PARTS.items():
        for j in range(per_category):
            folder = root / cat
            if split_levels:
                folder = folder / ("test" if j >= per_category - test_per_category else "train")
            folder.mkdir(parents=True, exist_ok=True)
            text, f0, f1 = labeled_mesh_text(sid)
            (folder / f"{sid}.off").write_text(text)
            (folder / f"{sid}_labels.txt").write_text(
                f"{p0}\n{' '.join(map(str, f0))} \n{p1}\n{' '.join(map(str, f1))} \n"
            )
            sid += 1
    return root


@pytest.fixture
def labeled_tree():
    """The tiny Labeled PSB tree writer :func:`write_labeled_psb` (tests call it with tmp_path)."""
    return write_labeled_psb
