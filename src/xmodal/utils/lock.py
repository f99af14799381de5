"""One writer per output folder: an OS-level lock that dies with the process holding it.

:func:`output_lock` takes an exclusive ``flock`` on ``FOLDER/.xmodal.lock`` for as long as a job
writes into the folder. A second ``prepare`` / ``pretrain`` / ``evaluate`` into the same folder is
refused at once with :class:`~xmodal.errors.OutputLockedError`, naming the process that holds it
(its pid, command and start time are written into the lock file). The operating system releases
the lock when the holder exits, however it exits (``kill -9`` included), so a stale lock file
never blocks: only a live holder does. The file itself is left in place (deleting it could let a
third process lock a file that a second one is about to lock), except in one case: a folder that
the lock created and in which the job wrote nothing (it failed on its input first) is removed
again, lock file and all, so a mistyped command leaves no empty output folder behind.

On platforms without ``fcntl`` (Windows) the lock is not taken, with a debug message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from xmodal.errors import OutputLockedError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_NAME", "output_lock"]

log = logging.getLogger(__name__)

LOCK_NAME = ".xmodal.lock"


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return "another process"
    return f"{info.get('command', 'xmodal')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('started', '?')})"


@contextlib.contextmanager
def output_lock(folder: "str | os.PathLike", command: str) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if needed) while the block runs.

    Raises:
        OutputLockedError: another live process holds it; the message names that process.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    if fcntl is None:  # pragma: no cover - Windows
        log.debug("no fcntl on this platform: %s is not locked", folder)
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputLockedError(
                f"is being written by {_holder(fd)}",
                path=folder,
                hint="wait for that job to finish (or stop it), or choose another output folder",
            ) from None
        info = {"command": f"xmodal {command}", "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode("utf-8"))
        yield path
    finally:
        if created:
            _remove_if_only_lock(folder, path)
        os.close(fd)  # releases the flock


def _remove_if_only_lock(folder: Path, lock: Path) -> None:
    """Remove ``folder`` if it holds nothing but ``lock`` (called while the lock is still held)."""
    try:
        if [p.name for p in folder.iterdir()] == [lock.name]:
            lock.unlink()
            folder.rmdir()
    except OSError:  # someone else's file appeared meanwhile, or no permission: leave it
        pass
