"""Objects that kill the process preparing them: a crash in native code, the out-of-memory killer.

A Python exception while preparing an object fails that object only (:mod:`xmodal.data.prepare`).
A process that dies does not get that far: a pool worker's death breaks the pool and stops the job,
and with one worker the job itself dies; run again, the same object would kill it again. So that
such an object is reported and skipped like any broken file:

* before each object, the process preparing it names it in a marker, ``failed/.inflight-<pid>.json``
  (:class:`InFlight`); the marker goes when the process's chunk ends, whichever way it ends short
  of the process dying;
* markers found when a job starts (it holds the output's lock; on Linux the workers of a killed job
  die with it, elsewhere they stop between two objects) or left when a pool broke name the
  *suspects*: each was being prepared when some process died, which
  does not make it the cause (a worker beside the one that died, a job killed from outside).
  ``prepare`` prepares each suspect again alone, in a fresh process; one that kills that process
  too is recorded in ``failed/crashed.json`` (:func:`record_crash`) with the size and modification
  time of its file; a suspect without an answer (a stop meanwhile, a process that could not start
  on it) keeps its marker for the next run;
* chunks built later list a recorded object as failed without touching it
  (:func:`crash_reason`), until its file changes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, Optional

from xmodal.data.types import Item
from xmodal.utils.io import read_json, write_json

__all__ = ["InFlight", "find_suspects", "drop_markers", "read_crashes", "record_crash", "crash_reason",
           "describe_exit", "file_stat", "CRASHED_NAME"]

log = logging.getLogger(__name__)

#: the record of objects that killed the process preparing them, in ``OUT/failed/``
CRASHED_NAME = "crashed.json"
_MARKER_PREFIX = ".inflight-"


def file_stat(path) -> Optional[list[int]]:
    """``[size, modification time in ns]`` of a file, None when it cannot be read (missing)."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


class InFlight:
    """The marker of the object this process is preparing (see the module doc).

    ``with InFlight(out) as mark: mark(split, chunk, item)`` before each object; leaving the block
    (normally or by an exception) removes the marker.
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / "failed" / f"{_MARKER_PREFIX}{os.getpid()}.json"

    def __enter__(self) -> "InFlight":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self

    def __call__(self, split: str, chunk: int, item: Item) -> None:
        # a plain write, not an atomic one: it runs once per object, and a marker cut short by
        # the death it is there for is read as no marker (find_suspects removes what it cannot parse)
        self.path.write_text(json.dumps({"split": split, "chunk": int(chunk), "id": item.id, "path": item.path}))

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def find_suspects(out: Path) -> list[dict]:
    """The objects named by markers in ``out/failed`` (``{"split", "chunk", "id", "path",
    "markers"}``, in id order, one per object; ``markers``: the files naming it, for
    :func:`drop_markers` once the object is settled). Unreadable markers (cut short by the death
    they are there for) are removed. Only for a caller whose own processes are not preparing
    anything (it holds the output's lock and its workers have stopped)."""
    found: dict[tuple, dict] = {}
    folder = Path(out) / "failed"
    for marker in sorted(folder.glob(_MARKER_PREFIX + "*.json")) if folder.is_dir() else []:
        try:
            rec = json.loads(marker.read_text())
            key = (str(rec["split"]), str(rec["id"]))
        except (OSError, ValueError, KeyError, TypeError):
            log.debug("removing an unreadable marker %s", marker)
            marker.unlink(missing_ok=True)
            continue
        found.setdefault(key, {**rec, "markers": []})["markers"].append(str(marker))
    return [found[k] for k in sorted(found)]


def drop_markers(suspect: dict) -> None:
    """Remove the markers that named ``suspect`` (a :func:`find_suspects` entry)."""
    for marker in suspect.get("markers", []):
        Path(marker).unlink(missing_ok=True)


def read_crashes(out: Path) -> dict[str, dict]:
    """``{object id: record}`` of ``out/failed/crashed.json`` ({} when there is none)."""
    path = Path(out) / "failed" / CRASHED_NAME
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except ValueError:
        log.warning("%s is damaged: objects recorded there will be tried again", path)
        return {}
    return data if isinstance(data, dict) else {}


def describe_exit(exitcode: Optional[int]) -> str:
    """How a process ended, in words (``exitcode`` of :class:`multiprocessing.Process`)."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = " (the out-of-memory killer sends it)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{why}"
    return f"exited with code {exitcode} before finishing it"


def record_crash(out: Path, item: Item, exitcode: Optional[int]) -> dict:
    """Record ``item`` in ``crashed.json`` (it killed the process preparing it alone, which ended
    with ``exitcode``); returns its record."""
    rec = {
        "path": item.path,
        "reason": f"the process preparing it {describe_exit(exitcode)}, also when prepared alone: a crash in "
                  "native code or more memory than the machine has; not prepared (fix or replace the file, "
                  "then run the same command)",
        "files": {item.path: file_stat(item.path)} if item.path else {},
    }
    crashes = read_crashes(out)
    crashes[item.id] = rec
    write_json(Path(out) / "failed" / CRASHED_NAME, crashes)
    return rec


def crash_reason(crashes: dict[str, Any], item: Item) -> Optional[str]:
    """The recorded reason when ``item`` killed its process and its file has not changed since."""
    rec = crashes.get(item.id)
    if not isinstance(rec, dict):
        return None
    if any(file_stat(f) != st for f, st in (rec.get("files") or {}).items()):
        return None  # the file changed: try it again
    return str(rec.get("reason") or "killed the process preparing it")
