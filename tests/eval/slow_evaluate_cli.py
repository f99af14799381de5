"""``xmodal`` (the real CLI) for the signal tests of ``evaluate``, without a pre-training run.

``load_run`` returns the ``smoke`` architecture at random initialisation (seed 0, 48 points): the
same weights in every process. Before each task the runner sleeps ``$XMODAL_TEST_SLOW`` seconds,
then waits (up to 120 s) while the file ``$XMODAL_TEST_HOLD`` exists, so that a test can signal
the job while a task runs however slowly the machine starts other processes; the tasks named in
``$XMODAL_TEST_FORBID`` (comma-separated) fail if they are evaluated.
"""

from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__":
    import xmodal.api as api
    import xmodal.eval.runner as runner
    from xmodal.cli import main
    from xmodal.train.config import resolve_pretrain_config

    api.load_run = lambda run, device="cpu", **kw: api.random_init_run(
        resolve_pretrain_config("smoke", ["data.num_points=48"]), seed=0, device=device)
    real_run_task = runner._run_task
    forbidden = set(filter(None, os.environ.get("XMODAL_TEST_FORBID", "").split(",")))

    def slow_run_task(ctx, task):
        if task.name in forbidden:
            raise AssertionError(f"{task.name} was evaluated again")
        time.sleep(float(os.environ.get("XMODAL_TEST_SLOW", "0")))
        hold, until = os.environ.get("XMODAL_TEST_HOLD", ""), time.monotonic() + 120
        while hold and os.path.exists(hold) and time.monotonic() < until:
            time.sleep(0.05)
        return real_run_task(ctx, task)

    runner._run_task = slow_run_task
    sys.exit(main(sys.argv[1:]))
