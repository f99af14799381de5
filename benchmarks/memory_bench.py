"""Peak memory (the resident-set high-water mark) of prepare, pretrain and feature extraction.

Every measurement runs in a fresh Python process, so that peaks do not mix; the process
reports its own ``VmHWM`` (``/proc/self/status``) and, sampled every 20 ms, the largest
``VmHWM`` of its child processes (DataLoader workers). Rows:

(a) ``mesh``: ``prepare`` of one generated torus of ``--faces`` faces (default 2 M) at 224 px,
    12 views, 2,048 points, one process, for each of ``--formats`` (default a binary PLY; also
    ``soup``, a PLY with three vertices per face, binary ``stl``, text ``off`` and ``obj``);
    then, for the first format, the peak of each stage of one object on its own (reading the
    file, validating the ``Mesh``, sampling, rendering), each above what the process held
    before it;
(b) ``--scan``: the peak of (a) for several face counts (``--scan-faces``, binary PLY, run with
    ``max_faces`` set so that the automatic limit does not refuse them) beside the estimate of
    :mod:`xmodal.data.mesh_limit` that the automatic limit uses, and a line fitted to the peaks;
(c) for each object count of ``--objects`` (default 1,000 and 10,000), on a synthetic store
    written shard by shard like ``prepare`` writes it (32 objects per shard, 12 views of 32 px,
    1,024 points per cloud, the same count in ``train`` and ``test``):

    * ``prepare``: a synthetic points source of that many clouds (2 splat views of 32 px),
      ``workers`` 1 (in the process) and 2 (worker processes);
    * ``pretrain``: the ``smoke`` preset, 30 steps of batch 16, ``data.workers`` 0 and 1;
    * ``point_features`` and ``view_features`` (2 views) of the test split, random-init encoders;
    * ``evaluate --task retrieval`` (3D and 1-view 2D retrieval, the D2 reference).

Usage::

    python benchmarks/memory_bench.py                       # (a) and (c) for 1k and 10k objects
    python benchmarks/memory_bench.py --objects 1000 3000 --only points evaluate --skip-mesh
    python benchmarks/memory_bench.py --formats ply soup stl off obj --skip-objects
    python benchmarks/memory_bench.py --scan --scan-faces 2e6 8e6 16e6 --skip-objects

Generated data goes to a temporary folder (``--tmp``, default the system's) and is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MB = 1 << 20
#: objects per shard of the synthetic stores (prepare's default chunk_size)
SHARD = 32
STORE = dict(views=12, image_size=32, points=1024)
#: pretrain steps (batch 16: 30 steps sample ~960 objects, touching ~95 % of 313 shards)
STEPS = 30


# --------------------------------------------------------------------------- measuring


def _status_kb(pid: "int | str", key: str) -> int:
    """``key`` (e.g. ``VmHWM``) of ``/proc/<pid>/status`` in kB; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Process ids of the live children of ``pid`` (through every thread's ``children`` list)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as fh:
                    out.extend(int(x) for x in fh.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


class ChildPeaks(threading.Thread):
    """Samples the ``VmHWM`` of this process's descendants every ``every`` seconds.

    Only descendants seen in at least ``min_samples`` samples count: a short-lived helper
    such as the ``uname -p`` some imports run is, between its fork and its exec, a copy of
    this process whose high-water mark is this process's resident set, not a worker's."""

    def __init__(self, every: float = 0.02, min_samples: int = 10):
        super().__init__(daemon=True)
        self.every, self.min_samples = every, min_samples
        self.peaks: dict[int, int] = {}
        self.seen: dict[int, int] = {}
        self._stop_flag = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_flag.is_set():
            todo = _children(me)
            while todo:
                pid = todo.pop()
                self.peaks[pid] = max(self.peaks.get(pid, 0), _status_kb(pid, "VmHWM"))
                self.seen[pid] = self.seen.get(pid, 0) + 1
                todo.extend(_children(pid))
            time.sleep(self.every)

    def stop(self) -> int:
        """Stop sampling; the largest peak of a lasting descendant in bytes (0 without one)."""
        self._stop_flag.set()
        self.join()
        lasting = [kb for pid, kb in self.peaks.items() if self.seen[pid] >= self.min_samples]
        return max(lasting, default=0) * 1024


def reset_peak() -> int:
    """Reset this process's high-water mark to its current resident set; returns that, in bytes."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kb("self", "VmRSS") * 1024


def own_peak() -> int:
    return _status_kb("self", "VmHWM") * 1024


# --------------------------------------------------------------------------- synthetic data


def torus(faces: int) -> tuple[np.ndarray, np.ndarray]:
    """A closed torus of about ``faces`` triangles: ``(vertices (V,3) float32, faces (F,3) int32)``."""
    nu = max(int(np.sqrt(faces / 2.0)), 3)
    nv = max(int(faces / (2 * nu)), 3)
    u = np.linspace(0, 2 * np.pi, nu, endpoint=False, dtype=np.float32)[:, None]
    v = np.linspace(0, 2 * np.pi, nv, endpoint=False, dtype=np.float32)[None, :]
    ring = 1.0 + 0.35 * np.cos(v)
    verts = np.stack(np.broadcast_arrays(ring * np.cos(u), ring * np.sin(u), 0.35 * np.sin(v) + 0 * u), -1)
    i, j = np.arange(nu, dtype=np.int32)[:, None], np.arange(nv, dtype=np.int32)[None, :]
    a, b = i * nv + j, ((i + 1) % nu) * nv + j
    c, d = ((i + 1) % nu) * nv + (j + 1) % nv, i * nv + (j + 1) % nv
    tris = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return verts.reshape(-1, 3), tris


def write_binary_ply(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    rec = np.empty(len(faces), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    rec["n"], rec["i"] = 3, faces
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(np.ascontiguousarray(vertices, dtype="<f4").tobytes())
        fh.write(rec.tobytes())


def write_text_mesh(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """OFF or OBJ (by the suffix), coordinates with 6 decimals."""
    with open(path, "w") as fh:
        if path.suffix == ".off":
            fh.write(f"OFF\n{len(vertices)} {len(faces)} 0\n")
            np.savetxt(fh, vertices, fmt="%.6f")
            np.savetxt(fh, np.column_stack([np.full(len(faces), 3), faces]), fmt="%d")
        else:
            np.savetxt(fh, vertices, fmt="v %.6f %.6f %.6f")
            np.savetxt(fh, faces + 1, fmt="f %d %d %d")


def write_binary_stl(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    rec = np.zeros(len(faces), dtype=[("n", "<f4", (3,)), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    rec["v"] = vertices[faces]
    with open(path, "wb") as fh:
        fh.write(b"\0" * 80 + np.uint32(len(faces)).tobytes() + rec.tobytes())


#: mesh file formats of (a): suffix and writer; "soup" is a PLY with three vertices per face
FORMATS = {
    "ply": (".ply", write_binary_ply),
    "soup": (".ply", lambda p, v, f: write_binary_ply(p, v[f].reshape(-1, 3), np.arange(3 * len(f)).reshape(-1, 3))),
    "stl": (".stl", write_binary_stl),
    "off": (".off", write_text_mesh),
    "obj": (".obj", write_text_mesh),
}


def mesh_folder(root: Path, faces: int, fmt: str = "ply") -> Path:
    """A class-folder mesh source holding one torus of ``faces`` faces (``root/torus/big.<ext>``)."""
    suffix, writer = FORMATS[fmt]
    path = root / "torus" / f"big{suffix}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path, *torus(faces))
    return path


def _synthetic_shard(n: int, seed: int, n_classes: int = 10) -> dict:
    """``n`` objects with discs of random radius as views and random unit-sphere clouds."""
    rng = np.random.default_rng(seed)
    v, s, p = STORE["views"], STORE["image_size"], STORE["points"]
    yy, xx = np.mgrid[:s, :s]
    r = np.hypot(yy - s / 2, xx - s / 2)
    radius = rng.uniform(4, s / 2, size=(n, v, 1, 1))
    images = np.where(r[None, None] < radius, rng.integers(60, 255, size=(n, v, 1, 1)), 0).astype(np.uint8)
    pts = rng.normal(size=(n, p, 3)).astype(np.float32)
    pts /= np.linalg.norm(pts, axis=2, keepdims=True)
    return {"ids": [f"c{seed % n_classes}/{seed}_{k}" for k in range(n)],
            "labels": rng.integers(0, n_classes, size=n), "points": pts, "images": images,
            "cameras": rng.uniform(0, 180, size=(n, v, 2)).astype(np.float32)}


def synthetic_store(root: Path, n: int) -> Path:
    """A store of ``n`` train and ``n`` test objects, written shard by shard (never whole in memory)."""
    from xmodal.data.store import MANIFEST_NAME, StoreContents, make_manifest, shard_relpath, write_shard
    from xmodal.utils.io import write_json

    if (root / MANIFEST_NAME).is_file():
        return root
    shards, sizes = {}, {}
    for split_no, split in enumerate(("train", "test")):
        shards[split], sizes[split] = [], []
        for c, start in enumerate(range(0, n, SHARD)):
            k = min(SHARD, n - start)
            rel = shard_relpath(split, c)
            write_shard(root / rel, _synthetic_shard(k, seed=split_no * 1_000_000 + start))
            shards[split].append(rel)
            sizes[split].append(k)
    contents = StoreContents(views=STORE["views"], points=STORE["points"], image_size=STORE["image_size"])
    man = make_manifest(classes=[f"c{i}" for i in range(10)], counts={s: n for s in shards}, shards=shards,
                        contents=contents, source="memory_bench synthetic", shard_sizes=sizes)
    write_json(root / MANIFEST_NAME, man)
    return root


# --------------------------------------------------------------------------- one measurement (child)


def _smoke_config(workers: int):
    from xmodal.train.config import resolve_pretrain_config

    return resolve_pretrain_config("smoke", [f"data.workers={workers}", f"iterations={STEPS}", "batch_size=16",
                                             f"checkpoint_every={STEPS}"])


def _case_mesh_prepare(a: dict) -> dict:
    from xmodal.data.prepare import PrepareConfig, prepare

    man = prepare(PrepareConfig(source=a["source"], out=a["out"], views=12, points=2048, image_size=224,
                                test_ratio=0.0, max_faces=a.get("max_faces", 0)), progress=False)
    return {"prepared": sum(man["counts"].values()), "failed": [f["reason"] for f in man["failed"]]}


def _case_mesh_stages(a: dict) -> dict:
    """Peak of each stage of one mesh object above what the process held before it."""
    from xmodal.data.mesh_io import read_mesh_arrays
    from xmodal.data.render import Renderer, sample_view_angles
    from xmodal.data.sampling import sample_point_cloud
    from xmodal.data.types import Mesh

    out: dict = {}
    renderer = Renderer(224)
    base = reset_peak()
    v, f = read_mesh_arrays(a["path"])
    out["read_mb"], base = (own_peak() - base) / MB, reset_peak()
    mesh = Mesh(v, f, source=a["path"])
    del v, f
    out["mesh_mb"], base = (own_peak() - base) / MB, reset_peak()
    sample_point_cloud(mesh, 2048, seed=0)
    out["sample_mb"], base = (own_peak() - base) / MB, reset_peak()
    renderer.render_mesh(mesh, sample_view_angles(12, seed=0))
    out["render_mb"] = (own_peak() - base) / MB
    out["faces"], out["vertices"] = len(mesh.faces), len(mesh.vertices)
    return out


class SyntheticPoints:
    """A points source of ``n`` random clouds (``prepare`` of a growing dataset); picklable, so
    that ``prepare`` can send it to worker processes."""

    kind, up_axis, part_names, description = "points", "z", None, "memory_bench points"

    def __init__(self, n: int):
        from xmodal.data.types import Item

        self.classes = [f"c{i}" for i in range(10)]
        self.items = [Item(f"train/{k:06d}", f"c{k % 10}", "train", index=k) for k in range(n)]

    def load(self, item):
        from xmodal.data.types import PointCloud

        pts = np.random.default_rng(item.index).normal(size=(256, 3)).astype(np.float32)
        return PointCloud(pts / np.linalg.norm(pts, axis=1, keepdims=True))

    def describe(self) -> dict:
        return {"kind": self.kind, "description": self.description, "up_axis": self.up_axis}


def _case_prepare(a: dict) -> dict:
    from xmodal.data.prepare import PrepareConfig, prepare

    man = prepare(PrepareConfig(out=a["out"], views=2, points=256, image_size=32, workers=a["workers"]),
                  source=SyntheticPoints(a["n"]), progress=False)
    return {"prepared": sum(man["counts"].values())}


def _case_pretrain(a: dict) -> dict:
    from xmodal.train.trainer import pretrain

    pretrain(_smoke_config(a["workers"]).with_paths(a["data"], a["out"]), progress=False)
    return {}


def _case_features(a: dict) -> dict:
    from xmodal.api import random_init_run
    from xmodal.data.store import ShapeStore
    from xmodal.eval.features import point_features, view_features

    run = random_init_run(_smoke_config(0))
    split = ShapeStore(a["data"]).split("test")
    if a["what"] == "points":
        return {"shape": list(point_features(run, split, device="cpu").shape)}
    return {"shape": list(view_features(run, split, 2, device="cpu").shape)}


def _case_evaluate(a: dict) -> dict:
    from xmodal.eval.config import EvaluateConfig
    from xmodal.eval.runner import evaluate

    m = evaluate(EvaluateConfig(run=a["run"], data=a["data"], out=a["out"], tasks=["retrieval"], views=[1],
                                device="cpu"), progress=False)
    return {"retrieval3d.top1": m.get("retrieval3d.top1")}


CASES = {"mesh-prepare": _case_mesh_prepare, "mesh-stages": _case_mesh_stages, "prepare": _case_prepare,
         "pretrain": _case_pretrain, "features": _case_features, "evaluate": _case_evaluate}


def child(case: str, args: dict) -> dict:
    """Run one case in this (fresh) process; its peaks, seconds and result."""
    sampler = ChildPeaks()
    sampler.start()
    t0 = time.perf_counter()
    result = CASES[case](args)
    seconds = time.perf_counter() - t0
    return {"peak_mb": own_peak() / MB, "workers_mb": sampler.stop() / MB, "seconds": seconds, **result}


# --------------------------------------------------------------------------- the table (parent)


def spawn(case: str, **kw) -> dict:
    """One measurement in a fresh interpreter (single-threaded BLAS, one llvmpipe thread)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", case, "--child-args", json.dumps(kw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} {kw} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(what: str, n: object, r: dict) -> None:
    workers = f"{r['workers_mb']:.0f}" if r.get("workers_mb") else "-"
    print(f"{what:<34}{str(n):>10}{r['peak_mb']:>11.0f}{workers:>12}{r['seconds']:>9.1f}", flush=True)


def run_mesh(tmp: Path, faces: int, formats: list[str]) -> None:
    for fmt in formats:
        path = mesh_folder(tmp / "meshes", faces, fmt)
        size = path.stat().st_size / MB
        r = spawn("mesh-prepare", source=str(path.parent.parent), out=str(tmp / "mesh_store"))
        _row(f"prepare 1 mesh ({fmt}, {size:.0f} MB), 224 px x 12", f"{faces / 1e6:.1f}M f", r)
        if r["failed"]:
            print(f"    failed: {r['failed']}")
        if fmt == formats[0]:
            s = spawn("mesh-stages", path=str(path))
            print(f"    stages above the memory held before each (MB): read {s['read_mb']:.0f}, Mesh "
                  f"{s['mesh_mb']:.0f}, sample {s['sample_mb']:.0f}, render {s['render_mb']:.0f} "
                  f"({s['faces']:,} faces, {s['vertices']:,} vertices)")
        shutil.rmtree(tmp / "meshes")
        shutil.rmtree(tmp / "mesh_store", ignore_errors=True)


def run_scan(tmp: Path, face_counts: list[int], fmt: str = "ply") -> None:
    """Peak of ``prepare`` of one mesh against its size, beside ``mesh_limit``'s estimate."""
    from xmodal.data.mesh_limit import estimate_peak_bytes, mesh_counts

    rows = []
    for faces in face_counts:
        path = mesh_folder(tmp / "scan", faces, fmt)
        nv, nf, text = mesh_counts(path)
        r = spawn("mesh-prepare", source=str(path.parent.parent), out=str(tmp / "scan_store"), max_faces=nf)
        shutil.rmtree(tmp / "scan")
        shutil.rmtree(tmp / "scan_store", ignore_errors=True)
        rows.append((nf, r["peak_mb"]))
        print(f"  {fmt} {nf:>11,} faces {nv:>11,} vertices: peak {r['peak_mb'] / 1024:6.2f} GiB "
              f"({r['peak_mb'] * MB / nf:.0f} B/face), estimate {estimate_peak_bytes(nv, nf, text=text) / 2**30:6.2f} "
              f"GiB, {r['seconds']:.0f} s", flush=True)
    if len(rows) > 1:
        f, m = np.array(rows, dtype=np.float64).T
        slope, icpt = np.polyfit(f, m * MB, 1)
        print(f"  fitted: peak = {icpt / MB:.0f} MB + {slope:.0f} bytes per face")


#: the measurements of (c), in order (``--only`` picks some)
OBJECT_CASES = ("prepare", "pretrain", "points", "views", "evaluate")


def run_objects(tmp: Path, n: int, only: tuple[str, ...] = OBJECT_CASES) -> None:
    data = synthetic_store(tmp / f"store{n}", n)
    for workers in (1, 2) if "prepare" in only else ():
        r = spawn("prepare", n=n, out=str(tmp / f"prep{n}"), workers=workers)
        _row(f"prepare points, 2 views, workers {workers}", n, r)
        shutil.rmtree(tmp / f"prep{n}")
    for workers in (0, 1) if "pretrain" in only else ():
        r = spawn("pretrain", data=str(data), out=str(tmp / f"run{n}_{workers}"), workers=workers)
        _row(f"pretrain smoke, data.workers {workers}", n, r)
    if "points" in only:
        _row("point_features (test split)", n, spawn("features", data=str(data), what="points"))
    if "views" in only:
        _row("view_features, 2 views (test split)", n, spawn("features", data=str(data), what="views"))
    if "evaluate" in only:
        run = tmp / f"run{n}_0"
        if not run.is_dir():  # evaluate needs a run folder: a short smoke run
            spawn("pretrain", data=str(data), out=str(run), workers=0)
        r = spawn("evaluate", run=str(run), data=str(data), out=str(tmp / f"rep{n}"))
        _row("evaluate --task retrieval", n, r)
    for p in (data, tmp / f"run{n}_0", tmp / f"run{n}_1", tmp / f"rep{n}"):
        shutil.rmtree(p, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", type=float, default=2e6, help="faces of the generated mesh of (a)")
    ap.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=["ply"], help="file formats of (a)")
    ap.add_argument("--objects", type=int, nargs="+", default=[1000, 10000], help="object counts of (c)")
    ap.add_argument("--only", nargs="+", choices=OBJECT_CASES, default=list(OBJECT_CASES),
                    help="measurements of (c) to run")
    ap.add_argument("--scan", action="store_true", help="run (b)")
    ap.add_argument("--scan-faces", type=float, nargs="+", default=[2e6, 8e6, 16e6])
    ap.add_argument("--skip-mesh", action="store_true")
    ap.add_argument("--skip-objects", action="store_true")
    ap.add_argument("--tmp", default=None, help="folder for the generated data (deleted afterwards)")
    ap.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.child_args))))
        return 0
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="xmodal_membench_", dir=args.tmp))
    try:
        print(f"{'what':<34}{'size':>10}{'peak MiB':>11}{'worker MiB':>12}{'seconds':>9}")
        print("-" * 76)
        if not args.skip_mesh:
            run_mesh(tmp, int(args.faces), args.formats)
        if args.scan:
            run_scan(tmp, [int(f) for f in args.scan_faces])
        if not args.skip_objects:
            for n in args.objects:
                run_objects(tmp, n, tuple(args.only))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
