"""Shared pytest fixtures.

``shared_data`` points at the read-only real data of the dev checkout
(``../shared/data`` beside the repository, or ``$XMODAL_SHARED_DATA``); tests
that need it skip cleanly where it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

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
