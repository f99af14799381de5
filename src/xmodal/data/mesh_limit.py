"""How large a mesh file is before it is read, and the limit ``prepare`` puts on it.

Reading, validating, sampling and rendering one mesh needs memory in proportion to its size,
and the whole mesh at once (the renderer draws every face into each view; sampling weighs
every face by its area). Peak resident set of one process preparing one object (224 px, 12
views, 2,048 points, llvmpipe; ``benchmarks/memory_bench.py --formats ... --scan ...``; a
process preparing a 2,000-face mesh peaks at 0.2 GiB):

=========================  ======  ========  ======  =========  ===============
mesh (a torus)             faces   vertices  file    peak       this estimate
=========================  ======  ========  ======  =========  ===============
binary PLY                 2 M     1 M       38 MB   0.73 GiB   0.75 GiB
binary PLY                 8 M     4 M       152 MB  2.63 GiB   2.98 GiB
binary PLY                 16 M    8 M       304 MB  5.16 GiB   5.96 GiB
binary PLY                 32 M    16 M      608 MB  10.47 GiB  11.92 GiB
binary PLY (stages only)   48 M    24 M      912 MB  16.0 GiB   17.88 GiB
PLY, 3 vertices per face   2 M     6 M       98 MB   1.31 GiB   1.68 GiB
binary STL (the same)      2 M     6 M       100 MB  1.29 GiB   1.68 GiB
OFF (text)                 2 M     1 M       74 MB   1.08 GiB   1.12 GiB
OBJ (text)                 2 M     1 M       76 MB   0.66 GiB   1.12 GiB
=========================  ======  ========  ======  =========  ===============

So about 350 bytes per face for a mesh with shared vertices: some 70 M faces fit in 24 GiB,
about half as many for a triangle soup (three vertices of its own per face). ("stages only":
reading, validating, sampling and rendering one after another in one process, not through
``prepare``.) No OpenGL limit was met first: the 48 M-face mesh (a 576 MB
index buffer) renders on llvmpipe; OpenGL's own bound is the 32-bit index count of one draw
call (~715 M faces), far beyond the memory such a mesh needs. Memory is therefore the limit,
and it is checked before the file is read: :func:`estimate_peak_bytes` (above every
measurement: :data:`BYTES_PER_FACE` per face plus :data:`BYTES_PER_VERTEX` per vertex, times
:data:`TEXT_FACTOR` for text formats, whose parsing holds every number as a Python string)
against the memory one worker may use. Processing a mesh in parts would not lower the peak
much: its largest part is holding and reading the arrays themselves.

:func:`mesh_counts` reads ``(vertices, faces)`` from the file's header (OFF, PLY, binary
STL) or by counting its lines (OBJ, ASCII STL) without parsing the mesh; GLB / glTF give no
count, and are checked on their arrays once read (:meth:`MeshLimit.check`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from xmodal.errors import MeshError

__all__ = [
    "BYTES_PER_FACE",
    "BYTES_PER_VERTEX",
    "TEXT_FACTOR",
    "PROCESS_BYTES",
    "mesh_counts",
    "estimate_peak_bytes",
    "available_memory",
    "MeshLimit",
    "MeshTooLarge",
]

log = logging.getLogger(__name__)

GiB = float(1 << 30)
#: peak bytes per face and per vertex of one mesh object (module doc: 3-30 % above the
#: measured peaks of binary formats, which include the process's own 0.2 GiB)
BYTES_PER_FACE = 300
BYTES_PER_VERTEX = 200
#: text formats (OFF, OBJ, ASCII PLY and STL) need this much more while they are parsed
TEXT_FACTOR = 1.5
#: resident set of a prepare worker before its first object (imports, OpenGL context)
PROCESS_BYTES = 300 << 20
#: bytes read at once when counting the lines of a text file
_BLOCK = 1 << 24
_HEAD = 1 << 16


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(_HEAD)


def _count_tokens(path: Path, tokens: tuple[bytes, ...]) -> list[int]:
    """Occurrences of each token in the file, read block by block (tokens may span blocks)."""
    counts = [0] * len(tokens)
    keep = max(len(t) for t in tokens) - 1
    tail = b"\n"  # a token at the very start of the file counts as at a line start
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_BLOCK)
            if not block:
                return counts
            data = tail + block
            for i, t in enumerate(tokens):
                counts[i] += data.count(t)
            tail = data[-keep:]


def _off_counts(path: Path) -> Optional[tuple[int, int, bool]]:
    text = re.sub(rb"#[^\n]*", b"", _head(path).removeprefix(b"\xef\xbb\xbf"))  # a byte-order mark, as read_off
    m = re.match(rb"\s*(?:ST)?C?N?OFF", text)
    words = text[m.end() if m else 0 :].split()
    return int(words[0]), int(words[1]), True


def _ply_counts(path: Path) -> Optional[tuple[int, int, bool]]:
    head = _head(path)
    if b"end_header" not in head:
        return None
    lines = head.split(b"end_header")[0].decode("ascii", "replace").splitlines()
    elements = {w[1]: int(w[2]) for w in (ln.split() for ln in lines) if len(w) == 3 and w[0] == "element"}
    text = any(ln.split()[:2] == ["format", "ascii"] for ln in lines)
    return elements.get("vertex", 0), elements.get("face", 0), text


def _stl_counts(path: Path) -> Optional[tuple[int, int, bool]]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(84)
    if len(head) == 84 and 84 + 50 * int.from_bytes(head[80:84], "little") == size:
        faces = int.from_bytes(head[80:84], "little")
        return 3 * faces, faces, False  # STL stores three corners per face (a triangle soup)
    faces = _count_tokens(path, (b"endfacet",))[0]
    return 3 * faces, faces, True


def _obj_counts(path: Path) -> Optional[tuple[int, int, bool]]:
    v, f = _count_tokens(path, (b"\nv ", b"\nf "))
    return v, f, True


#: the fewest bytes a vertex and a face take, in text ("0 0 0\n", "3 0 1 2\n") and in binary
#: (three 1-byte coordinates; a 1-byte count and three 1-byte indices): below them a header's
#: counts cannot be the file's
_MIN_BYTES = {True: (6, 8), False: (3, 4)}

_READERS = {".off": _off_counts, ".ply": _ply_counts, ".stl": _stl_counts, ".obj": _obj_counts}


def mesh_counts(path: "str | os.PathLike") -> Optional[tuple[int, int, bool]]:
    """``(vertices, faces, is_text)`` of a mesh file from its header or line counts, without
    reading the mesh; None when the format gives none (GLB, glTF) or the header cannot be
    read (the reader then reports the problem). OFF and OBJ count polygons: a mesh of
    quads holds twice as many triangles."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None or not path.is_file():
        return None
    try:
        return reader(path)
    except (OSError, ValueError, IndexError):
        return None


