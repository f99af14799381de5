"""Multi-view rendering of meshes and point clouds with moderngl (paper §3.1).

Rendering set-up, following the paper ("Multi-view image generation"):

* **Normalisation.** The object is translated to its centroid
  (:func:`xmodal.data.geometry.area_weighted_centroid`, the area-weighted mean of the face
  centres) and scaled uniformly so that its
  farthest vertex lies at distance 1: it fills the unit sphere.
* **Cameras.** ``V`` perspective cameras on a sphere of radius ``distance`` around the
  centroid, at (azimuth, polar) angles in degrees (:func:`sample_view_angles`; the paper
  draws azimuth in [10, 340] and polar in [10, 165], the polar angle measured from the up
  axis), all looking at the centroid.  The field of view is the smallest one that shows
  the whole unit sphere, widened by ``margin`` (5 % by default).  The camera's up vector
  is the direction of increasing "latitude" on the sphere (towards the up pole), which is
  well defined at every angle including the poles.
* **Shading.** Phong reflection (ambient + diffuse + specular) evaluated **per vertex** in
  the vertex shader and interpolated across faces (Gouraud), as in the paper ("pixel
  intensities are determined by interpolating the reflected intensities of the polygon
  vertices").  Vertex normals are area-weighted face normals; since ModelNet meshes are
  not consistently wound, lighting is two-sided (a normal facing away from the camera is
  flipped) and per-vertex normals are accumulated with face normals sign-aligned where the
  winding around a vertex is inconsistent.
* **Lights.** Two directional lights of equal strength facing each other with the object
  between them.  The light axis is fixed *relative to each camera* — through the centroid,
  from the upper-left-front of the view to the lower-right-back — so that every view is
  exposed alike (with the paper's random views a world-fixed light would leave some
  views dark, the problem the second light is there to solve).
* **Image.** Black background (0); the object's intensity is at least the ambient term
  (~50/255), so ``image > 0`` is the object mask.  Grayscale ``uint8 (V, S, S)`` by
  default, ``uint8 (V, S, S, 3)`` with ``grayscale=False``.  Row 0 is the top of the image.

Point clouds (sources without meshes) are drawn as shaded round splats
(:meth:`Renderer.render_points`) with normals estimated by PCA over nearest neighbours,
the same cameras and the same two lights.

Everything runs on an offscreen OpenGL 3.3 context, by default on EGL (headless; Mesa's
llvmpipe on machines without a GPU).  One context per :class:`Renderer`, reused for every
object; per object the geometry is uploaded once and all views are drawn into one
reused framebuffer and read straight into the output array.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np

from xmodal.data.geometry import (
    area_weighted_centroid,
    face_areas,
    face_cross,
    from_z_up,
    normalize_unit_sphere,
    up_axis_index,
    vertex_normals_from,
)
from xmodal.data.types import Mesh, as_mesh

__all__ = [
    "sample_view_angles",
    "camera_positions",
    "view_matrices",
    "vertex_normals",
    "estimate_normals",
    "Renderer",
    "LUMA",
    "to_grayscale",
]

logger = logging.getLogger(__name__)

# Phong coefficients: ambient, diffuse, specular, shininess.  ka + kd + ks = 1 keeps the
# brightest highlight at exactly 255 (no saturated areas) and the darkest lit part at
# ~51/255, well above the black background.
_PHONG = (0.2, 0.6, 0.2, 16.0)
# Light axis in camera coordinates (right, up, towards the camera): light 1 shines from
# the upper-left-front, light 2 from the opposite (lower-right-back) side.
_LIGHT_CAM = np.array([-0.45, 0.55, 0.70])
#: Rec. 601 luma weights: grey renders shade an albedo's luminance with them
LUMA = (0.299, 0.587, 0.114)


def to_grayscale(images) -> np.ndarray:
    """RGB images ``uint8 (..., 3)`` -> grey ``uint8 (...)``: their luminance with :data:`LUMA`, the
    weights a grey render shades with, rounded to the nearest level."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim < 1 or a.shape[-1] != 3:
        raise ValueError(f"expected uint8 images with 3 channels last, got {a.dtype} of shape {a.shape}")
    grey = a.astype(np.float32) @ np.asarray(LUMA, dtype=np.float32)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- cameras


