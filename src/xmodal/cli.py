"""The ``xmodal`` command line: a thin layer over the Python API.

Sub-commands (each writes its output to disk)::

    xmodal prepare  --source SRC --out DATASET      meshes/points -> views + point clouds
    xmodal merge    PART... --out DATASET           join the parts of a sharded prepare (--shard I/N)
    xmodal show     DATASET --object ID --out PNG   contact sheet of one object
    xmodal pretrain --data DATASET --out RUN        self-supervised pre-training
    xmodal evaluate --run RUN --data DATASET ...    pretext metrics + transfer tasks + report
    xmodal demo     --out DIR                       all of the above on the built-in shapes

Each stage is configured by a dataclass (``PrepareConfig``, ``PretrainConfig``,
``EvaluateConfig``, ``DemoConfig``): the flags of a sub-command set fields of it, then
``key=value`` arguments override any field (dotted keys for nested ones); ``--print-config``
prints the resolved config and exits. Every heavy import happens inside the handler, so
``xmodal --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from xmodal import __version__
from xmodal.config import list_presets
from xmodal.data.prepare_config import PrepareConfig
from xmodal.errors import Interrupted, TrainingDiverged, XmodalError
from xmodal.eval.config import DEFAULT_VIEWS
from xmodal.eval.tasks import TASK_NAMES
from xmodal.utils.io import os_error_text

log = logging.getLogger("xmodal")

#: the defaults the ``prepare`` flags' help states
_PREP = PrepareConfig(source="", out="")
#: ``--task`` choices: the registry's tasks (:mod:`xmodal.eval.tasks`) and ``all``
EVAL_TASKS = (*TASK_NAMES, "all")


def _int(text: str, what: str) -> int:
    if "=" in text:  # an override swallowed by an option that takes several values (--views 1 12 k=v)
        raise argparse.ArgumentTypeError(f"{text!r} is a key=value override, not {what}: put overrides before "
                                         f"--views (or after '--')")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    v = _int(text, "a positive integer")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _nonneg_int(text: str) -> int:
    v = _int(text, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return v


def _add_config_args(p, fields: str) -> None:
    """``--print-config`` and the ``key=value`` overrides of a stage's config."""
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help=f"config overrides, dotted keys for nested fields ({fields}); put them before a multi-value flag "
        "such as --views",
    )


def _given(args, names: tuple[str, ...]) -> dict:
    """``{name: value}`` of the flags that were given (argparse default None: not given)."""
    out = {}
    for name in names:
        value = getattr(args, name)
        if value is not None:
            out[name] = str(value) if isinstance(value, Path) else value
    return out


def _resolve(cls, flags: dict, overrides: list[str]):
    """The stage config: dataclass defaults <- the given flags <- ``key=value`` overrides."""
    from xmodal.config import apply_overrides, from_dict

    return apply_overrides(from_dict(cls, flags), overrides)


def _print_config(cfg) -> int:
    import yaml

    from xmodal.config import to_dict

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


# --------------------------------------------------------------------------- prepare
def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="render views and sample point clouds from a mesh collection",
        description="Turn a mesh folder (ModelNet layout <root>/<class>/<split>/*.off, or class sub-folders), "
        "a Princeton Shape Benchmark folder (<root>/db/<id/100>/m<id>/m<id>.off or .ply, with "
        "<root>/classification/v1/<granularity>/ holding train.cla / *Train.cla and test.cla / *Test.cla: "
        "split from the .cla file listing a model, class from the base classification or from "
        "<root>?classification=coarse1|coarse2|coarse3), a ModelNet40 HDF5 point-cloud folder, or builtin:shapes "
        "into an xmodal dataset. Objects that cannot be loaded (a model listed in a .cla but missing on disk, a "
        "broken mesh) are skipped and listed under 'failed' in manifest.json. "
        "Resumable: re-run the same command after an interruption (SIGTERM/SIGINT stop it cleanly, exit 143/130). "
        "On many machines: --shard I/N on each, then 'xmodal merge'. Settings: the flags, then key=value overrides "
        "of PrepareConfig; the resolved config is written to OUT/prepare.yaml.",
    )
    p.add_argument(
        "--source",
        required=True,
        help="mesh folder, Princeton Shape Benchmark folder (optionally DIR?classification=coarse1), "
        "ModelNet40 HDF5 folder, or builtin:shapes[?train=32&test=8]",
    )
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    p.add_argument("--views", type=_nonneg_int, default=None, help=f"rendered views per object, V (default {_PREP.views}; the paper uses 180)")
    p.add_argument("--points", type=_positive_int, default=None, help=f"points per cloud, N (default {_PREP.points})")
    p.add_argument("--image-size", type=_positive_int, default=None, help=f"image side in pixels (default {_PREP.image_size})")
    p.add_argument("--workers", type=_positive_int, default=None, help=f"parallel worker processes (default {_PREP.workers})")
    p.add_argument("--seed", type=int, default=None, help=f"seed for cameras, sampling and splits (default {_PREP.seed})")
    p.add_argument("--chunk-size", type=_positive_int, default=None, help=f"objects per shard file (default {_PREP.chunk_size})")
    p.add_argument("--test-ratio", type=float, default=None, help=f"test fraction where the source has no split (default {_PREP.test_ratio})")
    p.add_argument("--rgb", action="store_true", help="render RGB instead of grayscale (grayscale=false)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing dataset built with other settings")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="build only part I of N (1 <= I <= N; a fixed round robin over the plan's chunks) for "
                   "'xmodal merge'; same command and settings on every machine")
    _add_config_args(p, "PrepareConfig: e.g. render_points=false oversample=4")
    p.set_defaults(handler=_run_prepare)


