"""Benchmark of data preparation: rendering, encoding + writing, FPS, full prepare.

Prints one table row per measurement:

(a) views/s rendering alone at ``--size`` px on a ~10k-face mesh (a UV sphere, plus the
    real ModelNet meshes of ``../shared/data/modelnet_off`` when present), single process;
(b) views/s rendering + gzip HDF5 encoding + writing (one chunk per image, as the
    dataset store writes them), single process;
(c) farthest point sampling, 16k -> 2048 points: fpsample-backed
    :func:`~xmodal.data.sampling.farthest_point_sampling` vs the numpy reference;
(d) objects/s of a full :func:`xmodal.data.prepare.prepare` of ``builtin:shapes`` with
    ``--workers`` processes;
(e) per real Princeton Shape Benchmark mesh (``../shared/data/psb``; ``--psb-meshes`` of them,
    spread from the fewest to the most faces), the seconds of each stage of one ``prepare``
    object: reading + validating, area-weighted sampling + exact FPS, rendering; and a line fitted
    to total seconds against faces (how prepare time grows with mesh size).

Mesa's llvmpipe rasterises with one thread per CPU by default; ``--lp-threads 1``
(the default) pins it to one thread so (a) and (b) are per-core figures.

Usage::

    python benchmarks/prepare_bench.py [--size 224] [--views 12] [--objects 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NOTES: list[str] = []


def _uv_sphere(target_faces: int = 10_000):
    import trimesh

    from xmodal.data.types import Mesh

    count = max(int(round(np.sqrt(target_faces / 4.0))), 3)  # a c x c UV sphere has ~4 c^2 faces
    m = trimesh.creation.uv_sphere(count=[count, count])
    return Mesh(np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64))


def _modelnet_meshes():
    root = Path(os.environ.get("XMODAL_SHARED_DATA", REPO.parent / "shared" / "data")) / "modelnet_off"
    if not root.is_dir():
        return []
    from xmodal.data.mesh_io import load_mesh

    return [load_mesh(p) for p in sorted(root.glob("*/*/*.off"))]


class _Clock:
    """Wall time and this process's CPU time (all its threads, llvmpipe's included)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rate(self, n: int, unit: str) -> str:
        # views per CPU-second is the per-core figure, robust to other load on the machine
        return f"{n / self.wall:.0f} {unit}/s wall, {n / self.cpu:.0f} {unit}/CPU-s"


def _time_render(renderer, meshes, views: int, objects: int, seed: int = 0) -> str:
    from xmodal.data.render import sample_view_angles

    renderer.render_mesh(meshes[0], sample_view_angles(views, seed=seed))  # warm-up (shader JIT)
    with _Clock() as clock:
        for i in range(objects):
            renderer.render_mesh(meshes[i % len(meshes)], sample_view_angles(views, seed=seed + i))
    return clock.rate(views * objects, "views")


def _time_render_write(renderer, meshes, views: int, objects: int, size: int, seed: int = 0) -> str:
    import h5py

    from xmodal.data.render import sample_view_angles

    renderer.render_mesh(meshes[0], sample_view_angles(views, seed=seed))
    with tempfile.TemporaryDirectory() as tmp:
        with _Clock() as clock, h5py.File(Path(tmp) / "bench.h5", "w") as f:
            ds = f.create_dataset(
                "images", (objects, views, size, size), dtype=np.uint8,
                chunks=(1, 1, size, size), compression="gzip", compression_opts=4,
            )
            buf = np.empty((views, size, size), np.uint8)
            for i in range(objects):
                ds[i] = renderer.render_mesh(meshes[i % len(meshes)], sample_view_angles(views, seed=seed + i), out=buf)
    return clock.rate(views * objects, "views")


