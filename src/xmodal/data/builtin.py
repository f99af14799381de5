"""Procedural, part-labelled shape families: the ``builtin:shapes`` source.

Every class is a *family* of meshes assembled from simple parts (boxes,
cylinders, frusta, ellipsoids, torus arcs) whose sizes, counts and styles are
drawn at random: a chair has a seat, a back (panel or slats), four legs or a
swivel pedestal, and sometimes armrests; a table has a rectangular or round top
on four legs, three legs, a pedestal or trestles; and so on. Several classes
share part styles on purpose (stools, chairs and tables share seats/tops and
legs; sofas, beds and benches share boxy cushions) so the classes are not
trivially separable.

Every face carries a *global* part id (an index into :func:`part_names`, e.g.
``"chair/leg"``), so the objects can serve part segmentation as well as
classification. Objects are axis-aligned like ModelNet: ``z`` is up, and long
objects (beds, sofas, cars, airplanes, tables) have their length along ``x``.

After assembly each object gets a random per-axis stretch and a random global
size that does not depend on its class, so the bounding box alone is a poor
cue for the class: a mug can be as large as a bed, and a stool as slender as a
lamp. The geometry inside the box (where the surface is) carries the class.

Generation is pure numpy on cached unit primitives from :mod:`trimesh.creation`
and is deterministic for a given ``(class, seed)``.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from typing import Callable, Optional

import numpy as np

from xmodal.data.geometry import face_centers
from xmodal.data.types import Item, Mesh, MeshError, Source
from xmodal.errors import DataError

__all__ = [
    "CLASSES",
    "PARTS",
    "OPTIONAL_PARTS",
    "part_names",
    "part_ids",
    "make_shape",
    "BuiltinSource",
]

#: class name -> part names (local). Global ids follow ``CLASSES`` order, then this order.
PARTS: dict[str, list[str]] = {
    "airplane": ["fuselage", "wing", "tail", "engine"],
    "bed": ["frame", "mattress", "headboard", "leg", "pillow"],
    "bench": ["seat", "leg", "back"],
    "bookshelf": ["side", "shelf", "back"],
    "bottle": ["body", "neck", "cap"],
    "car": ["body", "cabin", "wheel"],
    "chair": ["seat", "back", "leg", "arm"],
    "lamp": ["base", "stem", "shade"],
    "monitor": ["screen", "stand", "base"],
    "mug": ["body", "handle"],
    "sofa": ["seat", "back", "arm", "leg"],
    "stool": ["seat", "leg", "rung"],
    "table": ["top", "leg"],
    "vase": ["body", "neck", "base"],
}

#: parts that some objects of a class do not have (every other part is always present)
OPTIONAL_PARTS: dict[str, frozenset[str]] = {
    "airplane": frozenset({"engine"}),
    "bed": frozenset({"pillow"}),
    "bench": frozenset({"back"}),
    "bookshelf": frozenset({"back"}),
    "chair": frozenset({"arm"}),
    "sofa": frozenset({"arm", "leg"}),
    "stool": frozenset({"rung"}),
    "vase": frozenset({"base"}),
}

#: class names, sorted
CLASSES: list[str] = sorted(PARTS)

_MIN_FACES = 512  # subdivide until at least this many faces
_MAX_FACES = 10_000
_AXIS_JITTER = 0.12  # std of the log per-axis stretch
_SIZE_RANGE = (0.5, 2.0)  # bounding-box diagonal, log-uniform, independent of the class


def part_names() -> list[str]:
    """Global part names ``"<class>/<part>"``; the index is the global part id."""
    return [f"{c}/{p}" for c in CLASSES for p in PARTS[c]]


@lru_cache(maxsize=None)
def _part_offsets() -> dict[str, int]:
    out, k = {}, 0
    for c in CLASSES:
        out[c] = k
        k += len(PARTS[c])
    return out


def _check_class(cls: str) -> None:
    if cls not in PARTS:
        raise ValueError(f"unknown built-in shape class {cls!r}; expected one of {CLASSES}")


def part_ids(cls: str) -> list[int]:
    """Global part ids of the parts of class ``cls`` (in ``PARTS[cls]`` order)."""
    _check_class(cls)
    o = _part_offsets()[cls]
    return list(range(o, o + len(PARTS[cls])))


# --------------------------------------------------------------------------- primitives
# Unit primitives are built once by trimesh and cached as plain arrays; placing a part
# is then a small affine map in numpy (much faster than building Trimesh objects).


@lru_cache(maxsize=None)
def _unit_box(subdivisions: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Cube [-0.5, 0.5]^3, each face subdivided so large flat parts are not two slivers."""
    import trimesh

    b = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    v, f = np.asarray(b.vertices, float), np.asarray(b.faces, np.int64)
    for _ in range(subdivisions):
        v, f = trimesh.remesh.subdivide(v, f)
    return _frozen(v), _frozen(np.asarray(f, np.int64))


