"""The ``xmodal`` command line: a thin layer over the Python API.

Sub-commands (each writes its output to disk)::

    xmodal prepare  --source SRC --out DATASET      meshes/points -> views + point clouds
    xmodal show     DATASET --object ID --out PNG   contact sheet of one object
    xmodal pretrain --data DATASET --out RUN        self-supervised pre-training
    xmodal evaluate --run RUN --data DATASET ...    pretext metrics + transfer tasks + report
    xmodal demo     --out DIR                       all of the above on the built-in shapes

Every heavy import happens inside the handler, so ``xmodal --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from xmodal import __version__
from xmodal.errors import Interrupted, TrainingDiverged, XmodalError

log = logging.getLogger("xmodal")

EVAL_TASKS = ("pretext", "svm", "retrieval", "partseg", "tsne", "fewshot", "crossmodal", "all")


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return v


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
        "Resumable: re-run the same command after an interruption.",
    )
    p.add_argument(
        "--source",
        required=True,
        help="mesh folder, Princeton Shape Benchmark folder (optionally DIR?classification=coarse1), "
        "ModelNet40 HDF5 folder, or builtin:shapes[?train=32&test=8]",
    )
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    p.add_argument("--views", type=_nonneg_int, default=12, help="rendered views per object, V (default 12; the paper uses 180)")
    p.add_argument("--points", type=_positive_int, default=2048, help="points per cloud, N (default 2048)")
    p.add_argument("--image-size", type=_positive_int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--workers", type=_positive_int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for cameras, sampling and splits (default 0)")
    p.add_argument("--chunk-size", type=_positive_int, default=32, help="objects per shard file (default 32)")
    p.add_argument("--test-ratio", type=float, default=0.2, help="test fraction where the source has no split (default 0.2)")
    p.add_argument("--rgb", action="store_true", help="render RGB instead of grayscale")
    p.add_argument("--overwrite", action="store_true", help="discard an existing dataset built with other settings")
    p.set_defaults(handler=_run_prepare)


def _run_prepare(args) -> int:
    from xmodal.data.prepare import prepare

    manifest = prepare(
        args.source,
        args.out,
        views=args.views,
        points=args.points,
        image_size=args.image_size,
        workers=args.workers,
        seed=args.seed,
        chunk_size=args.chunk_size,
        test_ratio=args.test_ratio,
        grayscale=not args.rgb,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    counts = ", ".join(f"{k}: {v}" for k, v in manifest.get("counts", {}).items())
    n_failed = len(manifest.get("failed", []))
    print(f"dataset written to {args.out} ({len(manifest.get('classes', []))} classes; {counts}; {n_failed} failed)")
    if n_failed:
        print(f"failed objects are listed in {Path(args.out) / 'manifest.json'} under 'failed'")
    return 0


# --------------------------------------------------------------------------- show
def _add_show(sub) -> None:
    p = sub.add_parser("show", help="contact sheet of an object's views beside its point cloud")
    p.add_argument("dataset", type=Path, help="dataset folder written by 'xmodal prepare'")
    p.add_argument("--object", required=True, help="object id (e.g. chair/train/chair_0001) or index within --split")
    p.add_argument("--split", default=None, help="split to look in (default: any; for an index: train)")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
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
    p.add_argument("--data", required=True, type=Path, help="dataset folder written by 'xmodal prepare'")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--preset", default=None, help="paper | cpu | smoke | path/to/config.yaml (default: paper; on --resume: the run's saved config)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys for nested fields")
    p.set_defaults(handler=_run_pretrain)


def _run_pretrain(args) -> int:
    import yaml

    from xmodal.config import to_dict
    from xmodal.train.config import resolve_pretrain_config
    from xmodal.train.trainer import pretrain

    preset = args.preset if (args.preset or args.resume) else "paper"
    cfg = resolve_pretrain_config(preset, args.overrides, run=args.out, resume=args.resume)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    summary = pretrain(args.data, args.out, cfg, resume=args.resume, progress=not args.quiet)
    if summary:
        print(f"run written to {args.out}")
    return 0


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="pretext metrics and transfer tasks (paper Tables 1-4, Fig. 3)",
        description="Evaluate a run's frozen encoders. Writes OUT/metrics.json, OUT/report.md and PNG figures.",
    )
    p.add_argument("--run", required=True, type=Path, help="run folder written by 'xmodal pretrain'")
    p.add_argument("--data", required=True, type=Path, help="dataset folder (or a ModelNet40 HDF5 folder, 3D tasks only)")
    p.add_argument("--task", action="append", choices=EVAL_TASKS, help="task to run; repeat for several (default: all)")
    p.add_argument("--out", required=True, type=Path, help="report folder to write")
    p.add_argument("--baseline", choices=("random",), default=None, help="also evaluate the same networks at random initialisation")
    p.add_argument("--views", type=_positive_int, nargs="+", default=[1, 12, 36, 80], help="view counts v for the 2D tasks (capped at the dataset's V)")
    p.add_argument("--partseg-data", type=Path, default=None, help="part-segmentation data (ShapeNet-Part folder, Labeled PSB folder, or an xmodal dataset with part labels; default: --data)")
    p.add_argument("--partseg-epochs", type=_positive_int, default=None, help="epochs per part-segmentation setting")
    p.add_argument("--partseg-points", type=_positive_int, default=None, help="points per shape for part segmentation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args) -> int:
    from xmodal.eval.runner import evaluate

    partseg_kwargs = {}
    if args.partseg_epochs is not None:
        partseg_kwargs["epochs"] = args.partseg_epochs
    if args.partseg_points is not None:
        partseg_kwargs["num_points"] = args.partseg_points
    metrics = evaluate(
        args.run,
        args.data,
        tasks=tuple(args.task or ["all"]),
        out=args.out,
        baseline=args.baseline,
        seed=args.seed,
        device=args.device,
        views=tuple(args.views),
        partseg_data=args.partseg_data,
        partseg_kwargs=partseg_kwargs or None,
        progress=not args.quiet,
    )
    n = sum(1 for k in metrics if not k.startswith("meta."))
    print(f"{n} metrics written to {args.out / 'metrics.json'}; report: {args.out / 'report.md'}")
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="prepare -> pretrain -> evaluate on the built-in shapes (a few minutes on CPU)",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for the dataset, the run and the report")
    p.add_argument("--workers", type=_positive_int, default=2, help="processes for the prepare stage (default 2)")
    p.add_argument("--iterations", type=_positive_int, default=None, help="pre-training iterations (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from xmodal.demo import demo

    report = demo(args.out, workers=args.workers, iterations=args.iterations, seed=args.seed, progress=not args.quiet)
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
    for add in (_add_prepare, _add_show, _add_pretrain, _add_evaluate, _add_demo):
        add(sub)
    return parser


def _error_line(command: str, exc: BaseException) -> str:
    """``xmodal <command>: error: <where>: <problem>`` plus the hint on a second line, if any."""
    text = str(exc)
    if isinstance(exc, OSError) and not isinstance(exc, XmodalError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    line = f"xmodal {command}: error: {text}"
    hint = getattr(exc, "hint", None)
    return line + (f"\n  hint: {hint}" if hint else "")


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    if isinstance(exc, TrainingDiverged):
        return 3
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command (with --resume for pretrain) to continue", file=sys.stderr)
        return 130
    except (XmodalError, OSError, ValueError) as exc:
        # the user's input or environment (a bad file, a setting, a full disk): one line, no
        # traceback unless --verbose; anything else is a bug and keeps its traceback
        if args.verbose:
            raise
        print(_error_line(args.command, exc), file=sys.stderr)
        return _exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