def _time_fps(m: int, n: int, repeats: int) -> tuple[float, float]:
    from xmodal.data.sampling import farthest_point_sampling, farthest_point_sampling_reference

    pts = np.random.default_rng(0).random((m, 3))
    farthest_point_sampling(pts, n, start_idx=0)
    t = time.perf_counter()
    for _ in range(repeats):
        fast = farthest_point_sampling(pts, n, start_idx=0)
    t_fast = (time.perf_counter() - t) / repeats
    t = time.perf_counter()
    slow = farthest_point_sampling_reference(pts, n, start_idx=0)
    t_slow = time.perf_counter() - t
    if not np.array_equal(fast, slow):
        # fpsample works in float32: picks may differ from the float64 reference on near-ties,
        # but the max-min distance of every step must agree to float32 precision
        da, db = _maxmin_sequence(pts, fast), _maxmin_sequence(pts, slow)
        ok = np.allclose(da, db, rtol=1e-5, atol=0)
        NOTES.append(f"note: {np.sum(fast != slow)} of {n} FPS picks differ from the float64 reference "
                     f"({'float32 near-ties, same max-min distances' if ok else 'MAX-MIN DISTANCES DIFFER'})")
    return n / t_fast, n / t_slow


def _maxmin_sequence(points: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Distance of each pick to the picks before it (the quantity FPS maximises)."""
    dist = np.full(len(points), np.inf)
    out = np.empty(len(idx))
    for k, i in enumerate(idx):
        out[k] = dist[i]
        dist = np.minimum(dist, ((points - points[i]) ** 2).sum(1))
    return np.sqrt(out)


def _time_prepare(views: int, points: int, size: int, workers: int, per_class: int) -> str:
    try:
        from xmodal.data.prepare import PrepareConfig, prepare
    except Exception:  # another module may not exist yet
        return "skipped (prepare not available)"
    spec = f"builtin:shapes?train={per_class}&test=0&seed=0"
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cfg = PrepareConfig(source=spec, out=Path(tmp) / "ds", views=views, points=points, image_size=size,
                            workers=workers, seed=0)
        prepare(cfg, progress=False)
        dt = time.perf_counter() - t
        from xmodal.data.store import ShapeStore

        n = sum(ShapeStore(Path(tmp) / "ds").manifest["counts"].values())
    return f"{n / dt:.2f} objects/s ({n} objects, {n * views / dt:.0f} views/s, {workers} workers)"


def _psb_meshes(count: int) -> list[Path]:
    """``count`` real PSB meshes spread evenly over the range of face counts (smallest to largest)."""
    from xmodal.data.mesh_io import read_mesh_arrays

    root = Path(os.environ.get("XMODAL_SHARED_DATA", REPO.parent / "shared" / "data")) / "psb" / "db"
    files = sorted(root.glob("*/m*/m*.ply")) + sorted(root.glob("*/m*/m*.off"))
    if not files:
        return []
    faces = np.array([len(read_mesh_arrays(f)[1]) for f in files])
    order = np.argsort(faces, kind="stable")
    picks = order[np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int)]
    return [files[i] for i in picks]


def _time_psb(paths: list[Path], size: int, views: int, points: int, repeats: int = 2) -> list[tuple[str, str]]:
    """Per real PSB mesh, the stages of one object of ``prepare``: read + validate, area-weighted
    sampling + exact FPS to ``points``, rendering ``views`` views (best of ``repeats``); and a
    least-squares line of total seconds against faces."""
    from xmodal.data.mesh_io import load_mesh
    from xmodal.data.render import Renderer, sample_view_angles
    from xmodal.data.sampling import sample_point_cloud

    rows, faces, totals = [], [], []
    with Renderer(size) as r:
        r.render_mesh(load_mesh(paths[0]), sample_view_angles(2, seed=0))  # warm-up (shader JIT)
        for path in paths:
            t = {"read": [], "sample": [], "render": []}
            for rep in range(repeats):
                t0 = time.perf_counter()
                mesh = load_mesh(path)
                t1 = time.perf_counter()
                sample_point_cloud(mesh, points, oversample=8, seed=rep)
                t2 = time.perf_counter()
                r.render_mesh(mesh, sample_view_angles(views, seed=rep))
                t3 = time.perf_counter()
                for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2)):
                    t[key].append(dt)
            best = {k: min(v) for k, v in t.items()}
            total = sum(best.values())
            faces.append(len(mesh.faces))
            totals.append(total)
            rows.append((f"(e) PSB {path.stem}: {len(mesh.faces):>7,} faces",
                         f"{total:6.3f} s = read {best['read']:.3f} + sample/FPS {best['sample']:.3f} "
                         f"+ render {views}x{size}px {best['render']:.3f}"))
    slope, intercept = np.polyfit(np.asarray(faces, float), np.asarray(totals), 1)
    rows.append(("(e) PSB fit: seconds per object", f"{intercept:.3f} s + {slope * 1e5:.3f} s per 100k faces"))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=224, help="image size in pixels")
    ap.add_argument("--views", type=int, default=12, help="views per object")
    ap.add_argument("--objects", type=int, default=20, help="objects per render measurement")
    ap.add_argument("--faces", type=int, default=10_000, help="faces of the synthetic sphere")
    ap.add_argument("--fps-m", type=int, default=16_384, help="FPS input points")
    ap.add_argument("--fps-n", type=int, default=2048, help="FPS output points")
    ap.add_argument("--points", type=int, default=2048, help="points per object in (d)")
    ap.add_argument("--workers", type=int, default=2, help="prepare workers in (d)")
    ap.add_argument("--per-class", type=int, default=4, help="builtin shapes per class in (d)")
    ap.add_argument("--lp-threads", type=int, default=1,
                    help="llvmpipe rasteriser threads (LP_NUM_THREADS); 0 keeps the environment's value")
    ap.add_argument("--psb-meshes", type=int, default=8, help="real PSB meshes timed in (e), spread over face counts")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c,d,e")
    args = ap.parse_args(argv)
    if args.lp_threads > 0:
        os.environ["LP_NUM_THREADS"] = str(args.lp_threads)  # read by Mesa at context creation
    skip = set(filter(None, args.skip.split(",")))

    from xmodal.data.render import Renderer

    rows: list[tuple[str, str]] = []
    cores = f"llvmpipe threads={os.environ.get('LP_NUM_THREADS', 'default')}"
    if not {"a", "b"} <= skip:
        sphere = _uv_sphere(args.faces)
        sets = [(f"uv-sphere {len(sphere.faces)} faces", [sphere])]
        real = _modelnet_meshes()
        if real:
            nf = [len(m.faces) for m in real]
            sets.append((f"ModelNet x{len(real)} ({min(nf)}-{max(nf)} faces)", real))
        with Renderer(args.size) as r:
            info = r.gl_renderer
            for name, meshes in sets:
                if "a" not in skip:
                    v = _time_render(r, meshes, args.views, args.objects)
                    rows.append((f"(a) render {args.size}px, {name}", v))
                if "b" not in skip:
                    v = _time_render_write(r, meshes, args.views, args.objects, args.size)
                    rows.append((f"(b) render+gzip-4 HDF5 write, {name}", v))
        cores += f", {info}"
    if "c" not in skip:
        fast, slow = _time_fps(args.fps_m, args.fps_n, repeats=3)
        rows.append((f"(c) FPS {args.fps_m}->{args.fps_n} fpsample", f"{fast:,.0f} points/s"))
        rows.append((f"(c) FPS {args.fps_m}->{args.fps_n} numpy reference", f"{slow:,.0f} points/s"))
        rows.append(("(c) FPS speed-up", f"{fast / slow:.1f}x"))
    if "d" not in skip:
        rows.append((f"(d) prepare builtin:shapes, {args.views} views, {args.size}px",
                     _time_prepare(args.views, args.points, args.size, args.workers, args.per_class)))
    if "e" not in skip:
        psb = _psb_meshes(args.psb_meshes)
        if psb:
            rows += _time_psb(psb, args.size, args.views, args.points)
        else:
            rows.append(("(e) real PSB meshes", "skipped (../shared/data/psb not found)"))

    width = max(len(k) for k, _ in rows)
    print(f"# xmodal prepare benchmark ({cores}; single process for a-c; {os.cpu_count()} CPUs visible)")
    print(f"{'measurement'.ljust(width)} | result")
    print(f"{'-' * width}-|-{'-' * 30}")
    for k, v in rows:
        print(f"{k.ljust(width)} | {v}")
    for note in NOTES:
        print(note)


if __name__ == "__main__":
    main()