def sample_view_angles(n_views: int, *, seed=None, azimuth=(10.0, 340.0), polar=(10.0, 165.0)) -> np.ndarray:
    """Random camera angles, uniform in the given ranges (degrees).

    Args:
        n_views: V.
        seed: anything :func:`numpy.random.default_rng` accepts.
        azimuth: ``(low, high)`` azimuth range around the up axis.
        polar: ``(low, high)`` polar range, angle from the up axis (0 = looking down from the top).

    Returns:
        ``(V, 2)`` float32 ``[azimuth, polar]`` in degrees.
    """
    if n_views < 0:
        raise ValueError(f"n_views must be >= 0, got {n_views}")
    (a0, a1), (p0, p1) = azimuth, polar
    if not (a0 <= a1 and 0 <= p0 <= p1 <= 180):
        raise ValueError(f"bad angle ranges azimuth={azimuth} polar={polar} (need low <= high, polar in [0, 180])")
    rng = np.random.default_rng(seed)
    u = rng.random((int(n_views), 2))
    out = np.empty((int(n_views), 2), dtype=np.float32)
    out[:, 0] = a0 + (a1 - a0) * u[:, 0]
    out[:, 1] = p0 + (p1 - p0) * u[:, 1]
    return out


def _check_angles(angles) -> np.ndarray:
    angles = np.asarray(angles, dtype=np.float64)
    if angles.ndim == 1 and angles.shape == (2,):
        angles = angles[None]
    if angles.ndim != 2 or angles.shape[1] != 2:
        raise ValueError(f"angles must have shape (V, 2) [azimuth, polar] in degrees, got {angles.shape}")
    if not np.all(np.isfinite(angles)):
        raise ValueError("angles contain NaN or infinite values")
    return angles


def _spherical_frame(angles: np.ndarray):
    """Unit camera direction, 'up' and 'right' vectors ``(V, 3)`` in a z-up frame."""
    az, po = np.radians(angles[:, 0]), np.radians(angles[:, 1])
    ca, sa, cp, sp = np.cos(az), np.sin(az), np.cos(po), np.sin(po)
    back = np.stack([sp * ca, sp * sa, cp], axis=1)  # centroid -> camera
    # d(back)/d(-polar): tangent pointing towards the up pole; never degenerate
    up = np.stack([-cp * ca, -cp * sa, sp], axis=1)
    right = np.stack([-sa, ca, np.zeros_like(az)], axis=1)  # = up x back
    return back, up, right


def camera_positions(angles, distance: float = 2.5, up_axis: str = "z") -> np.ndarray:
    """Camera centres ``(V, 3)`` relative to the centroid for ``angles (V, 2)`` degrees."""
    up_axis_index(up_axis)  # raises for anything but "x", "y", "z"
    back, _, _ = _spherical_frame(_check_angles(angles))
    return from_z_up(back * float(distance), up_axis)


def _fov_tan(distance: float, margin: float) -> float:
    """tan(half field of view) that shows the unit sphere from ``distance`` with ``margin``."""
    return margin / math.sqrt(distance * distance - 1.0)


