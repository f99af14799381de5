"""The demo: prepare -> pretrain -> evaluate on the built-in shapes, on CPU.

``xmodal demo --out DIR`` writes ``DIR/data`` (the dataset), ``DIR/run`` (the pre-training
run) and ``DIR/report`` (metrics.json, report.md, figures). Every stage resumes: running the
command again after an interruption continues where it stopped, and a finished stage is
skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

__all__ = ["demo", "DEMO_SOURCE"]

#: the demo's dataset: 12+ classes, 24 train + 8 test objects per class
DEMO_SOURCE = "builtin:shapes?train=24&test=8"


def demo(
    out,
    *,
    workers: int = 2,
    iterations: int | None = None,
    seed: int = 0,
    progress: bool = True,
    source: str = DEMO_SOURCE,
    views: int = 12,
    points: int = 512,
    image_size: int = 64,
    preset: str = "demo",
    overrides: Sequence[str] = (),
    tasks: Sequence[str] = ("all",),
    partseg_kwargs: dict | None = None,
) -> Path:
    """Run the whole pipeline on the built-in shapes; returns the path of ``report.md``.

    The defaults take a few minutes on 2 CPU cores; tests call it with smaller sizes.
    """
    from xmodal.data.prepare import prepare
    from xmodal.eval.runner import evaluate
    from xmodal.train.config import resolve_pretrain_config
    from xmodal.train.trainer import pretrain

    out = Path(out)
    data, run, report = out / "data", out / "run", out / "report"

    log.info("demo 1/3: preparing %s -> %s", source, data)
    prepare(
        source, data, views=views, points=points, image_size=image_size, workers=workers, seed=seed, progress=progress
    )

    ov = [f"seed={seed}", *overrides]
    if iterations is not None:
        ov.append(f"iterations={iterations}")
    if (run / "encoders.json").exists():
        log.info("demo 2/3: pre-training already finished in %s", run)
    else:
        resume = (run / "checkpoints").is_dir()
        cfg = resolve_pretrain_config(preset, ov, run=run, resume=resume)
        log.info("demo 2/3: pre-training (%d iterations) -> %s", cfg.iterations, run)
        pretrain(data, run, cfg, resume=resume, progress=progress)

    log.info("demo 3/3: evaluating -> %s", report)
    ps = {"epochs": 5, "num_points": min(points, 256), "batch_size": 16}
    ps.update(partseg_kwargs or {})
    evaluate(
        run,
        data,
        tasks=tuple(tasks),
        out=report,
        baseline="random",
        seed=seed,
        views=(1, 4, 8, 12),
        partseg_kwargs=ps,
        # the demo's test split has 8 objects per class: too few for CrossPoint's 10/20-shot
        # episodes with 20 queries, so the demo runs 1- and 5-shot episodes with 3 queries
        fewshot_settings=((5, 1), (5, 5)),
        fewshot_query=3,
        progress=progress,
    )
    return report / "report.md"