@lru_cache(maxsize=None)
def _unit_cylinder(sections: int) -> tuple[np.ndarray, np.ndarray]:
    """Cylinder of radius 1 along z, z in [-0.5, 0.5]."""
    import trimesh

    c = trimesh.creation.cylinder(radius=1.0, height=1.0, sections=sections)
    return _frozen(np.asarray(c.vertices, float)), _frozen(np.asarray(c.faces, np.int64))


@lru_cache(maxsize=None)
def _unit_sphere(subdivisions: int = 2) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    return _frozen(np.asarray(s.vertices, float)), _frozen(np.asarray(s.faces, np.int64))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _rot_x(deg: float) -> np.ndarray:
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], float)


def _align_z(direction: np.ndarray) -> np.ndarray:
    """Rotation (3, 3) taking +z onto the unit vector of ``direction``."""
    d = np.asarray(direction, float)
    d = d / np.linalg.norm(d)
    z = np.array([0.0, 0.0, 1.0])
    c = float(z @ d)
    if c > 1 - 1e-12:
        return np.eye(3)
    if c < -1 + 1e-12:
        return np.diag([1.0, -1.0, -1.0])
    axis = np.cross(z, d)
    s = np.linalg.norm(axis)
    k = axis / s
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    # Rodrigues' formula
    return np.eye(3) + s * K + (1 - c) * (K @ K)


class _Builder:
    """Accumulates labelled parts of one object."""

    def __init__(self, cls: str):
        self.cls = cls
        self._ids = {p: i for p, i in zip(PARTS[cls], part_ids(cls))}
        self._v: list[np.ndarray] = []
        self._f: list[np.ndarray] = []
        self._l: list[np.ndarray] = []
        self._n = 0

    def add(self, part: str, vertices: np.ndarray, faces: np.ndarray) -> None:
        self._v.append(np.asarray(vertices, float))
        self._f.append(np.asarray(faces, np.int64) + self._n)
        self._l.append(np.full(len(faces), self._ids[part], np.int64))
        self._n += len(vertices)

    def place(self, part: str, unit: tuple[np.ndarray, np.ndarray], linear: np.ndarray, center) -> None:
        """Add ``unit`` mapped by ``x -> linear @ x + center``; keeps outward winding."""
        v, f = unit
        linear = np.asarray(linear, float)
        if np.linalg.det(linear) < 0:
            f = f[:, ::-1]
        self.add(part, v @ linear.T + np.asarray(center, float), f)

    # -- shapes
    def box(self, part, extents, center, rot=None, taper=(1.0, 1.0), shear=None, subdiv=1) -> None:
        """Box of ``extents`` (x, y, z) centred at ``center``.

        ``taper`` scales the top face in x and y (linearly in z, so faces stay planar);
        ``shear`` (3, 3) is an extra linear map applied after scaling (e.g. swept wings).
        """
        v, f = _unit_box(subdiv)
        if taper != (1.0, 1.0):
            t = v[:, 2:3] + 0.5  # 0 at the bottom, 1 at the top
            v = v * np.hstack([1 + (taper[0] - 1) * t, 1 + (taper[1] - 1) * t, np.ones_like(t)])
        lin = np.diag(np.asarray(extents, float))
        if shear is not None:
            lin = shear @ lin
        if rot is not None:
            lin = rot @ lin
        self.place(part, (v, f), lin, center)

    def frustum(self, part, p0, p1, r0, r1=None, sections=20, radii_scale=(1.0, 1.0)) -> None:
        """Truncated cone (a cylinder when ``r1`` is None) from point ``p0`` (radius r0) to ``p1``."""
        r1 = r0 if r1 is None else r1
        v, f = _unit_cylinder(sections)
        t = v[:, 2:3] + 0.5
        r = r0 + (r1 - r0) * t
        v = np.hstack([v[:, :2] * r * np.asarray(radii_scale), v[:, 2:3]])
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        d = p1 - p0
        L = float(np.linalg.norm(d))
        lin = _align_z(d) @ np.diag([1.0, 1.0, L])
        self.place(part, (v, f), lin, (p0 + p1) / 2)

    def cylinder(self, part, p0, p1, r, sections=16) -> None:
        self.frustum(part, p0, p1, r, r, sections=sections)

    def ellipsoid(self, part, radii, center, rot=None, subdiv=2) -> None:
        lin = np.diag(np.asarray(radii, float))
        if rot is not None:
            lin = rot @ lin
        self.place(part, _unit_sphere(subdiv), lin, center)

    def torus_arc(self, part, major, minor, center, keep: Callable[[np.ndarray], np.ndarray], rot=None) -> None:
        """Torus in the xz-plane (axis y) around ``center``; keeps faces whose centroid passes ``keep``."""
        import trimesh

        t = trimesh.creation.torus(major_radius=major, minor_radius=minor, major_sections=32, minor_sections=10)
        lin = _rot_x(90.0) if rot is None else rot @ _rot_x(90.0)
        v = np.asarray(t.vertices, float) @ lin.T + np.asarray(center, float)
        f = np.asarray(t.faces, np.int64)
        f = f[keep(face_centers(v, f))]
        used, f = np.unique(f, return_inverse=True)
        self.add(part, v[used], f.reshape(-1, 3))

    def annulus(self, part, r_in, r_out, z0, z1, sections=24) -> None:
        import trimesh

        a = trimesh.creation.annulus(r_min=r_in, r_max=r_out, height=z1 - z0, sections=sections)
        self.add(part, np.asarray(a.vertices, float) + [0, 0, (z0 + z1) / 2], np.asarray(a.faces, np.int64))

    def build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.concatenate(self._v), np.concatenate(self._f), np.concatenate(self._l)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _legs_rect(b: _Builder, part, w, d, inset, top_z, thick, rng, splay=0.0):
    """Four legs from the floor (z = 0) up to ``top_z`` under a rectangle ``w x d`` centred at
    the origin, round or square at random; returns the foot positions."""
    round_legs = rng.random() < 0.5
    feet = []
    for sx in (-1, 1):
        for sy in (-1, 1):
            top = np.array([sx * (w / 2 - inset), sy * (d / 2 - inset), top_z])
            foot = top + [sx * splay, sy * splay, -top_z]
            feet.append(foot)
            if round_legs:
                b.cylinder(part, foot, top, thick / 2, sections=12)
            else:
                h = top_z
                lin_shear = np.array([[1, 0, -sx * splay / h], [0, 1, -sy * splay / h], [0, 0, 1]])
                b.box(part, (thick, thick, h), (top + foot) / 2, shear=lin_shear, subdiv=0)
    return feet


