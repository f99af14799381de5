"""Tests of xmodal.data.render: cameras, centroid, mesh and point-splat rendering (64 px)."""

from __future__ import annotations

import numpy as np
import pytest

from xmodal.data.geometry import area_weighted_centroid
from xmodal.data.render import (
    Renderer,
    camera_positions,
    sample_view_angles,
    vertex_normals,
    view_matrices,
)
from xmodal.data.types import Mesh

S = 64


def _icosphere(subdiv: int = 2) -> Mesh:
    import trimesh
    m = trimesh.creation.icosphere(subdivisions=subdiv)
    return Mesh(np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64))


def _box(size=(1.0, 2.0, 3.0)) -> Mesh:
    import trimesh
    m = trimesh.creation.box(extents=size)
    return Mesh(np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64))


def _cone() -> Mesh:
    """Cone with its apex up (+z): base radius 1 at z=0, apex at z=2."""
    import trimesh
    m = trimesh.creation.cone(radius=1.0, height=2.0, sections=32)
    return Mesh(np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64))


def _make_renderer(**kw) -> Renderer:
    try:
        return Renderer(S, **kw)
    except Exception as exc:  # no OpenGL (EGL) context on this machine
        pytest.skip(f"no offscreen OpenGL context: {exc}")


@pytest.fixture(scope="module")
def renderer():
    r = _make_renderer()
    yield r
    r.close()


ANGLES = sample_view_angles(4, seed=0)


def _mask(img):
    return img > 0


def _fg_centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()])


# ----------------------------------------------------------------- cameras & centroid


def test_view_angles_ranges_dtype_and_seed():
    a = sample_view_angles(500, seed=1)
    assert a.shape == (500, 2) and a.dtype == np.float32
    assert (a[:, 0] >= 10).all() and (a[:, 0] <= 340).all()
    assert (a[:, 1] >= 10).all() and (a[:, 1] <= 165).all()
    # roughly uniform over the ranges
    assert a[:, 0].min() < 30 and a[:, 0].max() > 320 and a[:, 1].min() < 25 and a[:, 1].max() > 150
    np.testing.assert_array_equal(a, sample_view_angles(500, seed=1))
    assert not np.array_equal(a, sample_view_angles(500, seed=2))
    b = sample_view_angles(3, seed=0, azimuth=(0, 0), polar=(90, 90))
    np.testing.assert_array_equal(b, [[0, 90]] * 3)


def test_camera_positions_on_sphere_and_up_axis():
    a = np.array([[0.0, 90.0], [90.0, 90.0], [37.0, 0.0], [200.0, 180.0]])
    pos = camera_positions(a, distance=2.5, up_axis="z")
    np.testing.assert_allclose(np.linalg.norm(pos, axis=1), 2.5)
    np.testing.assert_allclose(pos[0], [2.5, 0, 0], atol=1e-12)
    np.testing.assert_allclose(pos[1], [0, 2.5, 0], atol=1e-12)
    np.testing.assert_allclose(pos[2], [0, 0, 2.5], atol=1e-12)  # polar 0 = on the up axis
    np.testing.assert_allclose(pos[3], [0, 0, -2.5], atol=1e-12)
    np.testing.assert_allclose(camera_positions(a[2:3], up_axis="y")[0], [0, 2.5, 0], atol=1e-12)