_PREPARE_FLAGS = ("source", "out", "views", "points", "image_size", "workers", "seed", "chunk_size", "test_ratio",
                  "shard")


def _run_prepare(args) -> int:
    from xmodal.data.prepare import prepare
    from xmodal.data.prepare_config import PrepareConfig

    flags = _given(args, _PREPARE_FLAGS)
    if args.rgb:
        flags["grayscale"] = False
    if args.overwrite:
        flags["overwrite"] = True
    cfg = _resolve(PrepareConfig, flags, args.overrides)
    if args.print_config:
        return _print_config(cfg)
    manifest = prepare(cfg, progress=not args.quiet)
    shard = manifest.get("shard")
    what = f"part {shard['index']}/{shard['count']} of a dataset" if shard else "dataset"
    _print_dataset(manifest, Path(cfg.out), what)
    return 0


def _print_dataset(manifest: dict, out: Path, what: str) -> None:
    counts = ", ".join(f"{k}: {v}" for k, v in manifest.get("counts", {}).items())
    n_failed = len(manifest.get("failed", []))
    print(f"{what} written to {out} ({len(manifest.get('classes', []))} classes; {counts}; {n_failed} failed)")
    if n_failed:
        print(f"failed objects are listed in {out / 'manifest.json'} under 'failed'")


# --------------------------------------------------------------------------- merge
def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="join the parts of a sharded prepare (--shard I/N) into one dataset",
        description="Join the N parts written by 'xmodal prepare ... --shard I/N' (one folder per part, every part "
        "once, built with the same source and settings) into the dataset the unsharded prepare writes: same "
        "objects in the same order, same points, images, labels and manifest. Parts that do not belong together "
        "are refused, naming the part and what differs. Shard files are hard-linked where the file system "
        "allows, else copied.",
    )
    p.add_argument("parts", nargs="+", type=Path, metavar="PART", help="a part's folder (xmodal prepare --shard I/N)")
    p.add_argument("--out", required=True, type=Path, help="the merged dataset folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace another dataset in --out")
    p.add_argument("--copy", action="store_true",
                   help="always copy the shard files (default: hard links where possible)")
    p.set_defaults(handler=_run_merge)


def _run_merge(args) -> int:
    from xmodal.data.merge import merge_datasets

    manifest = merge_datasets(args.parts, args.out, overwrite=args.overwrite, link=not args.copy)
    _print_dataset(manifest, args.out, f"dataset of {len(args.parts)} parts")
    return 0


# --------------------------------------------------------------------------- show
def _add_show(sub) -> None:
    p = sub.add_parser("show", help="contact sheet of an object's views beside its point cloud")
    p.add_argument("dataset", type=Path, help="dataset folder written by 'xmodal prepare'")
    p.add_argument("--object", required=True, help="object id (e.g. chair/train/chair_0001) or index within --split")
    p.add_argument("--split", default=None, help="split to look in (default: any; for an index: train)")
    p.add_argument("--out", required=True, type=Path,
                   help="image file to write, in the format its suffix names (.png, .pdf, .svg, .jpg; PNG "
                   "without one), or a folder for ID.png")
    p.add_argument("--max-views", type=_positive_int, default=12, help="views to show (default 12)")
    p.set_defaults(handler=_run_show)