def estimate_peak_bytes(vertices: int, faces: int, *, text: bool = False) -> int:
    """Peak bytes of reading, validating, sampling and rendering a mesh of that size (module doc)."""
    need = BYTES_PER_FACE * int(faces) + BYTES_PER_VERTEX * int(vertices)
    return int(need * (TEXT_FACTOR if text else 1.0))


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):  # absent, or "max" (no cgroup limit)
        return None


def available_memory() -> Optional[int]:
    """Bytes this process may still allocate: the kernel's ``MemAvailable``, or less where a
    cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) limits the process; None where
    neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < (1 << 60):
            found.append(max(lim - use, 0))
    return min(found) if found else None


class MeshTooLarge(MeshError):
    """A mesh over the size limit of this job (:class:`MeshLimit`): a matter of the machine and
    the settings, not of the file, so ``prepare`` tries it again on a run whose limit would take
    it. ``need``: the bytes it was estimated to need, when the limit was the memory's (else None)."""

    def __init__(self, path, reason: str, need: Optional[int] = None) -> None:
        super().__init__(path, reason)
        self.need = None if need is None else int(need)


@dataclass(frozen=True)
class MeshLimit:
    """The largest mesh one ``prepare`` worker takes on.

    ``max_faces > 0``: meshes with more faces fail (the user's limit; memory unchecked).
    Otherwise ``memory`` (bytes, None: unchecked) bounds :func:`estimate_peak_bytes`;
    ``origin`` says where that figure comes from, for the failure message.
    """

    max_faces: int = 0
    memory: Optional[int] = None
    origin: str = ""

    @classmethod
    def for_workers(cls, max_faces: int, workers: int) -> "MeshLimit":
        """``max_faces`` when > 0; else each of ``workers`` processes' share of the memory
        available now, less :data:`PROCESS_BYTES` for the process itself."""
        return cls.sharing(max_faces, workers, available_memory() if max_faces <= 0 else None)

    @classmethod
    def sharing(cls, max_faces: int, workers: int, avail: Optional[int]) -> "MeshLimit":
        """:meth:`for_workers` with the available memory given (bytes; None: unknown), so that
        limits for several worker counts can share one reading of it."""
        if max_faces > 0:
            return cls(max_faces=int(max_faces))
        if avail is None:
            return cls()
        workers = max(int(workers), 1)
        share = max(avail // workers - PROCESS_BYTES, 0)
        origin = (f"{avail / GiB:.1f} GiB available when prepare started, shared by {workers} "
                  f"worker{'s' if workers > 1 else ''}, less {PROCESS_BYTES / GiB:.1f} GiB per worker")
        return cls(memory=share, origin=origin)

    def describe(self) -> str:
        if self.max_faces:
            return f"at most {self.max_faces:,} faces per mesh (max_faces)"
        if self.memory is not None:
            return f"meshes needing at most {self.memory / GiB:.1f} GiB ({self.origin})"
        return "no mesh size limit (available memory unknown)"

    def check(self, path, vertices: int, faces: int, *, text: bool = False) -> None:
        """Raise :class:`MeshError` naming the mesh's size and the limit when it exceeds it."""
        if self.max_faces:
            if faces > self.max_faces:
                raise MeshTooLarge(path, f"{faces:,} faces, more than max_faces={self.max_faces:,}; not prepared "
                                      "(raise max_faces to prepare it)")
            return
        need = estimate_peak_bytes(vertices, faces, text=text)
        if self.memory is not None and need > self.memory:
            raise MeshTooLarge(
                path,
                f"{faces:,} faces and {vertices:,} vertices need about {need / GiB:.1f} GiB to read, sample and "
                f"render, more than the {self.memory / GiB:.1f} GiB one worker may use ({self.origin}); "
                "not prepared (free memory, use fewer workers, or set max_faces to take it on anyway)",
                need=need,
            )

    def check_file(self, path) -> None:
        """:meth:`check` on the counts :func:`mesh_counts` reads from the file, before it is read
        (nothing when the format gives no count). A header that declares more than the file's
        size can hold is a truncated (or corrupt) file, not a large mesh: a :class:`MeshError`
        that says so."""
        counts = mesh_counts(path)
        if counts is None:
            return
        v, f, text = counts
        per_v, per_f = _MIN_BYTES[bool(text)]
        least, size = per_v * v + per_f * f, Path(path).stat().st_size
        if least > size:
            raise MeshError(path, f"truncated or corrupt: the header declares {v:,} vertices and {f:,} faces, at least "
                                  f"{least:,} bytes, and the file has {size:,}")
        self.check(path, v, f, text=text)