def test_view_matrices_look_at_centroid_and_fit_unit_sphere():
    cams = view_matrices(np.concatenate([sample_view_angles(20, seed=0), [[45.0, 0.0], [45.0, 180.0]]]), 2.5)
    assert np.isfinite(cams["mvp"]).all()
    # the centroid projects to the image centre
    clip = cams["mvp"] @ np.array([0.0, 0, 0, 1])
    np.testing.assert_allclose(clip[:, :2] / clip[:, 3:4], 0, atol=1e-9)
    # points of the unit sphere project inside the image; view rotations are orthonormal
    sphere = np.random.default_rng(0).normal(size=(2000, 3))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    hom = np.concatenate([sphere, np.ones((2000, 1))], 1)
    ndc = np.einsum("vij,nj->vni", cams["mvp"], hom)
    ndc = ndc[..., :3] / ndc[..., 3:]
    assert np.abs(ndc).max() < 1.0 and np.abs(ndc[..., :2]).max() > 0.9  # fits, with a small margin
    rot = cams["view"][:, :3, :3]
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0)
    np.testing.assert_allclose(np.linalg.norm(cams["light"], axis=1), 1.0)
    with pytest.raises(ValueError, match="distance"):
        view_matrices([[0.0, 90.0]], 1.0)


def test_mesh_centroid_hand_computation():
    # triangle A: area 0.5, centre (1/3, 1/3, 0); triangle B: area 2, centre (10 + 2/3, 2/3, 5)
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [10, 0, 5], [12, 0, 5], [10, 2, 5]], float)
    f = np.array([[0, 1, 2], [3, 4, 5]])
    expected = (0.5 * np.array([1 / 3, 1 / 3, 0]) + 2.0 * np.array([10 + 2 / 3, 2 / 3, 5])) / 2.5
    np.testing.assert_allclose(area_weighted_centroid(v, f), expected, atol=1e-12)
    # differs from the plain vertex mean: the area weighting matters
    assert not np.allclose(area_weighted_centroid(v, f), v.mean(0))
    with pytest.raises(ValueError, match="zero"):
        area_weighted_centroid(np.zeros((3, 3)), np.array([[0, 1, 2]]))


def test_vertex_normals_survive_inconsistent_winding():
    sphere = _icosphere(2)
    outward = sphere.vertices / np.linalg.norm(sphere.vertices, axis=1, keepdims=True)
    n0 = vertex_normals(sphere)
    np.testing.assert_allclose(np.abs((n0 * outward).sum(1)), 1.0, atol=0.01)
    faces = sphere.faces.copy()
    flip = np.random.default_rng(0).random(len(faces)) < 0.5
    faces[flip] = faces[flip][:, ::-1]
    n1 = vertex_normals((sphere.vertices, faces))
    np.testing.assert_allclose(np.linalg.norm(n1, axis=1), 1.0)
    assert np.abs((n1 * outward).sum(1)).min() > 0.99  # right axis, sign irrelevant (two-sided)


# ----------------------------------------------------------------- mesh rendering


def test_render_is_deterministic(renderer):
    mesh = _box()
    a = renderer.render_mesh(mesh, sample_view_angles(3, seed=5))
    b = renderer.render_mesh(mesh, sample_view_angles(3, seed=5))
    assert a.shape == (3, S, S) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    other = _make_renderer()
    try:
        np.testing.assert_array_equal(a, other.render_mesh(mesh, sample_view_angles(3, seed=5)))
    finally:
        other.close()


@pytest.mark.parametrize("make", [_box, _icosphere])
def test_render_visible_not_blank_not_saturated(renderer, make):
    images = renderer.render_mesh(make(), ANGLES)
    for img in images:
        fg = _mask(img)
        assert 0.05 < fg.mean() < 0.9
        assert img[fg].std() > 5  # shading varies over the object
        assert (img == 255).mean() < 0.01
        # background is black on the border
        assert not fg[0].any() and not fg[-1].any() and not fg[:, 0].any() and not fg[:, -1].any()