def _run_show(args) -> int:
    from xmodal.data.show import show

    obj = int(args.object) if args.object.isdigit() else args.object
    path = show(args.dataset, obj, args.out, split=args.split, max_views=args.max_views)
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- pretrain
def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pre-training (cross-modality + cross-view)",
        description="Train Fimg (ResNet18), Fp (DGCNN) and Ff jointly on a prepared dataset, without labels. "
        "Settings: a preset, then key=value overrides (e.g. loss.mode=cm iterations=500 optim.lr=0.01). "
        "Multi-GPU / multi-node: launch the same command with torchrun.",
    )
    p.add_argument("--data", type=Path, help="dataset folder written by 'xmodal prepare' (data.path; required unless "
                   "--print-config; on --resume: default the run's)")
    p.add_argument("--out", type=Path, help="run folder to write (required unless --print-config)")
    p.add_argument("--preset", default=None, help=f"{' | '.join(list_presets('pretrain'))} | path/to/config.yaml "
                   "(default: paper; on --resume: the run's saved config)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--allow-other-data", action="store_true",
                   help="with --resume: accept a --data other than the dataset the run was trained on "
                   "(its settings must still match)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys for nested fields")
    p.set_defaults(handler=_run_pretrain, parser=p)


def _run_pretrain(args) -> int:
    from xmodal.train.config import resolve_pretrain_config
    from xmodal.train.trainer import pretrain

    preset = args.preset if (args.preset or args.resume) else "paper"
    if args.resume and args.out is None:
        args.parser.error("--resume needs --out (the run folder)")
    cfg = resolve_pretrain_config(preset, args.overrides, run=args.out, resume=args.resume)
    cfg = cfg.with_paths(data=args.data, out=args.out)  # on --resume --data defaults to the run's dataset
    if args.print_config:
        return _print_config(cfg)
    # on --resume a missing dataset is reported by pretrain, after it has checked the run folder
    missing = [flag for flag, value in (("--data", cfg.data.path or args.resume), ("--out", cfg.out)) if not value]
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")
    summary = pretrain(cfg, resume=args.resume, progress=not args.quiet, allow_other_data=args.allow_other_data)
    if summary:
        print(f"run written to {cfg.out}")
    return 0


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="pretext metrics and transfer tasks (paper Tables 1-4, Fig. 3)",
        description="Evaluate a run's frozen encoders. Writes OUT/metrics.json, OUT/report.md, PNG figures and "
        "the resolved config OUT/evaluate.yaml. Tasks OUT already holds for the same run, data, seed and settings "
        "are not evaluated again (--redo does); SIGTERM/SIGINT stop after the task in progress (exit 143/130) and "
        "the same command evaluates the rest. Settings: the flags, then key=value overrides of EvaluateConfig.",
    )
    p.add_argument("--run", required=True, type=Path, help="run folder written by 'xmodal pretrain'")
    p.add_argument("--data", type=Path, help="dataset folder (or a ModelNet40 HDF5 folder, 3D tasks only); "
                   "required unless '--task partseg --partseg-data D' is the one task")
    p.add_argument("--task", action="append", choices=EVAL_TASKS,
                   help="task to run; repeat for several (default: all): pretext = Table 1, svm = Table 2, "
                   "retrieval = Table 3, partseg = Table 4, tsne = Fig. 3; fewshot and crossmodal beyond the paper")
    p.add_argument("--out", required=True, type=Path, help="report folder to write")
    p.add_argument("--baseline", choices=("random",), default=None, help="also evaluate the same networks at random initialisation")
    p.add_argument("--baseline-seed", type=int, default=None,
                   help="seed of the random-init baseline's weights (default: the run's own training seed, i.e. the weights it started from)")
    p.add_argument("--point-subsets", type=_positive_int, default=None,
                   help="average each object's 3D feature over this many point subsets of the size trained on, consecutive "
                   "blocks of one permutation of its stored cloud (default 1, the paper's protocol; beyond the paper)")
    p.add_argument("--views", type=_positive_int, nargs="+", default=None, help=f"view counts v for the 2D tasks (default {' '.join(map(str, DEFAULT_VIEWS))}; capped at the dataset's V)")
    p.add_argument("--partseg-data", type=Path, default=None, help="part-segmentation data (ShapeNet-Part folder, Labeled PSB folder, or an xmodal dataset with part labels; default: --data)")
    p.add_argument("--partseg-epochs", type=_positive_int, default=None, help="epochs per part-segmentation setting (partseg.epochs)")
    p.add_argument("--partseg-points", type=_positive_int, default=None, help="points per shape for part segmentation (partseg.num_points)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--redo", action="store_true",
                   help="evaluate again the tasks OUT/metrics.json already holds for this run, data, seed and settings "
                   "(default: keep them; an interrupted evaluation re-run with the same command does only the rest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report in OUT when it is another evaluation (another run, data or seed; "
                   "default: refused)")
    _add_config_args(p, "EvaluateConfig: e.g. svm.cs=[0.01,0.1] retrieval.ks=[1,10] fewshot.episodes=5 partseg.lr=0.001")
    p.set_defaults(handler=_run_evaluate)


