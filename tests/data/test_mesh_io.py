"""Tests of xmodal.data.mesh_io: the tolerant OFF parser, trimesh formats, validation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import trimesh

from xmodal.data.mesh_io import MESH_EXTENSIONS, load_mesh, read_mesh_arrays, read_off
from xmodal.data.types import Mesh, MeshError

TETRA_V = "0 0 0\n1 0 0\n0 1 0\n0 0 1\n"
TETRA_F = "3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def _area(mesh):
    tri = mesh.vertices[mesh.faces]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()


def _declared_counts(path):
    """Counts from the header, read independently of read_off (glued or not)."""
    text = path.read_text()
    m = re.match(r"\s*OFF\s*(\d+)\s+(\d+)", text)
    glued = bool(re.match(r"\s*OFF\d", text))
    return int(m.group(1)), int(m.group(2)), glued


# ----------------------------------------------------------------------- OFF parsing


def test_glued_header_tiny(tmp_path):
    p = _write(tmp_path, "g.off", "OFF4 4 0\n" + TETRA_V + TETRA_F)
    v, f = read_off(p)
    assert v.shape == (4, 3) and v.dtype == np.float64
    assert f.shape == (4, 3) and f.dtype == np.int64
    np.testing.assert_array_equal(f[3], [1, 2, 3])
    ref_v, ref_f = read_off(_write(tmp_path, "n.off", "OFF\n4 4 0\n" + TETRA_V + TETRA_F))
    np.testing.assert_array_equal(v, ref_v)
    np.testing.assert_array_equal(f, ref_f)


def test_real_modelnet_files_load_with_declared_counts(modelnet_off_dir):
    files = sorted(modelnet_off_dir.glob("*/*/*.off"))
    assert len(files) == 6
    glued = []
    for p in files:
        nv, nf, is_glued = _declared_counts(p)
        glued += [p.name] if is_glued else []
        v, f = read_off(p)
        assert v.shape == (nv, 3) and f.shape == (nf, 3), p  # all-triangle files
        mesh = load_mesh(p)
        assert 0 < len(mesh.faces) <= nf and np.isfinite(mesh.vertices).all()
    # Checked: none of the six shared files actually has the glued header (bed_0001 has CRLF
    # line ends); the glued case is covered on a real file by the next test.
    assert glued == []


def test_real_file_with_glued_header_and_trimesh_agreement(modelnet_off_dir, tmp_path):
    src = modelnet_off_dir / "bed" / "train" / "bed_0001.off"
    nv, nf, _ = _declared_counts(src)
    text = src.read_text()
    glued = re.sub(r"^\s*OFF\s*\n", "OFF", text, count=1)
    assert glued.startswith(f"OFF{nv} {nf}")
    v, f = read_off(_write(tmp_path, "bed_glued.off", glued))
    assert v.shape == (nv, 3) and f.shape == (nf, 3)
    ref = trimesh.load(str(src), force="mesh", process=False)  # independent reader
    np.testing.assert_allclose(v, ref.vertices)
    np.testing.assert_array_equal(f, ref.faces)


def test_comments_blank_lines_and_crlf(tmp_path):
    text = (
        "# a leading comment\n\nOFF\n# counts follow\n\n4 4 0   # inline\n"
        "0 0 0\n\n1 0 0 # x\n0 1 0\n   \n0 0 1\n# faces\n" + TETRA_F + "\n\n"
    ).replace("\n", "\r\n")
    v, f = read_off(_write(tmp_path, "c.off", text))
    np.testing.assert_array_equal(v, np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float))
    assert f.shape == (4, 3)


def test_headerless_and_offset_header(tmp_path):
    v, f = read_off(_write(tmp_path, "h.off", "4 4 0\n" + TETRA_V + TETRA_F))
    assert v.shape == (4, 3) and f.shape == (4, 3)
    v, f = read_off(_write(tmp_path, "s.off", "OFF 4 4 0\n" + TETRA_V + TETRA_F))
    assert f.shape == (4, 3)


def test_a_byte_order_mark_before_the_header_is_ignored(tmp_path):
    # Windows editors save UTF-8 with a BOM; the file is an ordinary OFF file
    path = tmp_path / "bom.off"
    path.write_bytes(b"\xef\xbb\xbf" + ("OFF\n4 4 0\n" + TETRA_V + TETRA_F).encode())
    v, f = read_off(path)
    assert v.shape == (4, 3) and f.shape == (4, 3)


def test_polygons_fan_triangulated(tmp_path):
    # unit square as a quad, a pentagon, and a triangle with trailing colour columns
    text = (
        "OFF\n8 3 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n"
        "0 0 1\n2 0 1\n3 1 1\n1 2 1\n"
        "4 0 1 2 3\n5 4 5 6 7 0\n3 0 1 4 255 0 0\n"
    )
    v, f = read_off(_write(tmp_path, "q.off", text))
    np.testing.assert_array_equal(
        f, [[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7], [4, 7, 0], [0, 1, 4]]
    )
    mesh = load_mesh(tmp_path / "q.off")
    # the quad's two triangles cover exactly the unit square
    assert _area(Mesh(v, f[:2])) == pytest.approx(1.0)
    assert len(mesh.faces) == 6


def test_colour_columns_on_vertices(tmp_path):
    text = "COFF\n4 4 0\n" + "".join(ln + " 255 0 0 255\n" for ln in TETRA_V.splitlines()) + TETRA_F
    v, f = read_off(_write(tmp_path, "col.off", text))
    np.testing.assert_array_equal(v[1], [1, 0, 0])
    assert f.shape == (4, 3)


# ----------------------------------------------------------------------- broken input

BROKEN = {
    "few_vertices.off": ("OFF\n9 4 0\n" + TETRA_V, "declares 9 vertices and 4 faces"),
    "few_faces.off": ("OFF\n4 6 0\n" + TETRA_V + TETRA_F, "declares 4 vertices and 6 faces"),
    "bad_counts.off": ("OFF\nfour 4 0\n" + TETRA_V + TETRA_F, "bad counts line"),
    "no_faces.off": ("OFF\n4 0 0\n" + TETRA_V, "no faces"),
    "nan.off": ("OFF\n4 4 0\n0 0 0\nnan 0 0\n0 1 0\n0 0 1\n" + TETRA_F, "NaN"),
    "inf.off": ("OFF\n4 4 0\n0 0 0\ninf 0 0\n0 1 0\n0 0 1\n" + TETRA_F, "inf"),
    "out_of_range.off": ("OFF\n4 4 0\n" + TETRA_V + TETRA_F.replace("1 2 3", "1 2 4"), "out of range"),
    "negative_index.off": ("OFF\n4 1 0\n" + TETRA_V + "3 0 -1 2\n", "out of range"),
    "zero_area.off": ("OFF\n4 2 0\n0 0 0\n1 1 1\n2 2 2\n3 3 3\n3 0 1 2\n3 1 2 3\n", "zero total surface area"),
    "garbage.off": (np.random.default_rng(0).bytes(512), "not a text OFF file"),
    "not_off.off": ("ply\nformat ascii 1.0\n", "not an OFF file"),
    "four_d.off": ("4OFF\n1 0 0\n0 0 0 0\n", "'4OFF': an OFF of points in another dimension"),
    "n_d.off": ("CnOFF\n2\n1 0 0\n0 0\n", "'CnOFF': an OFF of points in another dimension"),
    "hn_d.off": ("4nOFF\n2\n1 0 0\n0 0 0\n", "'4nOFF': an OFF of points in another dimension"),
    "empty.off": ("OFF\n\n", "empty OFF file"),
    "bad_vertex.off": ("OFF\n4 4 0\n0 0 0\n1 x 0\n0 1 0\n0 0 1\n" + TETRA_F, "non-numeric vertex data"),
    "short_face.off": ("OFF\n4 1 0\n" + TETRA_V + "4 0 1 2\n", "declares 4 corners"),
    "mesh.xyz": ("1 2 3\n", "unknown mesh extension"),
    "garbage.ply": (np.random.default_rng(1).bytes(512), "trimesh"),
    "garbage.glb": (b"glTF" + np.random.default_rng(2).bytes(200), "trimesh"),
    "empty.glb": (b"", "empty file (0 bytes)"),
    "empty.ply": (b"", "empty file (0 bytes)"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_raise_mesh_error_naming_file_and_reason(tmp_path, name):
    content, reason = BROKEN[name]
    p = _write(tmp_path, name, content)
    with pytest.raises(MeshError) as info:
        load_mesh(p)
    msg = str(info.value)
    assert msg.startswith(str(p) + ": "), msg
    assert reason in msg, msg
    assert info.value.path == str(p)


def test_missing_file(tmp_path):
    with pytest.raises(MeshError, match="does not exist"):
        load_mesh(tmp_path / "nope.off")


def test_degenerate_faces_dropped_silently(tmp_path):
    text = "OFF\n5 4 0\n" + TETRA_V + "2 2 2\n3 0 1 2\n3 0 0 1\n3 1 2 4\n3 0 1 3\n"
    mesh = load_mesh(_write(tmp_path, "d.off", text))
    # only the repeated-index face (0 0 1) is degenerate; collinear faces are checked below
    np.testing.assert_array_equal(mesh.faces, [[0, 1, 2], [1, 2, 4], [0, 1, 3]])
    v = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0]], float)
    m2 = Mesh(v, np.array([[0, 1, 2], [0, 1, 3]]), face_labels=np.array([7, 9]))
    np.testing.assert_array_equal(m2.faces, [[0, 1, 3]])
    np.testing.assert_array_equal(m2.face_labels, [9])


# ----------------------------------------------------------------------- trimesh formats


@pytest.mark.parametrize("ext", [".obj", ".ply", ".stl", ".glb"])
def test_trimesh_formats_round_trip(tmp_path, ext):
    box = trimesh.creation.box(extents=(1.0, 2.0, 3.0))
    p = tmp_path / f"box{ext}"
    box.export(str(p))
    mesh = load_mesh(p)
    assert mesh.vertices.dtype == np.float64 and mesh.faces.dtype == np.int64
    assert mesh.faces.shape == (12, 3)
    assert _area(mesh) == pytest.approx(box.area)  # 2*(2 + 3 + 6) = 22
    np.testing.assert_allclose(mesh.vertices.min(0), [-0.5, -1.0, -1.5], atol=1e-6)


def test_glb_scene_is_concatenated(tmp_path):
    a = trimesh.creation.box()
    b = trimesh.creation.box()
    b.apply_translation([3.0, 0.0, 0.0])
    p = tmp_path / "scene.glb"
    trimesh.Scene([a, b]).export(str(p))
    mesh = load_mesh(p)
    assert mesh.faces.shape == (24, 3)
    assert _area(mesh) == pytest.approx(12.0)
    assert mesh.vertices[:, 0].max() == pytest.approx(3.5)


def test_extensions_constant():
    assert MESH_EXTENSIONS == (".off", ".obj", ".ply", ".stl", ".glb", ".gltf")
    assert all(e == e.lower() and e.startswith(".") for e in MESH_EXTENSIONS)


def test_read_mesh_arrays_keeps_every_face_in_file_order(tmp_path):
    # face 1 repeats a vertex: load_mesh drops it, read_mesh_arrays keeps it (labels files index it)
    text = "OFF\n4 5 0\n" + TETRA_V + "3 0 1 2\n3 0 0 1\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"
    off = _write(tmp_path, "t.off", text)
    v, f = read_mesh_arrays(off)
    assert v.shape == (4, 3) and f.tolist() == [[0, 1, 2], [0, 0, 1], [0, 1, 3], [0, 2, 3], [1, 2, 3]]
    assert load_mesh(off).faces.shape == (4, 3)
    ply = tmp_path / "t.ply"
    trimesh.Trimesh(v, f, process=False).export(ply)
    np.testing.assert_array_equal(read_mesh_arrays(ply)[1], f)
    with pytest.raises(MeshError, match="file does not exist"):
        read_mesh_arrays(tmp_path / "none.ply")


def _box_export(path, **kw):
    import trimesh

    trimesh.creation.box().export(path, **kw)
    return path


def test_an_ascii_ply_with_fewer_lines_than_its_header_declares_is_truncated(tmp_path):
    full = _box_export(tmp_path / "box.ply", encoding="ascii")
    assert len(load_mesh(full).faces) == 12
    lines = full.read_text().splitlines(keepends=True)
    for keep in (len(lines) - 5, len(lines) - 12):  # some face lines missing; every one missing
        cut = tmp_path / f"cut{keep}.ply"
        cut.write_text("".join(lines[:keep]))
        with pytest.raises(MeshError, match=r"cut\d+\.ply: truncated: the header declares 8 vertices and 12 faces "
                                            rf"\(20 lines\), the file holds {keep - (len(lines) - 20)}$"):
            load_mesh(cut)
    # a face of two corners, which trimesh drops, is not a missing line
    two = tmp_path / "two.ply"
    two.write_text("".join(lines[:-1]) + "2 0 1\n")
    assert len(load_mesh(two).faces) == 11


def test_a_binary_stl_cut_short_is_truncated(tmp_path):
    full = _box_export(tmp_path / "box.stl")
    assert not full.read_bytes().startswith(b"solid") and len(load_mesh(full).faces) == 12
    cut = tmp_path / "cut.stl"
    cut.write_bytes(full.read_bytes()[: 84 + 50 * 7 + 20])
    with pytest.raises(MeshError, match=r"cut\.stl: truncated: the binary header declares 12 triangles \(684 bytes\), "
                                        r"the file has 454 bytes"):
        load_mesh(cut)


def test_a_point_cloud_ply_is_named_as_one(tmp_path):
    path = tmp_path / "cloud.ply"
    rows = "".join(f"{x} {x * 2} {x * 3}\n" for x in range(5))
    path.write_text(f"ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\nproperty float y\n"
                    f"property float z\nend_header\n{rows}")
    with pytest.raises(MeshError, match="no faces: a point cloud, not a triangle mesh .*HDF5"):
        load_mesh(path)
