"""The demo: prepare -> pretrain -> evaluate on the built-in shapes, on CPU.

``xmodal demo --out DIR`` writes ``DIR/data`` (the dataset), ``DIR/run`` (the pre-training
run), ``DIR/report`` (metrics.json, report.md, figures) and ``DIR/demo.yaml`` (its
:class:`~xmodal.demo_config.DemoConfig`). Every stage resumes: running the command again after
an interruption continues where it stopped, and a finished stage is skipped.

>>> from xmodal.demo import demo
>>> from xmodal.demo_config import DemoConfig
>>> report = demo(DemoConfig(out="demo_out"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from xmodal.config import save_config
from xmodal.data.prepare_config import PrepareConfig
from xmodal.demo_config import DEMO_SOURCE, DemoConfig
from xmodal.eval.config import EvaluateConfig

log = logging.getLogger(__name__)

__all__ = ["demo", "prepare_config", "evaluate_config", "pretrain_overrides", "DEMO_SOURCE", "CONFIG_NAME"]

#: the demo's resolved config, written in its output folder
CONFIG_NAME = "demo.yaml"


def prepare_config(cfg: DemoConfig) -> PrepareConfig:
    """The demo's dataset: ``OUT/data``."""
    return PrepareConfig(
        source=cfg.source, out=str(Path(cfg.out) / "data"), views=cfg.views, points=cfg.points,
        image_size=cfg.image_size, workers=cfg.workers, seed=cfg.seed,
    )


def pretrain_overrides(cfg: DemoConfig) -> list[str]:
    """``key=value`` overrides of the pretrain preset: the seed, the iterations, then the user's."""
    ov = [f"seed={cfg.seed}", *cfg.pretrain_overrides]
    if cfg.iterations is not None:
        ov.append(f"iterations={cfg.iterations}")
    return ov


def evaluate_config(cfg: DemoConfig) -> EvaluateConfig:
    """The demo's evaluation: ``OUT/run`` on ``OUT/data`` into ``OUT/report``, with the random-init baseline."""
    out = Path(cfg.out)
    partseg = cfg.partseg
    if partseg.num_points is not None:
        partseg = dataclasses.replace(partseg, num_points=min(cfg.points, partseg.num_points))
    return EvaluateConfig(
        run=str(out / "run"), data=str(out / "data"), out=str(out / "report"), tasks=list(cfg.tasks),
        baseline="random", seed=cfg.seed, views=list(cfg.eval_views), svm=cfg.svm, fewshot=cfg.fewshot,
        partseg=partseg,
    )


def demo(cfg: DemoConfig, *, progress: bool = True) -> Path:
    """Run the whole pipeline on the built-in shapes; returns the path of ``report.md``.

    The defaults take a few minutes on 2 CPU cores; tests run it with smaller sizes.
    """
    from xmodal.data.prepare import prepare
    from xmodal.eval.runner import evaluate
    from xmodal.train.config import resolve_pretrain_config
    from xmodal.train.trainer import pretrain

    cfg.validate()
    cfg.require_paths()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_NAME)
    data, run = out / "data", out / "run"

    log.info("demo 1/3: preparing %s -> %s", cfg.source, data)
    prepare(prepare_config(cfg), progress=progress)

    if (run / "encoders.json").exists():
        log.info("demo 2/3: pre-training already finished in %s", run)
    else:
        resume = (run / "checkpoints").is_dir()
        pcfg = resolve_pretrain_config(cfg.pretrain_preset, pretrain_overrides(cfg), run=run, resume=resume)
        log.info("demo 2/3: pre-training (%d iterations) -> %s", pcfg.iterations, run)
        pretrain(pcfg.with_paths(data=data, out=run), resume=resume, progress=progress)

    ecfg = evaluate_config(cfg)
    log.info("demo 3/3: evaluating -> %s", ecfg.out)
    evaluate(ecfg, progress=progress)
    return Path(ecfg.out) / "report.md"
