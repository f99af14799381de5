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
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from xmodal.errors import DataError, WriteError, XmodalError

__all__ = [
    "atomic_write", "atomic_path", "write_json", "read_json", "append_jsonl", "read_jsonl", "os_error_text",
]


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


def _file_in_the_way(path: Path) -> "Path | None":
    """The nearest existing ancestor of ``path`` when it is not a folder (a file blocks ``path``)."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def os_error_text(exc: OSError, path: "str | os.PathLike | None" = None) -> str:
    """``"<file>: <problem>"`` for an :class:`OSError` about ``path`` (default: ``exc.filename``).

    When a file sits where a folder of the path should be (``ENOTDIR``, ``EEXIST`` from a
    ``mkdir``), that file is the one named: ``"a/file: is a file, not a folder (needed for a/file/sub)"``.
    """
    target = Path(os.fsdecode(path if path is not None else exc.filename))
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(target) if exc.errno == errno.ENOTDIR or not target.is_dir() else None
        if blocker is None and exc.errno == errno.EEXIST and target.exists() and not target.is_dir():
            blocker = target
        if blocker is not None:
            needed = "" if blocker == target else f" (needed for {target})"
            return f"{blocker}: is a file, not a folder{needed}"
    return f"{target}: {exc.strerror or exc}"


def _write_error(path: Path, exc: OSError) -> WriteError:
    kept = "its previous version is unchanged" if path.exists() else "nothing was written"
    blocker = _file_in_the_way(path)
    if blocker is not None:
        return WriteError(f"cannot be written: {blocker} is a file, not a folder; {kept}", path=path,
                          hint="choose an output path that is not inside a file")
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space, then run the same command again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "fix the permissions (or choose another output), then run the same command again"
    else:
        hint = "check the disk and the output path, then run the same command again"
    return WriteError(f"could not be written ({reason}); {kept}", path=path, hint=hint)


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
    """The JSON value in ``path``.

    Raises:
        DataError: naming the file: not UTF-8, not valid JSON, or nested too deeply to parse.
        OSError: the file cannot be opened (missing, a folder, no permission).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    return _parse_json(raw, path)


def _parse_json(raw: "bytes | str", path: Path, where: str = "") -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}not UTF-8 text (byte {exc.start})", path=path) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}not valid JSON ({exc})", path=path) from None
    except RecursionError:
        raise DataError(f"{where}JSON nested too deeply to read", path=path) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise DataError(f"{where}not readable JSON ({exc})", path=path) from None


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (flushed; a torn last line is skipped by :func:`read_jsonl`)."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")
            fh.flush()
    except OSError as exc:
        raise _write_error(Path(path), exc) from exc


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, ignoring a torn (partially written) final line.

    Raises:
        DataError: naming the file and line: a line other than the last is not a JSON object.
    """
    out = []
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = _parse_json(line, Path(path), f"line {i + 1}: ")
            if not isinstance(record, dict):
                raise DataError(f"line {i + 1}: expected a JSON object, got {type(record).__name__}", path=path)
        except DataError:
            if i == len(lines) - 1:  # torn by a killed writer
                break
            raise
        out.append(record)
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