# --------------------------------------------------------------------------- families


def _chair(b: _Builder, rng: np.random.Generator) -> None:
    w, d = _u(rng, 0.4, 0.6), _u(rng, 0.38, 0.58)
    sh, st = _u(rng, 0.38, 0.55), _u(rng, 0.03, 0.09)
    b.box("seat", (w, d, st), (0, 0, sh - st / 2), taper=(1.0, 1.0))
    bh, bt = _u(rng, 0.3, 0.75), _u(rng, 0.025, 0.07)
    tilt = _u(rng, 0, 15)
    rot = _rot_x(-tilt)  # lean back towards +y
    back_c = np.array([0, d / 2 - bt / 2, sh]) + rot @ np.array([0, 0, bh / 2])
    if rng.random() < 0.65:
        b.box("back", (w * _u(rng, 0.85, 1.0), bt, bh), back_c, rot=rot)
    else:  # slats + top rail
        n = int(rng.integers(2, 6))
        rail = _u(rng, 0.05, 0.12) * bh
        b.box("back", (w, bt, rail), back_c + rot @ np.array([0, 0, bh / 2 - rail / 2]), rot=rot)
        for x in np.linspace(-w / 2 + 0.03, w / 2 - 0.03, n):
            b.box("back", (0.03, bt * 0.8, bh - rail), back_c + rot @ np.array([x, 0, -rail / 2]), rot=rot, subdiv=0)
    if rng.random() < 0.75:
        _legs_rect(b, "leg", w, d, _u(rng, 0.01, 0.05), sh - st, _u(rng, 0.025, 0.05), rng, splay=_u(rng, 0, 0.04))
    else:  # swivel: column + star base
        col_r = _u(rng, 0.02, 0.04)
        b.cylinder("leg", (0, 0, 0.08), (0, 0, sh - st), col_r, sections=16)
        n, reach = int(rng.integers(4, 6)), _u(rng, 0.22, 0.33)
        for k in range(n):
            a = 2 * np.pi * k / n
            b.cylinder("leg", (0, 0, 0.08), (reach * np.cos(a), reach * np.sin(a), 0.04), 0.018, sections=8)
    if rng.random() < 0.4:
        ah = _u(rng, 0.15, 0.28)
        for sx in (-1, 1):
            x = sx * (w / 2 + 0.03)
            b.box("arm", (0.06, d * 0.85, 0.04), (x, 0, sh + ah), subdiv=0)
            b.box("arm", (0.035, 0.035, ah), (x, -d * 0.3, sh + ah / 2 - 0.01), subdiv=0)


