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
import pickle
import re
import resource
import string
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from xmodal.api import load_run
from xmodal.config import load_config, load_preset, save_config, to_dict
from xmodal.data.labeled_psb import read_face_labels
from xmodal.data.mesh_io import load_mesh
from xmodal.data.psb import read_cla
from xmodal.data.store import ShapeStore, open_dataset, write_store
from xmodal.data.types import Mesh
from xmodal.errors import ConfigError, DataError, LabelsError, MeshError, StoreError, XmodalError
from xmodal.eval.config import EvaluateConfig
from xmodal.models import registry
from xmodal.train.checkpoint import build_networks, load_checkpoint, save_encoders
from xmodal.train.config import PretrainConfig
from xmodal.utils.io import read_json, read_jsonl

_EXPLORE = int(os.environ.get("XMODAL_FUZZ_EXAMPLES", "0"))
#: every fuzz test: 60 derandomized examples (XMODAL_FUZZ_EXAMPLES: that many random ones), 5 s each at most
FUZZ = settings(
    max_examples=_EXPLORE or 60,
    derandomize=not _EXPLORE,
    database=None,
    deadline=timedelta(seconds=5),
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
            return
        _check_mesh(mesh)

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


@pytest.mark.parametrize("name, text", [
    ("huge.off", b"OFF\n1000000000000 1000000000000 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n"),
    ("huge_poly.off", b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n1000000000000 0 1 2\n"),
    ("huge_index.off", b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 99999999999999999999\n"),
    ("huge.ply", _as_ply(False).replace(b"element vertex 4", b"element vertex 1000000000000")),
    ("huge_faces.ply", _as_ply(True).replace(b"element face 4", b"element face 1000000000000")),
])
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
            return
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
            return
        owners = cla.class_of()
        assert len(owners) == cla.num_models and all(isinstance(m, int) and m >= 0 for m in owners)
        assert len({c.name for c in cla.classes}) == len(cla.classes)

    run()
