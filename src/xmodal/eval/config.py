"""Settings of the ``evaluate`` stage (:class:`EvaluateConfig`) and of its tasks.

Resolved by :mod:`xmodal.config` like every stage's config: dataclass defaults <- ``key=value``
overrides with dotted keys for the task sections (``svm.cs=[0.1, 1]``, ``fewshot.query=3``,
``partseg.epochs=5``). On the command line the ``xmodal evaluate`` flags map onto these fields
(``--views`` -> ``views``, ``--partseg-epochs`` -> ``partseg.epochs``, ...). The resolved config
is written to ``OUT/evaluate.yaml``.

The defaults are the paper's protocol (§4.3-4.5): view counts 1, 12, 36, 80 for the 2D tasks,
top-1/5/10/20/50 retrieval, Table 4's three settings on 2 %, 20 % and 100 % of the train split
with the optimisation of §4.1. The paths (``run``, ``data``, ``out``) have no default; the
stage refuses to run without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from xmodal.config import check_device, paths_to_str, require_fields
from xmodal.errors import ConfigError
from xmodal.eval.crossmodal import MAX_GALLERY
from xmodal.eval.fewshot import DEFAULT_SETTINGS as FEWSHOT_SETTINGS
from xmodal.eval.retrieval import DEFAULT_KS
from xmodal.eval.svm import DEFAULT_CS
from xmodal.eval.tasks import resolve_tasks

__all__ = [
    "DEFAULT_VIEWS",
    "PARTSEG_SETTINGS",
    "PARTSEG_FRACTIONS",
    "SvmConfig",
    "RetrievalConfig",
    "FewShotConfig",
    "CrossModalConfig",
    "PartSegConfig",
    "EvaluateConfig",
]

#: ``svm.solver``'s values (:class:`xmodal.eval.linear_svm.SquaredHingeSVC`'s ``solver``)
SVM_SOLVERS = ("auto", "newton", "lbfgs")
#: task options added after report folders had been written, with the value those folders were
#: evaluated under: such an option joins a task's fingerprint only away from it (so that a new
#: option does not make every report folder evaluate again)
OPTION_NEUTRAL_VALUES = {"svm.solver": "auto"}
#: Table 2/3 view counts (capped at the dataset's V)
DEFAULT_VIEWS = (1, 12, 36, 80)
#: Table 4's settings: pre-trained Fp frozen, pre-trained Fp fine-tuned, Fp from scratch
PARTSEG_SETTINGS = ("frozen", "finetune", "scratch")
#: Table 4's fractions of the train split
PARTSEG_FRACTIONS = (0.02, 0.2, 1.0)


@dataclass
class SvmConfig:
    """Table 2: linear SVM on frozen features; C chosen by cross-validation on the train split."""

    #: the C grid searched (default: 1e-5 .. 10, one value per decade)
    cs: list[float] = field(default_factory=lambda: list(DEFAULT_CS))
    #: ``auto``: exact (Newton) up to 256 training samples, else L-BFGS (500 iterations), which on
    #: ModelNet40 features ends within 0.1 % of the minimum at the C that cross-validation picks
    #: there but 0.6-150 % above it at C >= 0.1; ``newton``: every fit exact, on ModelNet40 at 4x
    #: the time over the default grid (``benchmarks/svm_bench.py --run``; a fit Newton cannot finish
    #: in float64 warns and keeps L-BFGS's); ``lbfgs``: every fit by L-BFGS
    solver: str = "auto"

    def validate(self) -> None:
        if not self.cs or any(not c > 0 for c in self.cs):
            raise ConfigError(f"svm.cs must be a non-empty list of values > 0, got {self.cs}")
        if self.solver not in SVM_SOLVERS:
            raise ConfigError(f"svm.solver must be one of {', '.join(SVM_SOLVERS)}, got {self.solver!r}")


@dataclass
class RetrievalConfig:
    """Table 3: leave-one-out retrieval on the test split."""

    #: top-K accuracies reported (``retrieval3d.top<K>``, ``retrieval2d.<v>.top<K>``)
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))

    def validate(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"retrieval.ks must be a non-empty list of integers >= 1, got {self.ks}")


@dataclass
class FewShotConfig:
    """N-way K-shot linear evaluation on the test split (beyond the paper)."""

    #: (N ways, K shots) of each setting
    settings: list[tuple[int, int]] = field(default_factory=lambda: [tuple(s) for s in FEWSHOT_SETTINGS])
    #: query objects per class and episode (fewer where a class has fewer)
    query: int = 20
    #: episodes per setting
    episodes: int = 10

    def validate(self) -> None:
        for s in self.settings:
            if len(s) != 2 or s[0] < 2 or s[1] < 1:
                raise ConfigError(f"fewshot.settings: each entry is [N ways >= 2, K shots >= 1], got {list(s)}")
        if self.query < 1:
            raise ConfigError(f"fewshot.query must be >= 1, got {self.query}")
        if self.episodes < 1:
            raise ConfigError(f"fewshot.episodes must be >= 1, got {self.episodes}")


@dataclass
class CrossModalConfig:
    """Image <-> shape retrieval ranked by Ff (beyond the paper)."""

    #: at most this many test objects (stratified, seeded) as queries and gallery; null: all
    max_gallery: Optional[int] = MAX_GALLERY

    def validate(self) -> None:
        if self.max_gallery is not None and self.max_gallery < 1:
            raise ConfigError(f"crossmodal.max_gallery must be >= 1 or null, got {self.max_gallery}")


@dataclass
class PartSegConfig:
    """Table 4: the part-segmentation protocol of :func:`xmodal.eval.partseg.run_partseg`.

    Optimisation follows §4.1 (Adam, lr 0.003, ×0.1 every 20 epochs); the paper gives no number
    of epochs. The seed and device are the evaluation's.
    """

    #: any of ``frozen``, ``finetune``, ``scratch`` (the first two need a pre-trained run)
    settings: list[str] = field(default_factory=lambda: list(PARTSEG_SETTINGS))
    #: fractions of the train split (seeded, stratified by category; one subset for every setting)
    fractions: list[float] = field(default_factory=lambda: list(PARTSEG_FRACTIONS))
    epochs: int = 100
    batch_size: int = 16
    lr: float = 0.003
    #: multiply the learning rate by ``gamma`` every ``step_epochs`` epochs
    step_epochs: int = 20
    gamma: float = 0.1
    weight_decay: float = 0.0
    #: DGCNN's anisotropic scaling and translation of the training clouds
    augment: bool = True
    #: the one-hot object category joins the global feature (the ShapeNet-Part convention)
    use_category: bool = True
    dropout: float = 0.5
    #: points per shape (seeded resampling); null keeps the data's
    num_points: Optional[int] = None
    #: batch size of the test-split predictions
    eval_batch_size: int = 32
    #: how ``finetune`` treats the BatchNorm layers of an Fp pre-trained with frozen statistics
    #: (``model.freeze_point_bn``): ``train`` trains them as ordinary BatchNorm, as ``scratch``
    #: does (chosen on a validation split of Labeled PSB, docs/EXPERIMENTS.md); ``pretraining``
    #: keeps them frozen, as they were pre-trained. No effect on other Fps.
    finetune_point_bn: Literal["pretraining", "train"] = "train"
    #: log the val split's metrics every ``val_every`` epochs (0: never; logging only)
    val_every: int = 0

    def validate(self) -> None:
        bad = [s for s in self.settings if s not in PARTSEG_SETTINGS]
        if bad or not self.settings:
            raise ConfigError(
                f"partseg.settings: unknown part-segmentation settings {bad}; choose from {list(PARTSEG_SETTINGS)}"
            )
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"partseg.fractions must be a non-empty list of values in (0, 1], got {self.fractions}")
        for key in ("epochs", "batch_size", "step_epochs", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"partseg.{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"partseg.lr must be > 0, got {self.lr}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"partseg.gamma must be in (0, 1], got {self.gamma}")
        if self.weight_decay < 0:
            raise ConfigError(f"partseg.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"partseg.dropout must be in [0, 1), got {self.dropout}")
        if self.num_points is not None and self.num_points < 1:
            raise ConfigError(f"partseg.num_points must be >= 1 or null, got {self.num_points}")
        if self.val_every < 0:
            raise ConfigError(f"partseg.val_every must be >= 0 (0 = off), got {self.val_every}")


@dataclass
class EvaluateConfig:
    """Everything that determines an evaluation (defaults: the paper's protocol)."""

    #: run folder written by ``xmodal pretrain``
    run: str = ""
    #: dataset folder (an xmodal store, or a ModelNet40 HDF5 folder: 3D tasks only); not needed
    #: when part segmentation on ``partseg_data`` is the one task
    data: str = ""
    #: report folder to write (metrics.json, report.md, figures, evaluate.yaml)
    out: str = ""
    #: task names of :mod:`xmodal.eval.tasks`, or ``all``
    tasks: list[str] = field(default_factory=lambda: ["all"])
    #: ``random``: also evaluate the same networks at random initialisation
    baseline: Optional[Literal["random"]] = None
    #: seed of the random-init baseline's weights; null: the run's own training seed, so that the
    #: baseline is the very weights the run started from
    baseline_seed: Optional[int] = None
    #: seeds view choice, point subsets, pairs, CV folds, episodes, t-SNE and part segmentation
    seed: int = 0
    #: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N"
    device: str = "auto"
    #: view counts v of the 2D tasks (capped at the dataset's V, deduplicated)
    views: list[int] = field(default_factory=lambda: list(DEFAULT_VIEWS))
    #: Fp's feature of an object is the mean over this many seeded point subsets of the size the
    #: run trained on, consecutive blocks of one permutation of the stored cloud (2 subsets of a
    #: 1,024-point cloud at 512 points use every point once). 1: one subset, the paper's protocol;
    #: more is test-time averaging beyond the paper, at that many encodings per object (no effect,
    #: with a warning, where the clouds have no more points than the run trained on)
    point_subsets: int = 1
    #: evaluate again the tasks ``out/metrics.json`` already holds for the same run, data, seed
    #: and task settings (false: they are kept, not recomputed; see :mod:`xmodal.eval.resume`)
    redo: bool = False
    #: replace what ``out`` holds when it is another evaluation (another run, data or seed), its
    #: figures and logs removed (false: such a folder is refused, nothing written)
    overwrite: bool = False
    svm: SvmConfig = field(default_factory=SvmConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    crossmodal: CrossModalConfig = field(default_factory=CrossModalConfig)
    #: part-segmentation data (ShapeNet-Part or Labeled PSB folder, a part-labelled store;
    #: null: ``data`` itself when it has part labels)
    partseg_data: Optional[str] = None
    partseg: PartSegConfig = field(default_factory=PartSegConfig)

    def __post_init__(self) -> None:
        paths_to_str(self, "run", "data", "out", "partseg_data")

    def validate(self) -> None:
        for section in (self.svm, self.retrieval, self.fewshot, self.crossmodal, self.partseg):
            section.validate()
        resolve_tasks(self.tasks)
        if not self.views or any(v < 1 for v in self.views):
            raise ConfigError(f"views must be a non-empty list of integers >= 1, got {self.views}")
        if self.point_subsets < 1:
            raise ConfigError(f"point_subsets must be >= 1, got {self.point_subsets}")
        if self.baseline not in (None, "random"):
            raise ConfigError(f"baseline must be null or 'random', got {self.baseline!r}")
        check_device("device", self.device)

    def task_reads_data(self, name: str) -> bool:
        """Whether task ``name`` reads ``data``: every task but part segmentation on ``partseg_data``."""
        return not (name == "partseg" and self.partseg_data)

    def reads_data(self) -> bool:
        """Whether any task asked for reads ``data``."""
        return any(self.task_reads_data(name) for name in resolve_tasks(self.tasks))

    def require_paths(self) -> None:
        """Raise :class:`ConfigError` unless ``run``, ``out`` and (where a task reads it) ``data`` are given."""
        reads = self.reads_data()
        require_fields(self, "run", *(("data",) if reads else ()), "out",
                       hint=("data may be left out only when part segmentation on partseg_data is the one task"
                             if reads and not self.data else None))