def _stool(b: _Builder, rng: np.random.Generator) -> None:
    h, st = _u(rng, 0.4, 0.85), _u(rng, 0.03, 0.08)
    r = _u(rng, 0.14, 0.26)
    if rng.random() < 0.6:
        b.frustum("seat", (0, 0, h - st), (0, 0, h), r, sections=24)
    else:
        b.box("seat", (2 * r, 2 * r * _u(rng, 0.8, 1.0), st), (0, 0, h - st / 2))
    n = int(rng.integers(3, 5))
    spread = r * _u(rng, 0.6, 0.85)
    splay = _u(rng, 0.0, 0.12) * h
    thick = _u(rng, 0.02, 0.045)
    a0 = _u(rng, 0, np.pi / n) if n == 3 else np.pi / 4
    tops, feet = [], []
    for k in range(n):
        a = a0 + 2 * np.pi * k / n
        u = np.array([np.cos(a), np.sin(a), 0.0])
        top, foot = u * spread + [0, 0, h - st], u * (spread + splay)
        tops.append(top)
        feet.append(foot)
        b.cylinder("leg", foot, top, thick / 2, sections=12)
    if rng.random() < 0.55:
        t = _u(rng, 0.25, 0.45)
        pts = [f + t * (tp - f) for f, tp in zip(feet, tops)]
        for k in range(n):
            b.cylinder("rung", pts[k], pts[(k + 1) % n], thick * 0.35, sections=8)


def _table(b: _Builder, rng: np.random.Generator) -> None:
    h, tt = _u(rng, 0.4, 0.8), _u(rng, 0.02, 0.07)
    style = rng.choice(["rect", "round", "trestle"], p=[0.55, 0.25, 0.2])
    if style == "round":
        r = _u(rng, 0.3, 0.7)
        b.frustum("top", (0, 0, h - tt), (0, 0, h), r, sections=32)
        if rng.random() < 0.5:  # pedestal
            b.cylinder("leg", (0, 0, 0.03), (0, 0, h - tt), _u(rng, 0.03, 0.08), sections=16)
            b.frustum("leg", (0, 0, 0), (0, 0, 0.03), r * _u(rng, 0.4, 0.7), r * 0.3, sections=24)
        else:
            n = int(rng.integers(3, 5))
            for k in range(n):
                a = 2 * np.pi * k / n
                p = np.array([np.cos(a), np.sin(a), 0]) * r * 0.7
                b.cylinder("leg", p, p + [0, 0, h - tt], _u(rng, 0.015, 0.03), sections=12)
        return
    w, d = _u(rng, 0.6, 2.0), _u(rng, 0.45, 1.0)
    b.box("top", (w, d, tt), (0, 0, h - tt / 2), subdiv=2)
    if style == "rect":
        _legs_rect(b, "leg", w, d, _u(rng, 0.02, 0.1), h - tt, _u(rng, 0.03, 0.08), rng, splay=_u(rng, 0, 0.03))
    else:  # two trestle panels and a stretcher
        pt = _u(rng, 0.03, 0.07)
        for sx in (-1, 1):
            x = sx * (w / 2 - _u(rng, 0.08, 0.2))
            b.box("leg", (pt, d * 0.75, h - tt - 0.04), (x, 0, (h - tt + 0.04) / 2), subdiv=0)
            b.box("leg", (pt * 1.5, d * 0.85, 0.04), (x, 0, 0.02), subdiv=0)
        b.box("leg", (w * 0.7, pt, 0.05), (0, 0, (h - tt) * 0.4), subdiv=0)


def _bench(b: _Builder, rng: np.random.Generator) -> None:
    w, d = _u(rng, 0.9, 2.0), _u(rng, 0.3, 0.55)
    h, st = _u(rng, 0.38, 0.5), _u(rng, 0.03, 0.08)
    if rng.random() < 0.5:
        b.box("seat", (w, d, st), (0, 0, h - st / 2), subdiv=2)
    else:  # planks
        n = int(rng.integers(2, 5))
        pw = d / n
        for k in range(n):
            b.box("seat", (w, pw * 0.85, st), (0, -d / 2 + pw * (k + 0.5), h - st / 2))
    if rng.random() < 0.6:
        _legs_rect(b, "leg", w, d, _u(rng, 0.03, 0.15), h - st, _u(rng, 0.03, 0.06), rng)
    else:
        for sx in (-1, 1):
            b.box("leg", (_u(rng, 0.03, 0.08), d * 0.9, h - st), (sx * w * 0.4, 0, (h - st) / 2), subdiv=0)
    if rng.random() < 0.5:
        bh = _u(rng, 0.2, 0.45)
        rot = _rot_x(-_u(rng, 0, 15))
        b.box("back", (w, 0.04, bh), np.array([0, d / 2 - 0.02, h]) + rot @ np.array([0, 0, bh / 2 + 0.05]), rot=rot)
        for sx in (-1, 1):
            b.box("back", (0.04, 0.04, bh * 0.5), (sx * w * 0.4, d / 2 - 0.02, h + bh * 0.2), subdiv=0)