def test_render_centred_and_invariant_to_translation_and_scale(renderer):
    box = _box()
    a = renderer.render_mesh(box, ANGLES)
    moved = Mesh(box.vertices * 37.0 + np.array([100.0, -20.0, 3.0]), box.faces)
    b = renderer.render_mesh(moved, ANGLES)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert (diff > 2).mean() < 0.01
    for img in a:
        # the box centre is the centroid, which projects to the image centre (perspective
        # shifts the silhouette's own centroid a little towards the nearer faces)
        np.testing.assert_allclose(_fg_centroid(_mask(img)), [(S - 1) / 2] * 2, atol=6.0)
    # a sphere's silhouette is a disc centred on the projected centroid, filling the view
    sphere = _icosphere(3)
    shifted = Mesh(sphere.vertices * 0.01 + np.array([3.0, 4.0, -5.0]), sphere.faces)
    for img in renderer.render_mesh(shifted, ANGLES):
        mask = _mask(img)
        np.testing.assert_allclose(_fg_centroid(mask), [(S - 1) / 2] * 2, atol=0.5)
        rows = np.nonzero(mask.any(1))[0]
        assert rows[0] <= 3 and rows[-1] >= S - 4  # unit sphere fits with a small margin
        assert mask[0].sum() == 0 and mask[-1].sum() == 0


def test_render_up_is_up_and_not_mirrored(renderer):
    cone = _cone()
    side = np.array([[0.0, 90.0]])  # camera on +x looking at the centroid, z up
    img = renderer.render_mesh(cone, side)[0]
    rows = np.nonzero(_mask(img).any(1))[0]
    top, bottom = img[rows[0] + 2], img[rows[-1] - 2]
    assert (top > 0).sum() < (bottom > 0).sum()  # apex at the top of the image
    # a small cube at +y: seen from azimuth 0 (camera on +x, z up), +y is image-right
    v = np.concatenate([cone.vertices, _box((0.3, 0.3, 0.3)).vertices + [0, 1.5, 0.3]])
    f = np.concatenate([cone.faces, _box().faces + len(cone.vertices)])
    img = renderer.render_mesh(Mesh(v, f), side)[0]
    cols = np.nonzero(_mask(img).any(0))[0]
    cone_only = renderer.render_mesh(cone, side)[0]
    extra = _mask(img) & ~_mask(cone_only)
    assert extra.sum() > 0 and _fg_centroid(extra)[1] > cols.mean()


def test_render_up_axis_y_matches_z(renderer):
    mesh = _cone()
    y_up = Mesh(mesh.vertices[:, [1, 2, 0]], mesh.faces)  # same object stored y-up
    other = _make_renderer(up_axis="y")
    try:
        a = renderer.render_mesh(mesh, ANGLES)
        b = other.render_mesh(y_up, ANGLES)
    finally:
        other.close()
    assert (np.abs(a.astype(int) - b.astype(int)) > 2).mean() < 0.01


def test_render_poles_and_inconsistent_winding(renderer):
    sphere = _icosphere(3)
    poles = np.array([[30.0, 0.0], [30.0, 180.0]])
    img = renderer.render_mesh(sphere, poles)
    assert all(0.2 < _mask(i).mean() < 0.9 for i in img)
    faces = sphere.faces.copy()
    flip = np.random.default_rng(1).random(len(faces)) < 0.5
    faces[flip] = faces[flip][:, ::-1]
    a = renderer.render_mesh(sphere, ANGLES).astype(int)
    b = renderer.render_mesh(Mesh(sphere.vertices, faces), ANGLES).astype(int)
    assert np.abs(a - b).mean() < 1.0


def test_render_rgb_and_multisampling():
    mesh = _box()
    rgb = _make_renderer(grayscale=False, samples=4)
    try:
        img = rgb.render_mesh(mesh, ANGLES[:2])
    finally:
        rgb.close()
    assert img.shape == (2, S, S, 3) and img.dtype == np.uint8
    assert 0.05 < (img.max(-1) > 0).mean() < 0.9
    np.testing.assert_array_equal(img[..., 0], img[..., 2])  # white material: grey in RGB


