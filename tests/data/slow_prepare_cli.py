"""``xmodal`` (the real CLI) with every object of a source slowed down, for the signal tests.

Usage: ``python slow_prepare_cli.py prepare --source builtin:shapes?... --out ...``. Each object's
``load`` first sleeps ``$XMODAL_TEST_SLOW`` seconds, in the main process and in the spawned
worker processes alike (they import this module to unpickle the source), so that a test can
signal a job in the middle of its work.
"""

from __future__ import annotations

import os
import sys
import time

from xmodal.data.types import Source


class SlowSource(Source):
    """Another source's objects, each ``load`` delayed by ``$XMODAL_TEST_SLOW`` seconds."""

    def __init__(self, inner: Source) -> None:
        super().__init__()
        self.inner = inner
        self.kind, self.up_axis = inner.kind, inner.up_axis
        self.items, self.classes, self.part_names = inner.items, inner.classes, inner.part_names

    def load(self, item):
        time.sleep(float(os.environ.get("XMODAL_TEST_SLOW", "0")))
        return self.inner.load(item)

    def describe(self) -> dict:
        return self.inner.describe()


if __name__ == "__main__":
    import xmodal.data.sources as sources
    from xmodal.cli import main

    real = sources.open_source
    sources.open_source = lambda spec, **kw: SlowSource(real(spec, **kw))
    sys.exit(main(sys.argv[1:]))