_EVALUATE_FLAGS = ("run", "data", "out", "baseline", "baseline_seed", "point_subsets", "views", "partseg_data", "seed", "device")
#: flag -> field of the ``partseg`` section
_PARTSEG_FLAGS = {"partseg_epochs": "epochs", "partseg_points": "num_points"}


def _run_evaluate(args) -> int:
    from xmodal.eval.config import EvaluateConfig
    from xmodal.eval.runner import evaluate

    flags = _given(args, _EVALUATE_FLAGS)
    if args.task:
        flags["tasks"] = args.task
    if args.redo:
        flags["redo"] = True
    if args.overwrite:
        flags["overwrite"] = True
    flags["partseg"] = {_PARTSEG_FLAGS[k]: v for k, v in _given(args, tuple(_PARTSEG_FLAGS)).items()}
    cfg = _resolve(EvaluateConfig, flags, args.overrides)
    if args.print_config:
        return _print_config(cfg)
    metrics = evaluate(cfg, progress=not args.quiet)
    n = sum(1 for k in metrics if not k.startswith("meta."))
    out = Path(cfg.out)
    print(f"{n} metrics written to {out / 'metrics.json'}; report: {out / 'report.md'}")
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="prepare -> pretrain -> evaluate on the built-in shapes (a few minutes on CPU)",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for the dataset, the run and the report")
    p.add_argument("--workers", type=_positive_int, default=None, help="processes for the prepare stage (default 2)")
    p.add_argument("--iterations", type=_positive_int, default=None, help="pre-training iterations (default: the demo's)")
    p.add_argument("--seed", type=int, default=None)
    _add_config_args(p, "DemoConfig: e.g. partseg.epochs=2 pretrain_overrides=[optim.lr=0.01]")
    p.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from xmodal.demo import demo
    from xmodal.demo_config import DemoConfig

    cfg = _resolve(DemoConfig, _given(args, ("out", "workers", "iterations", "seed")), args.overrides)
    if args.print_config:
        return _print_config(cfg)
    report = demo(cfg, progress=not args.quiet)
    print(f"demo finished; report: {report}")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmodal",
        description="Self-supervised 2D image and 3D point-cloud features from 3D shapes "
        "(cross-modality and cross-view correspondences).",
    )
    parser.add_argument("--version", action="version", version=f"xmodal {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_prepare, _add_merge, _add_show, _add_pretrain, _add_evaluate, _add_demo):
        add(sub)
    return parser


def _error_line(command: str, exc: BaseException) -> str:
    """``xmodal <command>: error: <where>: <problem>`` plus the hint on a second line, if any."""
    text = str(exc)
    if isinstance(exc, OSError) and not isinstance(exc, XmodalError) and exc.filename is not None:
        text = os_error_text(exc)
    # a stop the user asked for (SIGINT, SIGTERM) is not an error: the line says what was done
    line = f"xmodal {command}: {text}" if isinstance(exc, Interrupted) else f"xmodal {command}: error: {text}"
    hint = getattr(exc, "hint", None)
    return line + (f"\n  hint: {hint}" if hint else "")


def _continue_hint(args) -> str:
    """What to run after an interruption at start-up: ``--resume`` only where pretrain has a run to resume."""
    out = getattr(args, "out", None)
    if args.command == "pretrain" and not getattr(args, "resume", False):
        if out is not None and (Path(out) / "config.yaml").is_file():
            return "run the same command with --resume to continue"
        return "nothing was trained yet: run the same command to start"
    return "run the same command again to continue"


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    if isinstance(exc, TrainingDiverged):
        return 3
    return 2


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``key=value`` overrides (a positional ``overrides`` with
    ``nargs="*"``) may also follow an option (``--preset cpu iterations=10``): argparse takes one run
    of positionals only, and leaves a second run unrecognised. Also used by the scripts in
    ``benchmarks/`` that take overrides."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [e for e in extra if e.startswith("-") or "=" not in e]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args_with_overrides(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        # log lines printed above the progress bars, not glued to the end of a bar's line
        with logging_redirect_tqdm():
            return int(args.handler(args) or 0)
    except KeyboardInterrupt:  # before a command's own stop handling is in place (start-up)
        print(f"interrupted; {_continue_hint(args)}", file=sys.stderr)
        return 130
    except (XmodalError, OSError) as exc:
        # the user's input or environment (a bad file, a setting, a full disk): one line, with
        # the traceback above it under --verbose; anything else is a bug and keeps its traceback
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        print(_error_line(args.command, exc), file=sys.stderr)
        return _exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