def _bed(b: _Builder, rng: np.random.Generator) -> None:
    L, W = _u(rng, 1.9, 2.2), _u(rng, 0.9, 1.9)
    clear, fh, mt = _u(rng, 0.05, 0.25), _u(rng, 0.1, 0.3), _u(rng, 0.12, 0.3)
    b.box("frame", (L, W, fh), (0, 0, clear + fh / 2), subdiv=2)
    b.box("mattress", (L * 0.97, W * 0.95, mt), (0.01 * L, 0, clear + fh + mt / 2), taper=(0.99, 0.98), subdiv=2)
    top = clear + fh + mt
    hb_h, hb_t = _u(rng, 0.15, 0.9), _u(rng, 0.04, 0.1)
    b.box("headboard", (hb_t, W, top + hb_h), (-L / 2 - hb_t / 2, 0, (top + hb_h) / 2))
    if rng.random() < 0.4:  # footboard, part of the frame
        fb = _u(rng, 0.05, 0.4)
        b.box("frame", (hb_t, W, top - 0.1 + fb), (L / 2 + hb_t / 2, 0, (top - 0.1 + fb) / 2))
    n_leg_rows = 3 if rng.random() < 0.3 else 2
    t = _u(rng, 0.04, 0.08)
    for x in np.linspace(-L / 2 + t, L / 2 - t, n_leg_rows):
        for sy in (-1, 1):
            b.box("leg", (t, t, clear), (x, sy * (W / 2 - t), clear / 2), subdiv=0)
    if rng.random() < 0.7:
        n = 1 if W < 1.2 else int(rng.integers(1, 3))
        for y in np.linspace(-W / 4, W / 4, n) if n > 1 else [0.0]:
            b.ellipsoid("pillow", (0.18, min(0.3, W / (2 * n) * 0.9), 0.06), (-L / 2 + 0.25, y, top + 0.04), subdiv=1)


def _lamp(b: _Builder, rng: np.random.Generator) -> None:
    bt = _u(rng, 0.02, 0.06)
    br = _u(rng, 0.07, 0.2)
    if rng.random() < 0.7:
        b.frustum("base", (0, 0, 0), (0, 0, bt), br, br * _u(rng, 0.6, 1.0), sections=24)
    else:
        b.box("base", (2 * br, 2 * br * _u(rng, 0.6, 1.0), bt), (0, 0, bt / 2), subdiv=0)
    H = _u(rng, 0.3, 1.6)
    sr = _u(rng, 0.008, 0.025)
    if rng.random() < 0.65:
        top = np.array([0, 0, bt + H])
        b.cylinder("stem", (0, 0, bt), top, sr, sections=12)
        down = True
    else:  # desk lamp with an elbow
        elbow = np.array([_u(rng, -0.1, 0.1), 0, bt + H * _u(rng, 0.4, 0.6)])
        top = elbow + [_u(rng, 0.15, 0.4), 0, H * _u(rng, 0.2, 0.5)]
        b.cylinder("stem", (0, 0, bt), elbow, sr, sections=12)
        b.cylinder("stem", elbow, top, sr, sections=12)
        down = False
    sh = _u(rng, 0.1, 0.35)
    r_bot = _u(rng, 0.08, 0.3)
    style = rng.choice(["frustum", "dome", "cylinder"], p=[0.55, 0.25, 0.2])
    if style == "frustum":
        r_top = r_bot * _u(rng, 0.35, 0.9)
        if down:  # shade around the bulb at the top of the stem
            b.frustum("shade", top - [0, 0, sh * 0.6], top + [0, 0, sh * 0.4], r_bot, r_top, sections=24)
        else:  # pointing down-forward
            d = np.array([0.4, 0, -1.0])
            b.frustum("shade", top, top + sh * d / np.linalg.norm(d), r_top * 0.5, r_bot * 0.6, sections=20)
    elif style == "dome":
        b.ellipsoid("shade", (r_bot, r_bot, sh / 2), top, subdiv=2)
    else:
        b.frustum("shade", top - [0, 0, sh / 2], top + [0, 0, sh / 2], r_bot * 0.8, sections=24)


def _mug(b: _Builder, rng: np.random.Generator) -> None:
    r, h = _u(rng, 0.03, 0.06), _u(rng, 0.06, 0.13)
    wall = _u(rng, 0.003, 0.008)
    b.annulus("body", r - wall, r, 0.0 + wall, h, sections=28)
    b.frustum("body", (0, 0, 0), (0, 0, wall), r, sections=28)
    major = h * _u(rng, 0.25, 0.4)
    minor = _u(rng, 0.004, 0.012)
    cx = r + major * _u(rng, 0.1, 0.4)
    zc = h * _u(rng, 0.45, 0.6)
    b.torus_arc("handle", major, minor, (cx, 0, zc), keep=lambda c: c[:, 0] > r * 0.97)


