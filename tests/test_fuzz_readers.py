"""Property-based fuzzing of every reader of outside files.

Each reader gets random bytes and *mutated valid files* (truncated, bytes flipped, lines
deleted or duplicated, numbers replaced by huge / negative / NaN values, structured
mutations of JSON and HDF5 content) and must give either a valid result (checked against
the reader's contract) or an error of :class:`xmodal.errors.XmodalError`'s family: never
another exception, never a hang (every example runs under a deadline, on small inputs).

Runs are derandomized (the same examples on every machine and run, so CI is deterministic)
and do not use Hypothesis' example database. ``XMODAL_FUZZ_EXAMPLES=5000`` runs that many
random (not derandomized) examples per reader instead: a longer search, for development.
"""

from __future__ import annotations

import json
import os
import re
import resource
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from xmodal.api import load_run
from xmodal.config import from_dict, load_config, load_preset, save_config, to_dict
from xmodal.data.labeled_psb import read_face_labels
from xmodal.data.mesh_io import load_mesh
from xmodal.data.psb import read_cla
from xmodal.data.sources import ModelNetH5Source
from xmodal.data.datasets import open_dataset
from xmodal.data.store import ShapeStore, write_store
from xmodal.data.types import Mesh
from xmodal.errors import ConfigError, DataError, LabelsError, MeshError, StoreError, XmodalError
from xmodal.eval.config import EvaluateConfig
from xmodal.models import registry
from xmodal.train.checkpoint import build_networks, load_checkpoint, save_encoders
from xmodal.train.config import PretrainConfig
from xmodal.utils.io import read_json, read_jsonl

_EXPLORE = int(os.environ.get("XMODAL_FUZZ_EXAMPLES", "0"))
#: every fuzz test: 60 derandomized examples (XMODAL_FUZZ_EXAMPLES: that many random ones), each within
#: 10 s (far above the milliseconds they take: a bound on hangs, not a timing test on a busy machine)
FUZZ = settings(
    max_examples=_EXPLORE or 60,
    derandomize=not _EXPLORE,
    database=None,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- mutations

#: what a number in a file is replaced by: huge, negative, NaN, overlong, not a number
NASTY_NUMBERS = [b"1e308", b"-1e308", b"1e999", b"-1", b"-2147483649", b"nan", b"NaN", b"inf", b"-inf", b"0",
                 b"4294967296", b"99999999999999999999", b"1000000000000", b"9" * 5000, b"0x10", b"1.5", b"", b"-0"]
_NUMBER = re.compile(rb"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?")


@st.composite
def mutated(draw, valid: bytes, max_ops: int = 3) -> bytes:
    """``valid`` after 1..max_ops random edits: truncate, flip a byte, insert bytes, delete or
    duplicate a line, replace a number by a nasty one."""
    data = valid
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete_line", "dup_line", "number", "number"]))
        if op == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data = data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]
        elif op in ("delete_line", "dup_line"):
            lines = data.split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines[i:i + 1] = [] if op == "delete_line" else [lines[i], lines[i]]
            data = b"\n".join(lines)
        elif op == "number":
            spans = [m.span() for m in _NUMBER.finditer(data)]
            if spans:
                a, b = draw(st.sampled_from(spans))
                data = data[:a] + draw(st.sampled_from(NASTY_NUMBERS)) + data[b:]
    return data


def inputs(valid: bytes) -> st.SearchStrategy[bytes]:
    """Mutations of a valid file, and random bytes."""
    return st.one_of(mutated(valid), mutated(valid), st.binary(max_size=512))


#: JSON values a structured mutation puts in place of one entry
NASTY_JSON = st.one_of(
    st.sampled_from([None, True, -1, 0, 10**12, 2**63, 1e308, -1e308, float("nan"), "", "x", "../../etc/passwd",
                     "/etc/passwd", [], {}, [1, "a"], {"a": 1}]),
    st.text(max_size=8), st.integers(), st.lists(st.integers(-5, 5), max_size=4),
)