def view_matrices(
    angles, distance: float = 2.5, up_axis: str = "z", *, margin: float = 1.05, flip_y: bool = False
) -> dict:
    """Camera matrices for objects normalised into the unit sphere at the origin.

    Args:
        angles: ``(V, 2)`` ``[azimuth, polar]`` degrees.
        distance: camera distance from the centroid, ``> 1``.
        up_axis: world up axis, ``"x"``, ``"y"`` or ``"z"``.
        margin: field-of-view enlargement around the unit sphere's silhouette.
        flip_y: flip the image vertically (so OpenGL's bottom-up read-back comes out top-down).

    Returns:
        dict of float64 arrays: ``view (V, 4, 4)``, ``proj (4, 4)``, ``mvp (V, 4, 4)``
        (row-major, column vectors: ``clip = mvp @ [x, y, z, 1]``), ``eye (V, 3)`` camera
        centres and ``light (V, 3)`` unit direction towards light 1 (light 2 is its opposite).
    """
    up_axis_index(up_axis)  # raises for anything but "x", "y", "z"
    if not distance > 1.0:
        raise ValueError(f"distance must be > 1 (the object fills the unit sphere), got {distance}")
    angles = _check_angles(angles)
    back, up, right = (from_z_up(a, up_axis) for a in _spherical_frame(angles))
    eye = back * distance
    v = len(angles)
    view = np.zeros((v, 4, 4))
    view[:, 0, :3], view[:, 1, :3], view[:, 2, :3] = right, up, back
    view[:, 0, 3] = -(right * eye).sum(1)
    view[:, 1, 3] = -(up * eye).sum(1)
    view[:, 2, 3] = -(back * eye).sum(1)
    view[:, 3, 3] = 1.0
    t = _fov_tan(distance, margin)
    near, far = max(distance - 1.0 - 0.05, 1e-3), distance + 1.05
    proj = np.zeros((4, 4))
    proj[0, 0] = 1.0 / t
    proj[1, 1] = (-1.0 if flip_y else 1.0) / t
    proj[2, 2] = -(far + near) / (far - near)
    proj[2, 3] = -2.0 * far * near / (far - near)
    proj[3, 2] = -1.0
    light = _LIGHT_CAM / np.linalg.norm(_LIGHT_CAM)
    light = light[0] * right + light[1] * up + light[2] * back
    return {"view": view, "proj": proj, "mvp": proj @ view, "eye": eye, "light": light}


def vertex_normals(mesh: Mesh) -> np.ndarray:
    """Area-weighted unit vertex normals ``(V, 3)`` of ``mesh`` (a :class:`~xmodal.data.types.Mesh`
    or a ``(vertices, faces)`` pair), robust to inconsistent winding: see
    :func:`xmodal.data.geometry.vertex_normals_from`."""
    mesh = as_mesh(mesh)
    cross = face_cross(mesh.vertices, mesh.faces)
    areas = face_areas(mesh.vertices, mesh.faces, cross=cross)
    return vertex_normals_from(mesh.faces, cross, areas, len(mesh.vertices))[0]