def _bottle(b: _Builder, rng: np.random.Generator) -> None:
    r, h = _u(rng, 0.03, 0.06), _u(rng, 0.1, 0.26)
    if rng.random() < 0.8:
        b.frustum("body", (0, 0, 0), (0, 0, h), r * _u(rng, 0.85, 1.0), r, sections=24)
        sq = False
    else:
        b.box("body", (2 * r, 2 * r * _u(rng, 0.5, 1.0), h), (0, 0, h / 2))
        sq = True
    nr = r * _u(rng, 0.25, 0.45)
    shoulder = _u(rng, 0.015, 0.06)
    b.frustum("body", (0, 0, h), (0, 0, h + shoulder), r * (0.9 if sq else 1.0), nr, sections=24)
    nh = _u(rng, 0.03, 0.1)
    b.cylinder("neck", (0, 0, h + shoulder), (0, 0, h + shoulder + nh), nr, sections=16)
    ch = _u(rng, 0.012, 0.03)
    top = h + shoulder + nh
    b.cylinder("cap", (0, 0, top), (0, 0, top + ch), nr * _u(rng, 1.05, 1.3), sections=16)


def _vase(b: _Builder, rng: np.random.Generator) -> None:
    r, h = _u(rng, 0.05, 0.15), _u(rng, 0.15, 0.5)
    z0 = 0.0
    if rng.random() < 0.5:
        bh = _u(rng, 0.01, 0.04)
        b.frustum("base", (0, 0, 0), (0, 0, bh), r * _u(rng, 0.5, 0.8), r * 0.4, sections=24)
        z0 = bh
    # belly as an ellipsoid, neck flaring out
    bh = h * _u(rng, 0.45, 0.7)
    b.ellipsoid("body", (r, r, bh / 2), (0, 0, z0 + bh / 2), subdiv=3)
    nr = r * _u(rng, 0.25, 0.5)
    neck_h = h - bh
    b.frustum("neck", (0, 0, z0 + bh * 0.9), (0, 0, z0 + bh * 0.9 + neck_h), nr, nr * _u(rng, 1.0, 1.5), sections=24)


def _bookshelf(b: _Builder, rng: np.random.Generator) -> None:
    W, D, H = _u(rng, 0.5, 1.6), _u(rng, 0.22, 0.4), _u(rng, 0.7, 2.0)
    t = _u(rng, 0.015, 0.04)
    for sx in (-1, 1):
        b.box("side", (t, D, H), (sx * (W / 2 - t / 2), 0, H / 2), subdiv=2)
    n = int(rng.integers(2, 7))
    plinth = _u(rng, 0.0, 0.08)
    for z in np.linspace(plinth + t / 2, H - t / 2, n + 1):
        b.box("shelf", (W - 2 * t, D * 0.97, t), (0, 0, z))
    if rng.random() < 0.6:
        b.box("back", (W - 2 * t, 0.008, H - plinth), (0, D / 2 - 0.004, plinth + (H - plinth) / 2), subdiv=2)


def _monitor(b: _Builder, rng: np.random.Generator) -> None:
    W = _u(rng, 0.35, 0.8)
    Hs = W / rng.choice([16 / 9, 16 / 10, 4 / 3, 21 / 9])
    T = _u(rng, 0.01, 0.05)
    lift = _u(rng, 0.04, 0.2)
    bw, bd, bt = _u(rng, 0.15, 0.35), _u(rng, 0.12, 0.25), _u(rng, 0.01, 0.03)
    if rng.random() < 0.6:
        b.box("base", (bw, bd, bt), (0, 0, bt / 2), subdiv=1)
    else:
        b.frustum("base", (0, 0, 0), (0, 0, bt), bw / 2, bw / 2 * 0.8, radii_scale=(1.0, bd / bw), sections=24)
    zc = bt + lift + Hs / 2
    yscreen = -0.02
    tilt = _rot_x(_u(rng, 0, 10))
    b.box("screen", (W, T, Hs), (0, yscreen, zc), rot=tilt, subdiv=2)
    if rng.random() < 0.25:  # bulky back (CRT-ish / all-in-one)
        b.box("screen", (W * 0.7, T * 4, Hs * 0.7), (0, yscreen + T * 2, zc), rot=tilt, taper=(0.8, 1.0))
    sw = _u(rng, 0.03, 0.08)
    b.box("stand", (sw, 0.03, lift + Hs * 0.4), (0, yscreen + T / 2 + 0.02, bt + (lift + Hs * 0.4) / 2), subdiv=0)