def test_two_renderers_in_one_process_each_draw_their_own_images(renderer):
    """Creating a second Renderer makes its GL context current; the first must still draw into
    its own (the second's grey, single-channel frame buffer once received its draws)."""
    mesh = _box()
    alone = renderer.render_mesh(mesh, ANGLES)
    rgb = _make_renderer(grayscale=False, color=(0.9, 0.35, 0.1))
    try:
        first = rgb.render_mesh(mesh, ANGLES)
        np.testing.assert_array_equal(renderer.render_mesh(mesh, ANGLES), alone)
        np.testing.assert_array_equal(rgb.render_mesh(mesh, ANGLES), first)
        assert (first[..., 1] > 0).any() and (first[..., 0] > first[..., 1]).any()
        assert renderer.gl_renderer == rgb.gl_renderer and renderer.gl_renderer not in ("", "?")
    finally:
        rgb.close()
    np.testing.assert_array_equal(renderer.render_mesh(mesh, ANGLES), alone)


def test_luminance_of_a_colour_render_is_the_grey_render():
    """What the feature API does to colour images for an encoder trained on grey renders
    (:func:`to_grayscale`) gives the grey render of the same coloured object, to rounding."""
    from xmodal.data.render import to_grayscale

    mesh, color = _box(), (0.9, 0.35, 0.1)
    rgb, grey = _make_renderer(grayscale=False, color=color), _make_renderer(color=color)
    try:
        a, b = rgb.render_mesh(mesh, ANGLES), grey.render_mesh(mesh, ANGLES)
    finally:
        rgb.close()
        grey.close()
    assert np.ptp(a[..., 0].astype(int) - a[..., 2]) > 0  # coloured
    diff = np.abs(to_grayscale(a).astype(int) - b)
    assert (b > 0).mean() > 0.05 and diff.max() <= 1


def test_render_rejects_bad_input(renderer):
    with pytest.raises(ValueError, match="zero"):
        renderer.render_mesh(Mesh(np.zeros((3, 3)), np.array([[0, 1, 2]])), ANGLES)
    with pytest.raises(ValueError, match="out of range"):
        renderer.render_mesh(Mesh(np.eye(3), np.array([[0, 1, 5]])), ANGLES)
    with pytest.raises(ValueError, match=r"\(V, 2\)"):
        renderer.render_mesh(_box(), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="up_axis"):
        Renderer(S, up_axis="w")


def test_render_into_preallocated_output(renderer):
    out = np.full((len(ANGLES), S, S), 7, dtype=np.uint8)
    res = renderer.render_mesh(_box(), ANGLES, out=out)
    assert res is out
    np.testing.assert_array_equal(out, renderer.render_mesh(_box(), ANGLES))


# ----------------------------------------------------------------- point splats


def test_render_points_silhouette_matches_mesh(renderer):
    from xmodal.data.sampling import sample_point_cloud

    for mesh in (_box(), _cone()):
        pc = sample_point_cloud(mesh, 1024, seed=0)
        pts = renderer.render_points(pc.points * 3.0 + 5.0, ANGLES)  # any position / scale
        ref = renderer.render_mesh(mesh, ANGLES)
        assert pts.shape == (len(ANGLES), S, S) and pts.dtype == np.uint8
        for p, m in zip(pts, ref):
            mp, mm = _mask(p), _mask(m)
            assert 0.05 < mp.mean() < 0.9
            assert p[mp].std() > 3
            iou = (mp & mm).sum() / (mp | mm).sum()
            assert iou > 0.5


def test_render_points_given_normals_and_size(renderer):
    sphere = _icosphere(3)
    normals = sphere.vertices / np.linalg.norm(sphere.vertices, axis=1, keepdims=True)
    small = renderer.render_points(sphere.vertices, ANGLES[:1], normals=normals, point_size=0.02)
    large = renderer.render_points(sphere.vertices, ANGLES[:1], normals=normals, point_size=0.2)
    assert 0 < _mask(small).sum() < _mask(large).sum()
    with pytest.raises(ValueError, match="normals"):
        renderer.render_points(sphere.vertices, ANGLES, normals=normals[:-1])
