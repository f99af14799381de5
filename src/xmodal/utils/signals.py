"""Turning SIGTERM / SIGINT into a stop request that a long job acts on at a safe point.

Cluster schedulers send SIGTERM (then, after a grace period, SIGKILL); a user presses Ctrl-C
(SIGINT). :class:`StopRequest` records the first such signal instead of dying mid-write, so the
job can finish its current step, save what it has and exit with ``128 + signal`` (143 for
SIGTERM, 130 for SIGINT). A second signal restores the default behaviour and re-delivers it, so
a stuck job still dies on a second Ctrl-C.

Handlers can only be installed from the main thread; elsewhere (a job run from a worker thread)
:class:`StopRequest` is inert.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Optional

__all__ = ["STOP_SIGNALS", "StopRequest", "die_with_parent", "ignore_stop_signals"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager: while active, the first SIGTERM/SIGINT sets :attr:`signum` instead of stopping.

    ``until`` names, in the warning logged on the first signal, what the job finishes before it stops.
    """

    def __init__(self, signals=STOP_SIGNALS, *, until: str = "the current step") -> None:
        self.signals = tuple(signals)
        self.until = until
        self.signum: Optional[int] = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: give up waiting, act as if we were not here
            self._restore()
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        log.warning("%s received: stopping after %s (send it again to stop at once)",
                    signal.Signals(signum).name, self.until)

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def ignore_stop_signals(*_args) -> None:
    """For worker processes (``worker_init_fn``): leave SIGTERM/SIGINT to the main process.

    A signal sent to the whole process group (Ctrl-C, a scheduler) must not kill the data-loading
    workers before the main process has saved its state; they stop when the main process shuts
    them down or exits.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


#: ``prctl`` option asking the kernel to signal a process when its parent dies (Linux)
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Have the kernel kill this process (SIGKILL) when its parent dies, as a worker whose
    parent was killed with ``kill -9`` must not live on idle. Linux only (``prctl``); elsewhere,
    and where ``prctl`` is unavailable, nothing is done and False is returned.

    ``parent_pid`` is the parent the caller expects: should it have died before the request
    took effect, this process exits at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # only here: a worker process on Linux

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if ok and os.getppid() != parent_pid:  # the parent died before the request
        os._exit(1)
    return ok