def _sofa(b: _Builder, rng: np.random.Generator) -> None:
    W, D = _u(rng, 1.0, 2.4), _u(rng, 0.7, 1.0)
    legs = rng.random() < 0.6
    clear = _u(rng, 0.05, 0.15) if legs else 0.0
    bh = _u(rng, 0.15, 0.3)
    b.box("seat", (W, D, bh), (0, 0, clear + bh / 2), subdiv=2)
    n = int(rng.integers(1, 4))
    arm = rng.random() < 0.85
    aw = _u(rng, 0.08, 0.25) if arm else 0.0
    cw = (W - 2 * aw) / n
    ct = _u(rng, 0.08, 0.18)
    back_t = _u(rng, 0.12, 0.25)
    for k in range(n):
        x = -W / 2 + aw + cw * (k + 0.5)
        b.box("seat", (cw * 0.97, D - back_t, ct), (x, -back_t / 2, clear + bh + ct / 2), taper=(0.97, 0.97))
    back_h = _u(rng, 0.3, 0.6)
    b.box("back", (W, back_t, back_h + ct), (0, D / 2 - back_t / 2, clear + bh + (back_h + ct) / 2), subdiv=2)
    if arm:
        ah = _u(rng, 0.1, 0.3) + ct
        for sx in (-1, 1):
            b.box("arm", (aw, D, ah), (sx * (W / 2 - aw / 2), 0, clear + bh + ah / 2))
    if legs:
        for sx in (-1, 1):
            for sy in (-1, 1):
                b.frustum("leg", (sx * (W / 2 - 0.06), sy * (D / 2 - 0.06), 0),
                          (sx * (W / 2 - 0.06), sy * (D / 2 - 0.06), clear), 0.02, 0.03, sections=10)


def _car(b: _Builder, rng: np.random.Generator) -> None:
    L, W = _u(rng, 3.5, 5.0), _u(rng, 1.6, 2.0)
    wr = _u(rng, 0.28, 0.42)
    gc, bh = wr * _u(rng, 0.5, 0.9), _u(rng, 0.4, 0.8)
    b.box("body", (L, W, bh), (0, 0, gc + bh / 2), taper=(0.97, 0.95), subdiv=2)
    truck = rng.random() < 0.25
    cl = L * (_u(rng, 0.25, 0.35) if truck else _u(rng, 0.4, 0.6))
    ch = _u(rng, 0.35, 0.75)
    cx = -L / 2 + cl / 2 + L * 0.05 if truck else _u(rng, -0.12, 0.05) * L
    b.box("cabin", (cl, W * 0.9, ch), (cx, 0, gc + bh + ch / 2), taper=(_u(rng, 0.55, 0.95), 0.85))
    ww = _u(rng, 0.18, 0.3)
    axles = [-L * 0.32, L * 0.32] if not truck or rng.random() < 0.5 else [-L * 0.32, L * 0.15, L * 0.35]
    for x in axles:
        for sy in (-1, 1):
            y = sy * (W / 2 - ww / 2 + 0.02)
            b.cylinder("wheel", (x, y - ww / 2, wr), (x, y + ww / 2, wr), wr, sections=20)


def _airplane(b: _Builder, rng: np.random.Generator) -> None:
    L = 1.0
    fr = _u(rng, 0.035, 0.08)
    b.ellipsoid("fuselage", (L / 2, fr, fr * _u(rng, 1.0, 1.2)), (0, 0, 0), subdiv=3)
    span = _u(rng, 0.6, 1.2)
    chord, wt = _u(rng, 0.08, 0.22), _u(rng, 0.008, 0.02)
    sweep = _u(rng, 0.0, 0.7)
    wx = _u(rng, -0.1, 0.1)
    wz = _u(rng, -0.6, 0.6) * fr
    dihedral = _u(rng, 0, 0.08)
    for sy in (-1, 1):
        # swept back (tips towards the tail at -x) and raised by the dihedral
        shear = np.array([[1, -sy * sweep, 0], [0, 1, 0], [0, sy * dihedral, 1]])
        b.box("wing", (chord, span / 2, wt), (wx - sweep * span / 4, sy * span / 4, wz + dihedral * span / 4),
              shear=shear, taper=(1.0, 1.0))
    tail_x = -L / 2 + 0.07
    fin_h, fin_c = _u(rng, 0.08, 0.2), _u(rng, 0.07, 0.15)
    fsweep = _u(rng, 0.3, 1.0)
    b.box("tail", (fin_c, wt, fin_h), (tail_x + fsweep * fin_h / 2, 0, fr * 0.6 + fin_h / 2),
          shear=np.array([[1, 0, -fsweep], [0, 1, 0], [0, 0, 1]]), subdiv=0)
    hs = span * _u(rng, 0.25, 0.4)
    for sy in (-1, 1):
        shear = np.array([[1, -sy * sweep * 0.8, 0], [0, 1, 0], [0, 0, 1]])
        b.box("tail", (fin_c * 0.8, hs / 2, wt), (tail_x - sweep * 0.8 * hs / 4, sy * hs / 4, fr * 0.4), shear=shear,
              subdiv=0)
    if rng.random() < 0.6:
        n = 1 if rng.random() < 0.6 else 2
        er = _u(rng, 0.02, 0.04)
        for k in range(n):
            y = span / 2 * (0.3 + 0.3 * k)
            for sy in (-1, 1):
                x0 = wx - sweep * y + chord * 0.5
                p = np.array([x0, sy * y, wz - er * 1.2])
                b.cylinder("engine", p, p + [-_u(rng, 0.1, 0.2), 0, 0], er, sections=16)


