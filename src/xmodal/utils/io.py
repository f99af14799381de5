"""Small I/O helpers shared by every stage: atomic writes and JSON.

Every file xmodal writes goes through :func:`atomic_write` (or the helpers
built on it): the content lands in a temporary file in the same folder and is
moved into place with ``os.replace``, so a killed job never leaves a file that
looks complete but is not. When the write fails (disk full, I/O error, no
permission) the temporary file is removed, the previous version of the file is
left as it was, and :class:`~xmodal.errors.WriteError` names the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from xmodal.errors import DataError, WriteError, XmodalError

__all__ = ["atomic_write", "atomic_path", "write_json", "read_json", "append_jsonl", "read_jsonl"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    Use it for libraries that want a file name (h5py, safetensors, matplotlib).
    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, XmodalError):
            raise _write_error(path, exc) from exc
        raise


def _write_error(path: Path, exc: OSError) -> WriteError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    kept = "its previous version is unchanged" if path.exists() else "nothing was written"
    return WriteError(f"could not be written ({reason}); {kept}", path=path,
                      hint="free some space or fix the permissions, then run the same command again")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file for writing; it replaces ``path`` only on success."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Atomically write ``obj`` as JSON."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=indent, sort_keys=False, default=_json_default)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc})", path=path) from exc


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (flushed; a torn last line is skipped by :func:`read_jsonl`)."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")
            fh.flush()
    except OSError as exc:
        raise _write_error(Path(path), exc) from exc


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, ignoring a torn (partially written) final line."""
    out = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"line {i + 1} is not valid JSON", path=path)
    return out


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
