"""The store reads lazily: a bounded number of open shards, point clouds by range."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

from xmodal.data.memory import MemoryStore
from xmodal.data.store import write_store

N, SHARD = 23, 3  # 8 shards, the last one short


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return {
        "ids": [f"c{i % 2}/obj_{i:03d}" for i in range(N)],
        "labels": rng.integers(0, 2, N),
        "points": rng.normal(size=(N, 5, 3)).astype(np.float32),
        "images": rng.integers(0, 256, (N, 4, 6, 6), dtype=np.uint8),
    }


@pytest.fixture
def split(tmp_path, arrays):
    return write_store(tmp_path / "ds", classes=["a", "b"], splits={"train": arrays}, chunk_size=SHARD).split("train")


def _open_hdf5_files() -> int:
    return h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)


def test_open_shards_stay_within_max_open(split, arrays):
    split.max_open = 3
    before = _open_hdf5_files()
    order = np.random.default_rng(1).permutation(np.repeat(np.arange(N), 2))
    for i in order:  # random access touching every shard many times
        assert np.array_equal(split.points(int(i)), arrays["points"][i])
        assert np.array_equal(split.images(int(i), [2, 0]), arrays["images"][i][[2, 0]])
        assert len(split._files) <= 3
    assert {k for k, _ in split._datasets} <= set(split._files)  # no dataset of a closed shard is kept
    assert _open_hdf5_files() <= before + 3  # the evicted files are closed, not only forgotten
    assert len(split.all_points()) == N and len(split._files) <= 3
    assert split.labels.tolist() == arrays["labels"].tolist() and len(split._files) <= 3


def test_most_recently_used_shard_stays_open(split):
    split.max_open = 2
    split.points(0)  # shard 0
    split.points(SHARD)  # shard 1
    split.points(1)  # shard 0 again: now the most recent
    split.points(2 * SHARD)  # shard 2 evicts shard 1, the least recently used
    assert list(split._files) == [0, 2]


def test_a_view_unpickled_after_evictions_reads_the_same(split, arrays):
    split.max_open = 1
    split.points(0), split.points(N - 1)
    clone = pickle.loads(pickle.dumps(split))
    assert len(clone._files) == 0
    assert np.array_equal(clone.points(5), arrays["points"][5])


@pytest.mark.parametrize("start,stop", [(0, N), (0, 1), (2, 7), (3, 6), (5, 5), (20, 23), (10, 99), (-4, 2)])
def test_points_range_is_the_slice_of_the_split(split, arrays, start, stop):
    got = split.points_range(start, stop)
    want = arrays["points"][max(start, 0) : stop]
    assert got.dtype == np.float32 and got.shape == (len(want), 5, 3)
    assert np.array_equal(got, want)


def test_points_range_opens_only_the_shards_it_reads(split):
    split.points_range(4, 8)  # objects 4..7 lie in shards 1 and 2
    assert sorted(split._files) == [1, 2]


def test_in_memory_split_points_range(arrays):
    from xmodal.data.store import make_manifest, StoreContents

    man = make_manifest(classes=["a", "b"], counts={"train": N}, shards={"train": []},
                        contents=StoreContents(views=0, points=5, image_size=None))
    sv = MemoryStore(man, {"train": {k: arrays[k] for k in ("ids", "labels", "points")}}).split("train")
    assert np.array_equal(sv.points_range(4, 9), arrays["points"][4:9])
    assert np.array_equal(sv.points_range(0, N), sv.all_points())
