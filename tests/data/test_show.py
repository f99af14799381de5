"""Tests of the contact sheet (``xmodal show``)."""

from __future__ import annotations

import numpy as np
import pytest

from xmodal.data.show import find_object, show
from xmodal.data.store import write_store
from xmodal.errors import ConfigError, DataError, StoreError


def _store(tmp_path, *, views=4, point_labels=True):
    rng = np.random.default_rng(0)
    n, npts, size = 3, 200, 32
    pts = rng.normal(size=(n, npts, 3)).astype(np.float32)
    pts /= np.linalg.norm(pts, axis=2).max(axis=1)[:, None, None]
    split = {
        "ids": ["mug/train/a", "mug/train/b", "lamp/train/c"],
        "labels": [1, 1, 0],
        "points": pts,
    }
    if point_labels:
        split["point_labels"] = (pts[..., 2] > 0).astype(np.int16)
    if views:
        yy, xx = np.mgrid[:size, :size]
        disc = ((yy - 16) ** 2 + (xx - 16) ** 2 < 100).astype(np.uint8) * 200
        split["images"] = np.broadcast_to(disc, (n, views, size, size)).copy()
        split["cameras"] = rng.uniform(10, 160, (n, views, 2)).astype(np.float32)
    return write_store(
        tmp_path / "ds", classes=["lamp", "mug"], splits={"train": split},
        part_names=["bottom", "top"] if point_labels else None,
    )


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size, np.asarray(im.convert("L"))


def test_show_writes_png(tmp_path):
    store = _store(tmp_path)
    out = show(store.root, "mug/train/b", tmp_path / "sheet.png")
    assert out == tmp_path / "sheet.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (w, h), gray = _png_size(out)
    assert 400 <= w <= 2000 and 300 <= h <= 1500 and w > h  # views beside the cloud
    assert gray.std() > 5  # not a blank canvas
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


@pytest.mark.parametrize("name, magic", [("sheet.jpg", b"\xff\xd8\xff"), ("sheet.PDF", b"%PDF"), ("sheet", b"\x89PNG")])
def test_show_writes_the_format_its_suffix_names(tmp_path, name, magic):
    store = _store(tmp_path)
    out = show(store, 0, tmp_path / name)
    assert out.read_bytes()[: len(magic)] == magic


def test_show_refuses_a_format_it_cannot_write(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(ConfigError, match=r"sheet\.xyz: cannot write a \.xyz image \(formats: .*png"):
        show(store, 0, tmp_path / "sheet.xyz")
    assert not (tmp_path / "sheet.xyz").exists()


def test_show_by_index_into_folder_points_only(tmp_path):
    store = _store(tmp_path, views=0, point_labels=False)
    (tmp_path / "sheets").mkdir()
    out = show(store, 2, tmp_path / "sheets")
    assert out.name == "lamp_train_c.png" and out.is_file()
    (w, h), _ = _png_size(out)
    assert w < 1000


def test_show_max_views(tmp_path):
    store = _store(tmp_path, views=9)
    a = show(store, 0, tmp_path / "all.png")
    b = show(store, 0, tmp_path / "two.png", max_views=2)
    assert _png_size(b)[0][0] < _png_size(a)[0][0]


def test_unknown_id_names_dataset_and_suggests(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(DataError) as info:
        show(store.root, "mug/train/x", tmp_path / "s.png")
    msg = str(info.value)
    assert "mug/train/x" in msg and str(store.root) in msg and "mug/train/a" in msg
    assert not (tmp_path / "s.png").exists()
    with pytest.raises(DataError, match="out of range"):
        find_object(store, 3)
    with pytest.raises(StoreError, match="no split 'test'"):
        find_object(store, 0, split="test")
    assert find_object(store, -1) == ("train", 2)
