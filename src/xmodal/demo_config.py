"""Settings of ``xmodal demo`` (:class:`DemoConfig`): prepare -> pretrain -> evaluate on the built-in shapes.

The demo builds one config per stage from these fields — a
:class:`~xmodal.data.prepare_config.PrepareConfig`, the pretrain preset with its overrides, an
:class:`~xmodal.eval.config.EvaluateConfig` — and each stage writes its own resolved config beside
its output (``OUT/data/prepare.yaml``, ``OUT/run/config.yaml``, ``OUT/report/evaluate.yaml``);
``OUT/demo.yaml`` holds this one. The defaults take about ten minutes on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from xmodal.config import paths_to_str, require_fields
from xmodal.errors import ConfigError
from xmodal.eval.config import FewShotConfig, PartSegConfig, SvmConfig
from xmodal.eval.tasks import resolve_tasks

__all__ = ["DEMO_SOURCE", "DemoConfig"]

#: the demo's dataset: 12+ classes, 24 train + 8 test objects per class
DEMO_SOURCE = "builtin:shapes?train=24&test=8"


def _demo_fewshot() -> FewShotConfig:
    # the demo's test split has 8 objects per class: too few for CrossPoint's 10/20-shot
    # episodes with 20 queries, so the demo runs 1- and 5-shot episodes with 3 queries
    return FewShotConfig(settings=[(5, 1), (5, 5)], query=3)


def _demo_partseg() -> PartSegConfig:
    return PartSegConfig(epochs=5, batch_size=16, num_points=256)


@dataclass
class DemoConfig:
    """Everything that determines a demo run (the dataset, run and report go under ``out``)."""

    #: folder for the dataset (``data``), the run (``run``) and the report (``report``)
    out: str = ""
    #: seeds every stage
    seed: int = 0
    #: the built-in shapes to prepare (:data:`DEMO_SOURCE`)
    source: str = DEMO_SOURCE
    #: processes of the prepare stage
    workers: int = 2
    #: rendered views, points per cloud and image side of the dataset
    views: int = 12
    points: int = 512
    image_size: int = 64
    #: the pretrain preset (``configs/pretrain/<name>.yaml`` or a YAML path)
    pretrain_preset: str = "demo"
    #: pre-training iterations (null: the preset's)
    iterations: Optional[int] = None
    #: more pretrain ``key=value`` overrides (applied after ``seed``, before ``iterations``)
    pretrain_overrides: list[str] = field(default_factory=list)
    #: evaluation task names, or ``all``
    tasks: list[str] = field(default_factory=lambda: ["all"])
    #: view counts of the 2D evaluation tasks
    eval_views: list[int] = field(default_factory=lambda: [1, 4, 8, 12])
    #: the linear SVM's C grid (default: the paper protocol's)
    svm: SvmConfig = field(default_factory=SvmConfig)
    fewshot: FewShotConfig = field(default_factory=_demo_fewshot)
    #: part segmentation on the demo's own part labels; ``num_points`` is capped at ``points``
    partseg: PartSegConfig = field(default_factory=_demo_partseg)

    def __post_init__(self) -> None:
        paths_to_str(self, "out")

    def validate(self) -> None:
        self.fewshot.validate()
        self.partseg.validate()
        resolve_tasks(self.tasks)
        for key in ("workers", "points"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.views < 0:
            raise ConfigError(f"views must be >= 0 (0: no images), got {self.views}")
        if self.iterations is not None and self.iterations < 1:
            raise ConfigError(f"iterations must be >= 1 or null, got {self.iterations}")
        if not self.eval_views or any(v < 1 for v in self.eval_views):
            raise ConfigError(f"eval_views must be a non-empty list of integers >= 1, got {self.eval_views}")

    def require_paths(self) -> None:
        """Raise :class:`ConfigError` unless ``out`` is given."""
        require_fields(self, "out")