def estimate_normals(points, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """PCA normals of a point cloud and the nearest-neighbour spacing.

    Args:
        points: ``(N, 3)`` coordinates.
        k: neighbourhood size (including the point itself).

    Returns:
        ``normals (N, 3)`` unit vectors (arbitrary sign; the direction of least
        variance of each point's ``k`` nearest neighbours) and ``spacing (N,)`` the
        distance of each point to its nearest other point.
    """
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if n < 2:
        return np.tile([0.0, 0.0, 1.0], (n, 1)), np.zeros(n)
    k = int(min(max(k, 3), n))
    dist, idx = cKDTree(points).query(points, k=k)
    nb = points[idx]
    nb -= nb.mean(axis=1, keepdims=True)
    cov = np.einsum("nki,nkj->nij", nb, nb)
    _, vec = np.linalg.eigh(cov)
    return vec[:, :, 0], dist[:, 1]


# --------------------------------------------------------------------------- shaders

_MESH_VS = """
#version 330
uniform mat4 u_mvp;
uniform vec3 u_eye;
uniform vec3 u_light;
uniform vec4 u_phong;      // ka, kd, ks, shininess
uniform vec3 u_color;
uniform float u_size;      // point splats: pixel diameter at unit view depth
in vec3 in_pos;
in vec3 in_normal;
out vec3 v_color;

void main() {
    gl_Position = u_mvp * vec4(in_pos, 1.0);
    gl_PointSize = u_size / gl_Position.w;
    vec3 n = normalize(in_normal);
    vec3 v = normalize(u_eye - in_pos);
    if (dot(n, v) < 0.0) n = -n;                 // two-sided lighting
    float diffuse = 0.0;
    float specular = 0.0;
    for (int i = 0; i < 2; ++i) {                // two lights facing each other
        vec3 l = (i == 0) ? u_light : -u_light;
        float nl = dot(n, l);
        if (nl > 0.0) {
            diffuse += nl;
            specular += pow(max(dot(reflect(-l, n), v), 0.0), u_phong.w);
        }
    }
    v_color = u_color * (u_phong.x + u_phong.y * diffuse + u_phong.z * specular);
}
"""

_MESH_FS = """
#version 330
uniform int u_gray;
uniform int u_round;
in vec3 v_color;
out vec4 f_color;

void main() {
    if (u_round == 1) {                          // round point sprites
        vec2 c = 2.0 * gl_PointCoord - 1.0;
        if (dot(c, c) > 1.0) discard;
    }
    if (u_gray == 1) {
        f_color = vec4(vec3(dot(v_color, vec3(%f, %f, %f))), 1.0);
    } else {
        f_color = vec4(v_color, 1.0);
    }
}
""" % LUMA


# --------------------------------------------------------------------------- renderer


class Renderer:
    """Offscreen multi-view renderer (one OpenGL context, reused across objects).

    Args:
        image_size: S, output images are ``S x S``.
        grayscale: ``uint8 (V, S, S)`` images when True, ``uint8 (V, S, S, 3)`` otherwise.
        up_axis: the objects' up axis (``"z"`` for ModelNet meshes, ``"y"`` for the
            ModelNet40 HDF5 points); the polar angle is measured from it.
        distance: camera distance from the centroid in units of the object's radius (> 1).
        backend: moderngl context backend; None tries ``"egl"`` (headless) and then
            moderngl's default.
        samples: multisample anti-aliasing samples (0 = off, the fast default).
        margin: field-of-view enlargement around the unit sphere (1.05 = 5 %).
        color: RGB albedo of the object in [0, 1] (grey images use its luminance).

    Use as a context manager or call :meth:`close`.

    Example::

        with Renderer(224) as r:
            images = r.render_mesh(mesh, sample_view_angles(12, seed=0))  # (12, 224, 224) uint8
    """

    def __init__(
        self,
        image_size: int = 224,
        *,
        grayscale: bool = True,
        up_axis: str = "z",
        distance: float = 2.5,
        backend: Optional[str] = None,
        samples: int = 0,
        margin: float = 1.05,
        color=(1.0, 1.0, 1.0),
    ):
        from xmodal.utils.optional import require

        up_axis_index(up_axis)  # raises for anything but "x", "y", "z"
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not distance > 1.0:
            raise ValueError(f"distance must be > 1 (the object fills the unit sphere), got {distance}")
        self.image_size = int(image_size)
        self.grayscale = bool(grayscale)
        self.up_axis = up_axis
        self.distance = float(distance)
        self.samples = int(samples)
        self.margin = float(margin)
        self.color = tuple(float(c) for c in color)

        self._mgl = mgl = require("moderngl", "rendering views")
        self.ctx = self._create_context(mgl, backend)
        s = self.image_size
        try:
            self._prog = self.ctx.program(vertex_shader=_MESH_VS, fragment_shader=_MESH_FS)
            self._u = {name: self._prog[name] for name in ("u_mvp", "u_eye", "u_light")}
            self._prog["u_phong"].value = _PHONG
            self._prog["u_color"].value = self.color
            self._prog["u_gray"].value = int(self.grayscale)
            self._components = 1 if self.grayscale else 3
            ncomp = 1 if self.grayscale else 4
            self._color_rb = self.ctx.renderbuffer((s, s), components=ncomp)
            self._depth_rb = self.ctx.depth_renderbuffer((s, s))
            self._fbo = self.ctx.framebuffer(color_attachments=[self._color_rb], depth_attachment=self._depth_rb)
            self._ms_fbo = None
            if self.samples > 0:
                self._ms_color = self.ctx.renderbuffer((s, s), components=ncomp, samples=self.samples)
                self._ms_depth = self.ctx.depth_renderbuffer((s, s), samples=self.samples)
                self._ms_fbo = self.ctx.framebuffer(color_attachments=[self._ms_color], depth_attachment=self._ms_depth)
        except Exception:
            self.close()
            raise

    @staticmethod
    def _create_context(mgl, backend):
        if backend is not None:
            return mgl.create_standalone_context(require=330, backend=backend)
        try:
            return mgl.create_standalone_context(require=330, backend="egl")
        except Exception as exc:  # no EGL: fall back to the platform default (GLX, WGL, CGL)
            logger.debug("EGL context failed (%s); trying moderngl's default backend", exc)
            return mgl.create_standalone_context(require=330)

    # ------------------------------------------------------------------ public API

    def render_mesh(self, mesh, angles, *, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Render a mesh from the given camera angles.

        Args:
            mesh: a :class:`~xmodal.data.types.Mesh` (or a ``(vertices, faces)`` pair, or
                anything with ``vertices`` and ``faces``, validated into one), in any
                position and scale.
            angles: ``(V, 2)`` ``[azimuth, polar]`` degrees, e.g. from :func:`sample_view_angles`.
            out: optional preallocated ``uint8`` output of the returned shape.

        Returns:
            ``uint8 (V, S, S)`` (grayscale) or ``(V, S, S, 3)``.

        Raises:
            ValueError: bad angles. MeshError (a ValueError): arrays that are not a valid mesh.
        """
        mesh = as_mesh(mesh)
        vertices, faces = mesh.vertices, mesh.faces
        fn = face_cross(vertices, faces)
        areas = face_areas(vertices, faces, cross=fn)
        center = area_weighted_centroid(vertices, faces, areas=areas)
        normals, weight = vertex_normals_from(faces, fn, areas, len(vertices))
        data = np.empty((len(vertices), 6), dtype=np.float32)
        v = vertices - center
        r2 = np.einsum("ij,ij->i", v, v)
        # farthest vertex of the surface (> 0: a Mesh has a face of non-zero area); vertices
        # on no face draw nothing
        radius = float(np.sqrt(r2[weight > 0].max()))
        v /= radius
        data[:, :3], data[:, 3:] = v, normals
        index = faces.astype(np.uint32)
        return self._draw(data, index, angles, out=out, point_size=0.0)

    def render_points(
        self, points, angles, *, normals=None, point_size: Optional[float] = None, out: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """Render a point cloud as shaded round splats (for sources without meshes).

        The points are centred on their mean and scaled into the unit sphere like
        meshes; normals (when not given) are estimated by PCA over 16 nearest neighbours.

        Args:
            points: ``(N, 3)`` coordinates.
            angles: ``(V, 2)`` ``[azimuth, polar]`` degrees.
            normals: optional ``(N, 3)`` normals (the sign does not matter).
            point_size: splat diameter in the normalised frame (object radius = 1); None
                chooses it from the point spacing so that the surface looks closed.
            out: optional preallocated ``uint8`` output.

        Returns:
            ``uint8 (V, S, S)`` (grayscale) or ``(V, S, S, 3)``.
        """
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
            raise ValueError(f"points must have shape (N, 3) with N >= 1, got {points.shape}")
        p, _, _ = normalize_unit_sphere(points, strict=False)  # a single location stays a dot
        spacing = None
        if normals is None or point_size is None:
            est, spacing = estimate_normals(p)
            if normals is None:
                normals = est
        normals = np.asarray(normals, dtype=np.float64)
        if normals.shape != p.shape:
            raise ValueError(f"normals must have shape {p.shape}, got {normals.shape}")
        if point_size is None:
            # ~2.2x the median nearest-neighbour spacing closes the gaps between FPS samples
            point_size = 2.2 * float(np.median(spacing)) if len(p) > 1 else 0.05
        data = np.empty((len(p), 6), dtype=np.float32)
        data[:, :3], data[:, 3:] = p, normals
        return self._draw(data, None, angles, out=out, point_size=float(point_size))

    @property
    def gl_renderer(self) -> str:
        """The OpenGL renderer's name (``GL_RENDERER``: "llvmpipe ..." for Mesa's software
        renderer, the GPU's name otherwise), asked with this renderer's context made current."""
        if self.ctx is None:
            raise RuntimeError("Renderer is closed")
        with self.ctx:
            return str(self.ctx.info.get("GL_RENDERER", "?"))

    def close(self) -> None:
        """Release the GL context and its objects (idempotent)."""
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            self.ctx = None
            ctx.release()

    def __enter__(self) -> "Renderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; explicit close() is preferred
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ internals

    def _output(self, n_views: int, out):
        s = self.image_size
        shape = (n_views, s, s) if self.grayscale else (n_views, s, s, 3)
        if out is None:
            return np.empty(shape, dtype=np.uint8)
        if out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous uint8 array of shape {shape}, got {out.dtype} {out.shape}")
        return out

    def _draw(self, data: np.ndarray, index: Optional[np.ndarray], angles, *, out, point_size: float) -> np.ndarray:
        if self.ctx is None:
            raise RuntimeError("Renderer is closed")
        # Make this renderer's context current for the draw: GL state is per thread, and creating
        # (or drawing with) another Renderer makes its context current, so without this a second
        # Renderer in the process would receive this one's draws.
        with self.ctx:
            return self._draw_current(data, index, angles, out=out, point_size=point_size)

    def _draw_current(self, data: np.ndarray, index: Optional[np.ndarray], angles, *, out,
                      point_size: float) -> np.ndarray:
        mgl = self._mgl
        angles = _check_angles(angles)
        n_views = len(angles)
        images = self._output(n_views, out)
        if n_views == 0:
            return images
        cams = view_matrices(angles, self.distance, self.up_axis, margin=self.margin, flip_y=True)
        # per-view uniforms prepared in one batch; GL wants column-major matrices
        mvp = np.ascontiguousarray(cams["mvp"].transpose(0, 2, 1), dtype=np.float32)
        eye = np.ascontiguousarray(cams["eye"], dtype=np.float32)
        light = np.ascontiguousarray(cams["light"], dtype=np.float32)

        ctx, s = self.ctx, self.image_size
        vbo = ibo = vao = None
        try:
            vbo = ctx.buffer(data)
            ibo = ctx.buffer(index) if index is not None else None
            vao = ctx.vertex_array(
                self._prog, [(vbo, "3f 3f", "in_pos", "in_normal")], index_buffer=ibo, index_element_size=4
            )
            points = index is None
            self._prog["u_round"].value = int(points)
            # pixel diameter of a splat of world size `point_size` at view depth w
            self._prog["u_size"].value = point_size * (s / 2.0) / _fov_tan(self.distance, self.margin)
            ctx.enable(mgl.DEPTH_TEST | (mgl.PROGRAM_POINT_SIZE if points else 0))
            ctx.disable(mgl.CULL_FACE)
            draw_fbo = self._ms_fbo if self._ms_fbo is not None else self._fbo
            draw_fbo.use()
            mode = mgl.POINTS if points else mgl.TRIANGLES
            u_mvp, u_eye, u_light = self._u["u_mvp"], self._u["u_eye"], self._u["u_light"]
            stride = images[0].nbytes
            for i in range(n_views):
                u_mvp.write(mvp[i])
                u_eye.write(eye[i])
                u_light.write(light[i])
                draw_fbo.clear(0.0, 0.0, 0.0, 1.0, depth=1.0)
                vao.render(mode)
                if draw_fbo is not self._fbo:
                    ctx.copy_framebuffer(self._fbo, draw_fbo)
                self._fbo.read_into(images, components=self._components, alignment=1, write_offset=i * stride)
        finally:
            for obj in (vao, ibo, vbo):  # GL objects of this object only; the context stays
                if obj is not None:
                    obj.release()
            ctx.disable(mgl.PROGRAM_POINT_SIZE)
        return images
