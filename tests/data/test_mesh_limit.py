"""Mesh sizes read from file headers, and the limit ``prepare`` puts on a mesh's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from xmodal.data import mesh_limit as ml
from xmodal.data.mesh_limit import MeshLimit, estimate_peak_bytes, mesh_counts
from xmodal.errors import MeshError


def _grid(n: int) -> trimesh.Trimesh:
    """A flat n x n grid of quads: (n+1)^2 vertices, 2 n^2 faces."""
    xs = np.arange(n + 1, dtype=np.float64)
    v = np.stack(np.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    v = np.column_stack([v, np.zeros(len(v))])
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    a = (i * (n + 1) + j).ravel()
    f = np.concatenate([np.stack([a, a + n + 1, a + n + 2], 1), np.stack([a, a + n + 2, a + 1], 1)])
    return trimesh.Trimesh(v, f, process=False)


def _off(path: Path, mesh: trimesh.Trimesh, header: str = "OFF\n") -> Path:
    lines = [f"{len(mesh.vertices)} {len(mesh.faces)} 0"] + [" ".join(map(str, p)) for p in mesh.vertices]
    lines += [f"3 {a} {b} {c}" for a, b, c in mesh.faces]
    path.write_text("# a comment\n" + header + "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("header", ["OFF\n", "OFF", "", "NOFF\n# more\n"])
def test_off_counts_from_the_header(tmp_path, header):
    m = _grid(4)
    text = header if header != "OFF" else "OFF"  # "OFF" alone: glued to the counts (ModelNet)
    assert mesh_counts(_off(tmp_path / "m.off", m, text)) == (25, 32, True)


def test_off_counts_after_a_byte_order_mark(tmp_path):
    # read_off skips a BOM, so the size check before reading must see through it too
    path = tmp_path / "m.off"
    lines = ["OFF", "4 4 0", "0 0 0", "1 0 0", "0 1 0", "0 0 1", "3 0 1 2", "3 0 1 3", "3 0 2 3", "3 1 2 3"]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    assert mesh_counts(path) == (4, 4, True)


@pytest.mark.parametrize("ext,text", [(".ply", False), (".stl", False), (".obj", True)])
def test_counts_of_exported_meshes(tmp_path, ext, text):
    m = _grid(5)
    path = tmp_path / f"m{ext}"
    m.export(path)
    v, f, is_text = mesh_counts(path)
    assert f == 50 and is_text == text
    assert v == (150 if ext == ".stl" else 36)  # STL stores three corners per face


def test_ascii_ply_and_stl_count_as_text(tmp_path):
    m = _grid(3)
    (tmp_path / "a.ply").write_bytes(trimesh.exchange.ply.export_ply(m, encoding="ascii"))
    (tmp_path / "a.stl").write_text(trimesh.exchange.stl.export_stl_ascii(m))
    assert mesh_counts(tmp_path / "a.ply") == (16, 18, True)
    assert mesh_counts(tmp_path / "a.stl") == (54, 18, True)


def test_obj_counted_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(ml, "_BLOCK", 7)  # tokens straddle block boundaries
    path = tmp_path / "m.obj"
    _grid(4).export(path)
    assert mesh_counts(path)[:2] == (25, 32)


def test_no_counts_for_formats_without_them_or_unreadable_headers(tmp_path):
    (tmp_path / "m.glb").write_bytes(b"glTF")
    (tmp_path / "bad.off").write_text("OFF\nnot numbers\n")
    (tmp_path / "bad.ply").write_text("ply\nformat ascii 1.0\n")
    for name in ("m.glb", "bad.off", "bad.ply", "missing.off"):
        assert mesh_counts(tmp_path / name) is None


def test_estimate_grows_with_faces_vertices_and_text():
    assert estimate_peak_bytes(1_000_000, 2_000_000) == 2_000_000 * ml.BYTES_PER_FACE + 1_000_000 * ml.BYTES_PER_VERTEX
    assert estimate_peak_bytes(1, 2, text=True) > estimate_peak_bytes(1, 2)
    assert estimate_peak_bytes(6, 2) > estimate_peak_bytes(1, 2)


def test_max_faces_names_the_size_and_the_limit():
    MeshLimit(max_faces=100).check("m.off", 10**9, 100)  # vertices do not count against max_faces
    with pytest.raises(MeshError) as err:
        MeshLimit(max_faces=100).check("m.off", 60, 101)
    assert str(err.value).startswith("m.off: 101 faces, more than max_faces=100")


def test_memory_limit_names_the_need_and_the_share():
    limit = MeshLimit(memory=3 << 30, origin="test share")
    limit.check("m.ply", 1_000_000, 2_000_000)  # ~0.75 GiB
    with pytest.raises(MeshError) as err:
        limit.check("m.ply", 20_000_000, 40_000_000)
    msg = str(err.value)
    assert "40,000,000 faces and 20,000,000 vertices need about 14.9 GiB" in msg
    assert "more than the 3.0 GiB one worker may use (test share)" in msg
    MeshLimit().check("m.ply", 10**9, 10**9)  # unknown memory: unchecked


def test_share_of_the_available_memory(monkeypatch):
    monkeypatch.setattr(ml, "available_memory", lambda: 8 << 30)
    limit = MeshLimit.for_workers(0, 4)
    assert limit.memory == (2 << 30) - ml.PROCESS_BYTES and "shared by 4 workers" in limit.origin
    assert MeshLimit.for_workers(1000, 4) == MeshLimit(max_faces=1000)
    monkeypatch.setattr(ml, "available_memory", lambda: None)
    assert MeshLimit.for_workers(0, 4) == MeshLimit()


def test_available_memory_is_positive_on_linux():
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo")
    assert ml.available_memory() > 0


def test_check_file_reads_only_the_header(tmp_path):
    path = tmp_path / "huge.ply"  # declares a billion faces; a sparse file of that size holds zeros
    path.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\n"
                     b"property float y\nproperty float z\nelement face 1000000000\n"
                     b"property list uchar int vertex_indices\nend_header\n")
    with open(path, "r+b") as fh:
        fh.truncate(13 * 10**9 + 200)
    with pytest.raises(ml.MeshTooLarge, match="1,000,000,000 faces, more than max_faces"):
        MeshLimit(max_faces=10**6).check_file(path)
    MeshLimit(max_faces=10**6).check_file(tmp_path / "absent.ply")  # the reader reports that one


@pytest.mark.parametrize("name,data", [
    ("short.off", b"OFF\n500000000 1000000000 0\n0 0 0\n"),
    ("short.ply", b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                  b"property float z\nelement face 1000000000\nproperty list uchar int vertex_indices\nend_header\n"),
])
def test_a_header_declaring_more_than_the_file_holds_is_truncated_not_too_large(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    for limit in (MeshLimit(max_faces=10**6), MeshLimit(memory=1 << 30)):
        with pytest.raises(MeshError, match=f"{name}: truncated or corrupt: the header declares .*1,000,000,000 "
                                            f"faces, at least .* bytes, and the file has {len(data)}") as err:
            limit.check_file(path)
        assert not isinstance(err.value, ml.MeshTooLarge)  # kept as a broken file, not retried with more memory
