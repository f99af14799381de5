"""The error family of xmodal: every failure caused by the user's input or environment.

All of them derive from :class:`XmodalError`, so a caller (and the CLI) can tell "your file,
setting or disk is the problem" from a genuine bug with one ``except XmodalError``. Each
class also derives from the built-in exception it replaced (``ValueError``, ``RuntimeError``,
``OSError``), so code written against the built-ins keeps working.

``str(err)`` is ``"<where>: <problem>"`` when a file or object is named (``path=``), and
``err.hint`` carries an optional suggestion the CLI prints on a second line.

=====================  ==============================================================
class                  raised when
=====================  ==============================================================
``ConfigError``        a setting, preset or override is invalid
``DataError``          a dataset, source or input file cannot be used
``MeshError``          one shape file cannot be used (the job skips and lists it)
``LabelsError``        a part-labels file is inconsistent with its mesh
``StoreError``         a dataset folder or shard cannot be read
``PrepareError``       ``prepare`` cannot run as asked
``PartSegError``       part-segmentation data cannot be used
``CheckpointError``    a run folder, checkpoint or encoder file is unusable
``TrainingDiverged``   the loss became NaN/inf (the last good checkpoint stays)
``OutputExistsError``  the output already holds something that would be overwritten
``MissingInputError``  a file or folder the user named does not exist
``OutputLockedError``  another live process is writing the same output folder
``WriteError``         a file could not be written (disk full, permission, I/O error)
``Interrupted``        a job stopped on SIGTERM/SIGINT after saving its state
``MissingPackageError``  an optional package a setting needs is not installed
=====================  ==============================================================
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = [
    "XmodalError",
    "ConfigError",
    "DataError",
    "MeshError",
    "LabelsError",
    "StoreError",
    "PrepareError",
    "PartSegError",
    "CheckpointError",
    "TrainingDiverged",
    "OutputExistsError",
    "MissingInputError",
    "OutputLockedError",
    "WriteError",
    "Interrupted",
    "MissingPackageError",
]


class XmodalError(Exception):
    """Base of every error caused by the user's input or environment.

    Args:
        message: what is wrong.
        path: the file, folder or object concerned; when given, ``str(err)`` starts with it.
        hint: an optional suggestion of how to fix it (printed by the CLI on its own line).
    """

    def __init__(self, message: str = "", *, path: "str | os.PathLike | None" = None, hint: Optional[str] = None):
        self.path = None if path is None else os.fspath(path)
        self.hint = hint
        self.problem = str(message)
        super().__init__(f"{self.path}: {self.problem}" if self.path is not None else self.problem)


class ConfigError(XmodalError, ValueError):
    """A configuration value, key, preset or override is invalid."""


class DataError(XmodalError, ValueError):
    """A dataset, source or input file that cannot be used."""


class MeshError(DataError):
    """A shape file that cannot be used. ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path, reason: str, *, hint: Optional[str] = None):
        self.reason = reason
        super().__init__(reason, path=path, hint=hint)


class LabelsError(MeshError):
    """A part-labels file that does not fit its mesh (missing, a face left out or listed twice, out of range)."""


class StoreError(DataError):
    """A dataset folder or shard that cannot be read (the message names the file)."""


class PrepareError(DataError):
    """``prepare`` cannot run as asked (conflicting existing output, bad settings)."""


class PartSegError(DataError):
    """Part-segmentation data that cannot be used."""


class CheckpointError(XmodalError, RuntimeError):
    """A run folder, checkpoint or encoder file that is missing, torn beyond repair, or inconsistent."""


class TrainingDiverged(XmodalError, RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""

    def __init__(self, step: int, part: str, value: float, checkpoint=None):
        self.step, self.part, self.value = step, part, value
        self.checkpoint = checkpoint
        where = f"; the last good checkpoint is {checkpoint}" if checkpoint else "; no checkpoint was written yet"
        super().__init__(
            f"training diverged at step {step}: the {part} loss is {value}{where}",
            hint="try a lower optim.lr or amp=off",
        )


class OutputExistsError(XmodalError, FileExistsError):
    """The output path already holds something (another run, a file) that would be overwritten."""


class MissingInputError(XmodalError, FileNotFoundError):
    """A file or folder the user named (a dataset, a run, a source) does not exist."""


class OutputLockedError(XmodalError, RuntimeError):
    """Another live process holds the output folder's lock."""


class WriteError(XmodalError, OSError):
    """A file could not be written; whatever was there before is left intact."""


class MissingPackageError(XmodalError, ImportError):
    """An optional package that a setting or file needs is not installed (or does not import);
    ``hint`` names what to install."""

    def __init__(self, message: str, *, package: str, hint: Optional[str] = None):
        super().__init__(message, hint=hint)
        self.package = package  # ImportError.name, too
        self.name = package


class Interrupted(XmodalError):
    """A job stopped on a signal after saving what it had; ``signum`` is the signal number."""

    def __init__(self, message: str, *, signum: int, path=None, hint: Optional[str] = None):
        self.signum = int(signum)
        super().__init__(message, path=path, hint=hint)