@st.composite
def json_mutated(draw, valid):
    """``valid`` (a JSON value) with one entry, at any depth, replaced, deleted or added."""
    value = json.loads(json.dumps(valid))
    paths = list(_json_paths(value))
    path = draw(st.sampled_from(paths))
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = draw(NASTY_JSON)
    else:
        parent[key] = draw(NASTY_JSON)
    return value


def _json_paths(value, prefix=()):
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _json_paths(v, prefix + (k,))


def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="xmodal-fuzz-") as d:
        yield Path(d)


# --------------------------------------------------------------------------- meshes

_BOX_V = [(x, y, z) for x in (0, 1) for y in (0, 1) for z in (0, 1)]
_BOX_F = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1),
          (2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3)]
#: a unit box in OFF, with a comment and CRLF line ends on some lines
_BOX_OFF = ("OFF\n# a box\n8 12 0\n" + "".join(f"{x}.0 {y}.0 {z}.0\r\n" for x, y, z in _BOX_V)
            + "".join(f"3 {a} {b} {c}\n" for a, b, c in _BOX_F)).encode()


def _as_ply(binary: bool) -> bytes:
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    f = [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    head = (f"ply\nformat {'binary_little_endian' if binary else 'ascii'} 1.0\nelement vertex 4\n"
            "property float x\nproperty float y\nproperty float z\nelement face 4\n"
            "property list uchar int vertex_indices\nend_header\n").encode()
    if binary:
        body = v.tobytes() + b"".join(bytes([3]) + np.array(t, "<i4").tobytes() for t in f)
    else:
        body = "".join(f"{x} {y} {z}\n" for x, y, z in v).encode() + "".join(f"3 {a} {b} {c}\n" for a, b, c in f).encode()
    return head + body


_OBJ = b"# tetrahedron\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n"
MESHES = {".off": _BOX_OFF, ".ply": _as_ply(False), ".obj": _OBJ, ".bin.ply": _as_ply(True)}


def _check_mesh(mesh: Mesh) -> None:
    """The Mesh contract: finite (V,3) float64 vertices, (F>=1,3) in-range faces, finite positive area."""
    v, f = mesh.vertices, mesh.faces
    assert v.dtype == np.float64 and v.ndim == 2 and v.shape[1] == 3 and np.isfinite(v).all()
    assert f.dtype == np.int64 and f.ndim == 2 and f.shape[1] == 3 and len(f) >= 1
    assert f.min() >= 0 and f.max() < len(v)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    with np.errstate(over="ignore", invalid="ignore"):
        area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum()
    assert np.isfinite(area) and area > 0


@pytest.mark.parametrize("kind", sorted(MESHES))
def test_fuzz_mesh_files(scratch, kind):
    path = scratch / f"mesh{kind[-4:]}"

    @FUZZ
    @given(data=inputs(MESHES[kind]))
    def run(data):
        path.write_bytes(data)
        try:
            mesh = load_mesh(path)
        except MeshError as exc:
            assert str(path) in str(exc)
            event(f"error: {type(exc).__name__}")
            return
        _check_mesh(mesh)
        event("valid")

    run()


def _no_big_allocation(fn, limit_mb: int = 200, seconds: float = 5.0):
    """Run ``fn``; fail when it takes longer than ``seconds`` or grows the peak RSS by ``limit_mb``."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert time.perf_counter() - t0 < seconds and grown_mb < limit_mb, (time.perf_counter() - t0, grown_mb)


@pytest.mark.parametrize("name, text", [pytest.param(n, t, id=n) for n, t in [
    ("huge.off", b"OFF\n1000000000000 1000000000000 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n"),
    ("huge_poly.off", b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n1000000000000 0 1 2\n"),
    ("huge_index.off", b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 99999999999999999999\n"),
    ("huge.ply", _as_ply(False).replace(b"element vertex 4", b"element vertex 1000000000000")),
    ("huge_faces.ply", _as_ply(True).replace(b"element face 4", b"element face 1000000000000")),
]])
def test_a_header_claiming_huge_counts_does_not_allocate(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text)
    with pytest.raises(MeshError, match=re.escape(str(path))):
        _no_big_allocation(lambda: load_mesh(path))


# --------------------------------------------------------------------------- Labeled PSB labels files

#: the box's 12 faces in two parts, one part's faces over two lines
_LABELS = b"side\n1 2 3 4\n5 6\ntop\n7 8 9 10 11 12\n"


def test_fuzz_labels_files(scratch):
    path = scratch / "m_labels.txt"

    @FUZZ
    @given(data=inputs(_LABELS), num_faces=st.sampled_from([12, 0, 1, 11, 13]))
    def run(data, num_faces):
        path.write_bytes(data)
        try:
            labels, names = read_face_labels(path, num_faces)
        except LabelsError as exc:
            assert str(path) in str(exc)
            event(f"error: {type(exc).__name__}")
            return
        event("valid")
        assert labels.shape == (num_faces,) and labels.dtype == np.int64
        assert names and (num_faces == 0 or (labels.min() >= 0 and labels.max() < len(names)))

    run()


# --------------------------------------------------------------------------- PSB .cla files

_CLA = b"PSB 1\n3 4\n\nanimal 0 0\n\ndog animal 2\n10\n11\n\ncat animal 2\n12\n1300\n"


def test_fuzz_cla_files(scratch):
    path = scratch / "train.cla"

    @FUZZ
    @given(data=inputs(_CLA))
    def run(data):
        path.write_bytes(data)
        try:
            cla = read_cla(path)
        except DataError as exc:
            assert str(path) in str(exc)
            event(f"error: {type(exc).__name__}")
            return
        event("valid")
        owners = cla.class_of()
        assert len(owners) == cla.num_models and all(isinstance(m, int) and m >= 0 for m in owners)
        assert len({c.name for c in cla.classes}) == len(cla.classes)

    run()


# --------------------------------------------------------------------------- JSON files


def test_fuzz_json_readers(scratch):
    path = scratch / "x.json"
    valid = b'{"a": [1, 2.5, "x"], "b": {"c": null}}\n{"step": 3}\n'

    @FUZZ
    @given(data=st.one_of(inputs(valid), st.just(b"[" * 100_000), st.just(b'{"a":' * 100_000)))
    def run(data):
        path.write_bytes(data)
        try:
            read_json(path)
        except DataError as exc:
            assert str(path) in str(exc)
        try:
            records = read_jsonl(path)
        except DataError as exc:
            assert str(path) in str(exc)
            return
        assert all(isinstance(r, dict) for r in records)

    run()


# --------------------------------------------------------------------------- ModelNet40 HDF5 folders


def _write_h5(path: Path, n: int, *, points: int = 16, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=rng.normal(size=(n, points, 3)).astype(np.float32), chunks=(2, points, 3),
                         compression="gzip")
        f.create_dataset("label", data=(np.arange(n) % 2).astype(np.uint8).reshape(n, 1))


def _h5_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _write_h5(root / "ply_data_train0.h5", 6)
    _write_h5(root / "ply_data_test0.h5", 4, seed=1)
    (root / "shape_names.txt").write_text("airplane\nchair\n")
    (root / "train_files.txt").write_text("data/ply_data_train0.h5\n")
    (root / "ply_data_test_0_id2file.json").write_text(json.dumps([f"chair/chair_{i:04d}.ply" for i in range(4)]))
    return root


#: arrays a structured mutation writes as one dataset of an HDF5 file
H5_ARRAYS = st.one_of(
    st.sampled_from([
        np.zeros((6, 16, 3), np.float32), np.full((6, 16, 3), np.nan, np.float32), np.zeros((6, 0, 3), np.float32),
        np.zeros((6, 16, 2), np.float32), np.zeros((7, 16, 3), np.float64), np.zeros((6, 16, 3), np.int8),
        np.full((6, 1), 255, np.uint8), np.full((6, 1), -5, np.int64), np.full((6,), 2**40, np.int64),
        np.zeros((5, 1), np.int32), np.array([b"abc"] * 6), np.zeros((), np.float32), np.full((6, 1), 1.5),
    ]),
    st.builds(lambda n, p: np.random.default_rng(n).normal(size=(n, p, 3)).astype(np.float32) * 1e30,
              st.integers(0, 8), st.integers(1, 20)),
)


@st.composite
def h5_mutation(draw):
    """``(file name, how)``: bytes of a file mutated, or one HDF5 dataset rewritten."""
    name = draw(st.sampled_from(["ply_data_train0.h5", "ply_data_test0.h5", "shape_names.txt", "train_files.txt",
                                 "ply_data_test_0_id2file.json"]))
    if name.endswith(".h5") and draw(st.booleans()):
        key = draw(st.sampled_from(["data", "label"]))
        how = draw(st.one_of(H5_ARRAYS, st.sampled_from(["delete", "group", "sparse"])))
        return name, ("dataset", key, how)
    return name, ("bytes", draw(st.data()))


def _rewrite_dataset(path: Path, key: str, how) -> None:
    with h5py.File(path, "a") as f:
        del f[key]
        if isinstance(how, np.ndarray):
            f.create_dataset(key, data=how)
        elif how == "group":
            f.create_group(key)
        elif how == "sparse":  # declares 10^9 rows, stores none of them
            shape = (10**9, 16, 3) if key == "data" else (10**9, 1)
            f.create_dataset(key, shape=shape, dtype=np.float32 if key == "data" else np.uint8,
                             chunks=(1,) + shape[1:])


def test_fuzz_modelnet_h5_folders(scratch):
    valid = _h5_folder(scratch / "h5_valid")
    contents = {p.name: p.read_bytes() for p in valid.iterdir()}

    @FUZZ
    @given(mutation=h5_mutation())
    def run(mutation):
        root = scratch / "h5"
        root.mkdir(exist_ok=True)
        for name, blob in contents.items():
            (root / name).write_bytes(blob)
        name, (kind, *how) = mutation
        if kind == "dataset":
            _rewrite_dataset(root / name, *how)
        else:
            (root / name).write_bytes(how[0].draw(inputs(contents[name])))
        try:
            store = open_dataset(root)
            _check_store(store)
            event("valid")
        except XmodalError as exc:
            event(f"error: {type(exc).__name__}")
        try:  # what prepare does: one object at a time, a bad row fails only that object
            src = ModelNetH5Source(root)
        except XmodalError:
            return
        for item in src.items:
            try:
                cloud = src.load(item)
            except MeshError as exc:
                assert item.path in str(exc)
                continue
            assert cloud.points.shape == (src.num_points, 3) and np.isfinite(cloud.points).all()
        src.close()

    run()


def _check_store(store: ShapeStore) -> None:
    """Read everything a store holds through its API and check it against the store contract."""
    for name in store.splits:
        view = store.split(name)
        n = view.n
        assert n == store.counts[name] and len(view.ids) == n
        labels = view.labels
        assert labels.shape == (n,) and (n == 0 or (labels.min() >= 0 and labels.max() < store.num_classes))
        pts = view.all_points()
        assert pts.shape == (n, store.num_points, 3) and np.isfinite(pts).all()
        for i in range(n):
            assert view.points(i).shape == (store.num_points, 3)
            pl = view.point_labels(i)
            assert pl is None or pl.shape == (store.num_points,)
            if view.has_images:
                assert view.images(i).shape[0] == store.views and view.image(i, -1).dtype == np.uint8


# --------------------------------------------------------------------------- dataset stores


def _valid_store(root: Path) -> ShapeStore:
    rng = np.random.default_rng(0)

    def split(n):
        return {"ids": [f"c/o{i}" for i in range(n)], "labels": np.arange(n) % 2,
                "points": rng.normal(size=(n, 8, 3)).astype(np.float32),
                "images": rng.integers(0, 256, size=(n, 2, 4, 4), dtype=np.uint8),
                "cameras": rng.uniform(0, 90, size=(n, 2, 2)).astype(np.float32),
                "point_labels": rng.integers(0, 3, size=(n, 8))}

    return write_store(root, classes=["a", "b"], splits={"train": split(3), "test": split(2)}, chunk_size=2,
                       part_names=["a/x", "a/y", "b/z"])


def _shards(root: Path) -> list[Path]:
    return sorted((root / "shards").rglob("*.h5"))


@st.composite
def array_mutated(draw, original: np.ndarray) -> np.ndarray:
    """``original`` with NaN/inf/huge/negative values, another dtype, rows cut or added, or an axis dropped."""
    a = np.array(original)
    op = draw(st.sampled_from(["values", "values", "dtype", "rows", "axis"]))
    if op == "values" and a.size and a.dtype.kind in "fiu":
        bad = draw(st.sampled_from([np.nan, np.inf, -1, 1e30, 2**31, 255]))
        a = a.astype(np.float64) if isinstance(bad, float) and a.dtype.kind != "f" else a
        with np.errstate(invalid="ignore", over="ignore"):
            a.flat[draw(st.integers(0, a.size - 1))] = np.asarray(bad).astype(a.dtype)
    elif op == "dtype":
        dtype = draw(st.sampled_from([np.float16, np.int8, np.uint16, np.bool_, "S3"]))
        a = a.astype(dtype) if a.dtype.kind in "fiub" else np.zeros(a.shape, dtype)
    elif op == "rows":
        a = np.concatenate([a, a[:1]]) if draw(st.booleans()) and len(a) else a[1:]
    elif op == "axis" and a.ndim > 1:
        a = a[..., 0]
    return a


@st.composite
def store_mutation(draw, manifest: dict, shards: list[str]):
    kind = draw(st.sampled_from(["manifest_bytes", "manifest_json", "manifest_json", "shard_bytes", "shard_dataset"]))
    if kind == "manifest_json":
        return kind, _dumps(draw(json_mutated(manifest)))
    if kind == "manifest_bytes":
        return kind, draw(inputs(_dumps(manifest)))
    shard = draw(st.sampled_from(shards))
    if kind == "shard_dataset":
        key = draw(st.sampled_from(["ids", "labels", "points", "images", "cameras", "point_labels"]))
        return kind, (shard, key, draw(st.one_of(st.sampled_from(["delete", "group"]), st.just("array"))))
    return kind, (shard, draw(st.data()))


def test_fuzz_stores(scratch):
    valid = scratch / "store_valid"
    _valid_store(valid)
    manifest = json.loads((valid / "manifest.json").read_text())
    blobs = {p.relative_to(valid).as_posix(): p.read_bytes() for p in [valid / "manifest.json", *_shards(valid)]}

    @FUZZ
    @given(mutation=store_mutation(manifest, sorted(k for k in blobs if k.endswith(".h5"))), data=st.data())
    def run(mutation, data):
        def draw_array(original):
            return data.draw(array_mutated(np.asarray(original)))

        root = scratch / "store"
        for rel, blob in blobs.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(blob)
        kind, how = mutation
        if kind.startswith("manifest"):
            (root / "manifest.json").write_bytes(how)
        elif kind == "shard_dataset":
            shard, key, what = how
            if what == "array":
                with h5py.File(root / shard, "r") as f:
                    original = f[key].asstr()[()] if key == "ids" else f[key][()]
                what = draw_array(original)
            _rewrite_h5(root / shard, key, what)
        else:
            shard, data = how
            (root / shard).write_bytes(data.draw(mutated(blobs[shard], max_ops=2)))
        try:
            with ShapeStore(root) as store:
                _check_store(store)
            event("valid")
        except XmodalError as exc:
            event(f"error: {type(exc).__name__}")

    run()


def _rewrite_h5(path: Path, key: str, how) -> None:
    with h5py.File(path, "a") as f:
        if key in f:
            del f[key]
        if isinstance(how, np.ndarray) and how.dtype.kind in "OU":
            f.create_dataset(key, data=how.astype(object), dtype=h5py.string_dtype())
        elif isinstance(how, np.ndarray):
            f.create_dataset(key, data=how)
        elif how == "group":
            f.create_group(key)


@pytest.mark.parametrize("rel", ["../outside.h5", "/abs/outside.h5", "shards/../../outside.h5", "", 7])
def test_a_manifest_cannot_name_a_shard_outside_its_folder(tmp_path, rel):
    root = tmp_path / "ds"
    _valid_store(root)
    outside = tmp_path / "outside.h5"  # a perfectly valid shard, but not the dataset's
    outside.write_bytes(_shards(root)[0].read_bytes())
    man = json.loads((root / "manifest.json").read_text())
    man["shards"]["train"][0] = rel if rel != "/abs/outside.h5" else str(outside)
    (root / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="shard path") as info:
        ShapeStore(root)
    assert str(root / "manifest.json") in str(info.value)


def test_a_shard_declaring_a_billion_rows_is_refused_before_reading(tmp_path):
    root = tmp_path / "ds"
    _valid_store(root)
    man = json.loads((root / "manifest.json").read_text())
    man["counts"]["train"] = 10**9
    man["shard_sizes"]["train"] = [10**9 - 1, 1]
    (root / "manifest.json").write_text(json.dumps(man))
    shard = root / "shards" / "train" / "00000.h5"
    with h5py.File(shard, "a") as f:
        for key in list(f):
            del f[key]
        f.create_dataset("ids", shape=(10**9 - 1,), dtype=h5py.string_dtype(), chunks=(1024,))
        f.create_dataset("labels", shape=(10**9 - 1,), dtype=np.int64, chunks=(1024,))
        f.create_dataset("points", shape=(10**9 - 1, 8, 3), dtype=np.float32, chunks=(16, 8, 3))
    view = ShapeStore(root).split("train")
    with pytest.raises(StoreError, match="declares"):
        _no_big_allocation(view.all_points)


# --------------------------------------------------------------------------- run folders


class _TinyImageEncoder(nn.Module):
    """A 16-d image encoder small enough to build for every fuzz example."""

    out_dim = 16

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)

    def forward(self, x):
        return self.conv(x.expand(-1, 3, -1, -1)).mean(dim=(2, 3))


#: the architecture of the fuzzed run: Fimg tiny, Fp a small DGCNN, Ff
_ARCH = {
    "image_encoder": {"name": "tiny", "kwargs": {}},
    "point_encoder": {"name": "dgcnn", "kwargs": {"k": 4, "channels": [8, 8, 8, 8], "emb_dims": 16}},
    "pair_classifier": {"kwargs": {"hidden": 8, "input_norm": "none"}},
}


@pytest.fixture(scope="module")
def tiny_encoder():
    registry.IMAGE_ENCODERS["tiny"] = _TinyImageEncoder
    yield
    del registry.IMAGE_ENCODERS["tiny"]


def _valid_run(root: Path) -> Path:
    nets = build_networks(json.loads(json.dumps(_ARCH)), seed=0)
    info = {"architecture": _ARCH, "image_size": 32, "num_points": 64, "up_axis": "y", "step": 3,
            "config": to_dict(PretrainConfig())}
    save_encoders(root, nets=nets, info=info)
    state = {"format": "xmodal-checkpoint", "format_version": 1, "step": 3, "weights": "last.safetensors",
             "optimizer": {"state": {}, "param_groups": []}, "architecture": _ARCH, "image_size": 32,
             "num_points": 64}
    (root / "checkpoints").mkdir()
    tensors = {f"model/{k}": v for k, v in _tensors(root / "encoders.safetensors").items()}
    save_file(tensors, str(root / "checkpoints" / "last.safetensors"), metadata={"xmodal_state": json.dumps(state)})
    (root / "checkpoints" / "last.json").write_text(json.dumps(state))
    save_config(PretrainConfig(), root / "config.yaml")
    return root


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@st.composite
def run_mutation(draw, files: dict[str, bytes]):
    """``(file, new bytes)``: a run file with mutated bytes, JSON content or embedded state."""
    name = draw(st.sampled_from(sorted(files)))
    blob = files[name]
    if name.endswith(".json") and draw(st.booleans()):
        return name, _dumps(draw(json_mutated(json.loads(blob))))
    if name == "checkpoints/last.safetensors" and draw(st.booleans()):  # same weights, other embedded state
        state = json.loads(files["checkpoints/last.json"])
        text = draw(st.one_of(st.builds(_dumps, json_mutated(state)), inputs(_dumps(state))))
        return name, ("state", text.decode("utf-8", "replace"))
    return name, draw(mutated(blob, max_ops=2) if name.endswith(".safetensors") else inputs(blob))


def test_fuzz_run_folders(scratch, tiny_encoder):
    valid = _valid_run(scratch / "run_valid")
    files = {p.relative_to(valid).as_posix(): p.read_bytes() for p in valid.rglob("*") if p.is_file()}
    weights = _tensors(valid / "checkpoints" / "last.safetensors")

    @FUZZ
    @given(mutation=run_mutation(files), prefer=st.sampled_from(["final", "last"]))
    def run(mutation, prefer):
        root = scratch / "run"
        for rel, blob in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(blob)
        name, blob = mutation
        if isinstance(blob, tuple):
            save_file(weights, str(root / name), metadata={"xmodal_state": blob[1]})
        else:
            (root / name).write_bytes(blob)
        try:
            ckpt = load_checkpoint(root)
            assert ckpt is None or (isinstance(ckpt.state, dict) and isinstance(ckpt.step, int) and ckpt.step >= 0)
            loaded = load_run(root, prefer=prefer)
        except XmodalError as exc:
            event(f"error: {type(exc).__name__}")
            return
        event("valid")
        assert 1 <= loaded.image_size <= 4096 and loaded.num_points >= 1 and loaded.up_axis in ("x", "y", "z")
        for net in (loaded.image_encoder, loaded.point_encoder, loaded.pair_classifier):
            assert not net.training and all(torch.isfinite(p).all() for p in net.parameters())

    run()


def test_a_run_declaring_a_huge_network_is_refused_before_building_it(tmp_path, tiny_encoder):
    run = _valid_run(tmp_path / "run")
    meta = json.loads((run / "encoders.json").read_text())
    meta["architecture"]["pair_classifier"]["kwargs"]["hidden"] = 10**12  # 10^12 x 32 weights
    (run / "encoders.json").write_text(json.dumps(meta))
    with pytest.raises(XmodalError, match="encoders.safetensors.*do not fit"):
        _no_big_allocation(lambda: load_run(run))


# --------------------------------------------------------------------------- config files


_PRESET = (Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "smoke.yaml").read_bytes()


@pytest.mark.parametrize("cls", [PretrainConfig, EvaluateConfig])
def test_fuzz_saved_configs(scratch, cls):
    path = scratch / "config.yaml"
    save_config(cls(), path)
    valid = path.read_bytes()

    @FUZZ
    @given(data=inputs(valid))
    def run(data):
        path.write_bytes(data)
        try:
            cfg = load_config(cls, path)
        except ConfigError as exc:
            assert str(path) in str(exc)
            event(f"error: {type(exc).__name__}")
            return
        event("valid")
        assert isinstance(cfg, cls)
        cfg.validate()
        yaml.safe_dump(to_dict(cfg))  # what save_config writes

    run()


def test_fuzz_presets(scratch):
    path = scratch / "preset.yaml"

    @FUZZ
    @given(data=inputs(_PRESET))
    def run(data):
        path.write_bytes(data)
        try:
            cfg = from_dict(PretrainConfig, load_preset("pretrain", str(path)))
        except ConfigError as exc:
            event(f"error: {type(exc).__name__}")
            return
        event("valid")
        cfg.validate()

    run()


def test_yaml_aliases_cannot_blow_up(tmp_path):
    # "billion laughs": 9 levels of 10 aliases stand for 10^9 strings, in fields of text and of
    # integers: refused quickly, with a bounded message
    levels = ["&l0 [" + ", ".join(["lol"] * 10) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    path = tmp_path / "evaluate.yaml"
    for field in ("tasks", "views"):
        path.write_text(f"{field}: [{', '.join(levels)}]\n")
        with pytest.raises(ConfigError, match=field) as info:
            _no_big_allocation(lambda: load_config(EvaluateConfig, path))
        assert str(path) in str(info.value) and len(str(info.value)) < 1000


# --------------------------------------------------------------------------- training logs (metrics.jsonl)

_METRICS = b"".join(
    json.dumps(r).encode() + b"\n" for r in [
        {"step": 1, "loss": 2.5, "triplet": 1.0, "cross": 1.5, "cm_acc": 0.5, "lr": 0.001, "time": 1.0},
        {"step": 0, "val.svm3d": 0.3, "val.retrieval3d.top1": 0.2, "val.retrieval3d.map": 0.1, "time": 0.0},
        {"step": 2, "loss": 2.0, "triplet": 0.9, "cross": 1.1, "cm_acc": 0.6, "lr": 0.001, "time": 2.0},
        {"step": 2, "val.svm3d": 0.4, "val.svm2d": 0.35, "val.retrieval3d.top1": 0.3, "time": 2.5},
    ]
)


def test_fuzz_training_logs(scratch):
    from xmodal.eval.figures import training_curves_figure, validation_curve_figure

    path = scratch / "metrics.jsonl"
    path.write_bytes(_METRICS)
    for draw in (training_curves_figure, validation_curve_figure):  # matplotlib's first figure is slow
        assert draw(path, scratch / "curve.png") is not None

    @settings(FUZZ, max_examples=min(FUZZ.max_examples, 12))  # each example draws two PNGs (~0.5 s)
    @given(data=st.one_of(inputs(_METRICS), st.builds(lambda r: _METRICS + _dumps(r) + b"\n",
                                                      json_mutated(json.loads(_METRICS.split(b"\n")[0])))))
    def run(data):
        path.write_bytes(data)
        for draw in (training_curves_figure, validation_curve_figure):
            try:
                out = draw(path, scratch / "curve.png")
            except XmodalError as exc:
                event(f"error: {type(exc).__name__}")
                continue
            event("valid")
            assert out is None or out.stat().st_size > 0

    run()


@pytest.mark.parametrize("plan_edit, match", [
    ({"items": {"../../escape": []}}, "split name '../../escape'"),
    ({"items": {"a/b": []}}, "split name 'a/b'"),
    ({"shard": {"index": "1", "count": 1}}, "'shard' must be"),
    ({"shard": {"index": 2, "count": 1}}, "'shard' must be"),
    ({"settings": {"chunk_size": 0}}, "chunk_size"),
])
def test_a_part_plan_cannot_steer_merge_outside_its_folders(tmp_path, plan_edit, match):
    # merge builds shard paths from a part's plan.json (split names): they must stay inside
    from xmodal.data.merge import merge_datasets

    part = tmp_path / "part"
    part.mkdir()
    plan = {"format_version": 1, "shard": {"index": 1, "count": 1}, "settings": {"chunk_size": 1},
            "items": {"train": []}, "classes": [], "source": {}, **plan_edit}
    (part / "plan.json").write_text(json.dumps(plan))
    manifest = {"format_version": 1, "classes": [], "counts": {"train": 0}, "views": 0, "points": 8,
                "image_size": None, "grayscale": True, "up_axis": "z", "part_names": None, "source": {},
                "settings": {}, "failed": [], "shards": {"train": []}, "shard": plan["shard"]}
    (part / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=re.escape(match)) as info:
        merge_datasets([part], tmp_path / "out" / "merged")
    assert str(part) in str(info.value)
    assert not (tmp_path / "escape").exists()
    del manifest["up_axis"]  # a part's manifest is read like any store's
    plan.update({"items": {"train": []}, "shard": {"index": 1, "count": 1}, "settings": {"chunk_size": 1}})
    (part / "plan.json").write_text(json.dumps(plan))
    (part / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="lacks keys"):
        merge_datasets([part], tmp_path / "out" / "merged")