_FAMILIES: dict[str, Callable[[_Builder, np.random.Generator], None]] = {
    "airplane": _airplane,
    "bed": _bed,
    "bench": _bench,
    "bookshelf": _bookshelf,
    "bottle": _bottle,
    "car": _car,
    "chair": _chair,
    "lamp": _lamp,
    "monitor": _monitor,
    "mug": _mug,
    "sofa": _sofa,
    "stool": _stool,
    "table": _table,
    "vase": _vase,
}
assert set(_FAMILIES) == set(PARTS)


def _subdivide_labelled(v: np.ndarray, f: np.ndarray, labels: np.ndarray):
    import trimesh

    v2, f2, index = trimesh.remesh.subdivide(v, f, return_index=True)
    lab = np.empty(len(f2), np.int64)
    for old, new in index.items():
        lab[np.asarray(new)] = labels[int(old)]
    return np.asarray(v2, float), np.asarray(f2, np.int64), lab


def make_shape(cls: str, seed: int) -> Mesh:
    """Build one random object of class ``cls``; deterministic for ``(cls, seed)``.

    Returns a :class:`Mesh` with ``vertices`` (V, 3) float64 (z up, centred on its
    bounding box, bounding-box diagonal in [0.5, 2]), ``faces`` (F, 3) int64 with
    ``512 <= F <= 10000`` and ``face_labels`` (F,) int64 global part ids
    (see :func:`part_ids`).
    """
    _check_class(cls)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng([zlib.crc32(cls.encode()), int(seed)])
    b = _Builder(cls)
    _FAMILIES[cls](b, rng)
    v, f, lab = b.build()
    # random per-axis stretch, then a class-independent random size
    v = v * np.exp(rng.normal(0.0, _AXIS_JITTER, size=3))
    lo, hi = v.min(axis=0), v.max(axis=0)
    size = np.exp(rng.uniform(np.log(_SIZE_RANGE[0]), np.log(_SIZE_RANGE[1])))
    v = (v - (lo + hi) / 2) * (size / np.linalg.norm(hi - lo))
    while len(f) < _MIN_FACES:
        v, f, lab = _subdivide_labelled(v, f, lab)
    if len(f) > _MAX_FACES:  # a bug in a family, not a user error
        raise RuntimeError(f"builtin {cls} (seed {seed}) has {len(f)} faces > {_MAX_FACES}")
    return Mesh(v, f, lab, source=f"builtin:shapes {cls} seed {seed}")


# --------------------------------------------------------------------------- source

_SPLITS = ("train", "test")
#: most objects per class and split of ``builtin:shapes`` (``?train=``/``?test=``)
MAX_PER_CLASS = 100_000


class BuiltinSource(Source):
    """``builtin:shapes``: ``train_per_class`` + ``test_per_class`` procedural objects per class.

    Item ids are ``"<cls>/<split>/<cls>_<k:04d>"``; ``item.index`` is the generator seed,
    derived from ``(seed, cls, split, k)`` with :class:`numpy.random.SeedSequence`, so
    objects do not change when the counts change.
    """

    kind = "mesh"
    up_axis = "z"

    def __init__(self, train_per_class: int = 32, test_per_class: int = 8, seed: int = 0,
                 classes: Optional[list[str]] = None):
        super().__init__()
        for name, n in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= MAX_PER_CLASS:
                raise DataError(f"{name} must be an integer in [0, {MAX_PER_CLASS}], got {n!r}", path="builtin:shapes")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}", path="builtin:shapes")
        chosen = list(CLASSES) if classes is None else sorted(set(classes))
        for c in chosen:
            _check_class(c)
        self.train_per_class, self.test_per_class, self.seed = int(train_per_class), int(test_per_class), int(seed)
        self.classes = chosen
        self.part_names = part_names()
        counts = {"train": self.train_per_class, "test": self.test_per_class}
        for cls in chosen:
            for si, split in enumerate(_SPLITS):
                for k in range(counts[split]):
                    ss = np.random.SeedSequence([self.seed, zlib.crc32(cls.encode()), si, k])
                    obj_seed = int(ss.generate_state(1, np.uint32)[0])
                    self.items.append(Item(id=f"{cls}/{split}/{cls}_{k:04d}", label=cls, split=split, index=obj_seed))
        self.description = (
            f"builtin:shapes - {len(chosen)} procedural part-labelled classes, "
            f"{self.train_per_class} train + {self.test_per_class} test objects per class, seed {self.seed}"
        )

    def load(self, item: Item) -> Mesh:
        """Generate the mesh of ``item`` (raises :class:`MeshError` for a foreign item)."""
        if item.label not in PARTS or item.index < 0:
            raise MeshError(item.id, f"not a builtin:shapes item (label {item.label!r}, index {item.index})")
        return make_shape(item.label, item.index)

    def describe(self) -> dict:
        d = super().describe()
        d.update(train_per_class=self.train_per_class, test_per_class=self.test_per_class, seed=self.seed)
        return d
