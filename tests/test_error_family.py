"""Every ``raise`` in ``src/xmodal`` raises the error family, or is a reviewed programming-error site.

A failure caused by the user's input or environment (a file, a folder, a setting, a dataset, a
run folder, a CLI value) must raise a subclass of :class:`xmodal.errors.XmodalError`, which the
CLI prints as one line. A raise of any other class is allowed only in a (module, function) of
:data:`ALLOWED`, where it reports a programming error (code calling an API with arrays of the
wrong shape, an internal invariant) and keeps its traceback. A new user-facing
``raise ValueError`` therefore fails this test until it is made a family error or reviewed here.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import typing
from pathlib import Path


import xmodal
from xmodal.errors import XmodalError

SRC = Path(xmodal.__file__).resolve().parent

#: (module, function) -> why its non-family raises are programming errors, not the user's input
ALLOWED: dict[tuple[str, str], str] = {
    # public API arguments: code calling a function wrongly gets the built-in error and its traceback
    ("xmodal.api", "load_run"): "prefer= is a Python keyword argument, not a file or setting",
    ("xmodal.api", "random_init_run"): "config= of the wrong Python type",
    ("xmodal.api", "extract_image_features"): "arrays of the wrong dtype/shape or batch_size passed by code",
    ("xmodal.api", "extract_point_features"): "arrays of the wrong shape or batch_size passed by code",
    ("xmodal.api", "_check_batch_size"): "batch_size passed by code",
    ("xmodal.api", "_checked_clouds"): "arrays with NaN or infinite values passed by code",
    ("xmodal.transforms", "images_to_tensor"): "arrays of the wrong dtype/shape passed by code",
    ("xmodal.transforms", "points_to_tensor"): "arrays of the wrong shape passed by code",
    ("xmodal.cli", "_positive_int"): "argparse turns ArgumentTypeError into its own usage error (exit 2)",
    ("xmodal.cli", "_nonneg_int"): "argparse turns ArgumentTypeError into its own usage error (exit 2)",
    ("xmodal.cli", "_int"): "argparse turns ArgumentTypeError into its own usage error (exit 2)",
    # data: numpy-level helpers fed validated meshes / clouds and validated settings
    ("xmodal.data.builtin", "_check_class"): "class names come from code (no spec option names a class)",
    ("xmodal.data.builtin", "make_shape"): "seed from code or a derived item index; face-count invariant",
    ("xmodal.data.geometry", "up_axis_index"): "up axes come from sources and checked manifests/run files",
    ("xmodal.data.geometry", "area_weighted_centroid"): "Mesh guarantees a finite positive area",
    ("xmodal.data.geometry", "normalize_unit_sphere"): "callers pass checked clouds; prepare records a failure per object",
    ("xmodal.data.prepare", "_process_object"): "a Source object (code) returned neither Mesh nor PointCloud",
    ("xmodal.data.prepare", "_open"): "a Source object (code) with an unknown kind",
    ("xmodal.data.prepare", "_collect"): "a worker died of a non-family exception: a bug, chained traceback kept",
    ("xmodal.data.render", "sample_view_angles"): "view counts and ranges from a validated PrepareConfig / code",
    ("xmodal.data.render", "_check_angles"): "camera arrays built by code",
    ("xmodal.data.render", "to_grayscale"): "arrays of the wrong dtype/shape passed by code",
    ("xmodal.data.render", "view_matrices"): "distance passed by code",
    ("xmodal.data.render", "Renderer.__init__"): "image size and distance from a validated config / code",
    ("xmodal.data.render", "Renderer.render_points"): "arrays of the wrong shape passed by code",
    ("xmodal.data.render", "Renderer._output"): "an out= buffer of the wrong shape passed by code",
    ("xmodal.data.render", "Renderer._draw"): "rendering after close(): misuse of the object",
    ("xmodal.data.render", "Renderer.gl_renderer"): "asking a closed renderer: misuse of the object",
    ("xmodal.data.sampling", "sample_surface"): "n from a validated config / code",
    ("xmodal.data.sampling", "_check_points"): "callers check cloud sizes first; prepare records a failure per object",
    ("xmodal.data.sampling", "farthest_point_sampling"): "start index from code; prepare records a failure per object",
    ("xmodal.data.sampling", "farthest_point_sampling_reference"): "start index from code (test reference)",
    ("xmodal.data.sampling", "sample_mesh_points"): "counts from a validated config / code",
    ("xmodal.data.shapenetpart", "PartSegSplit.__post_init__"): "arrays assembled by the readers, which check files",
    ("xmodal.data.shapenetpart", "resample_points"): "the readers refuse shapes without points first",
    ("xmodal.data.shapenetpart", "stratified_subset"): "fractions from a validated PartSegConfig / code",
    ("xmodal.data.shapenetpart", "load_partseg"): "an object of an unsupported Python type",
    ("xmodal.data.sources", "ModelNetH5Source.load_all"): "split names from code",
    ("xmodal.data.store", "_check_shard_arrays"): "arrays handed to the shard writer by code (prepare, converters)",
    ("xmodal.data.store", "write_store"): "arguments of the writer API passed by code",
    ("xmodal.data.store", "SplitView._locate"): "IndexError of a sequence-like API, indices from code",
    ("xmodal.data.store", "SplitView.index_of"): "KeyError of a mapping-like API; show/find_object turns it into DataError",
    ("xmodal.data.store", "SplitView.image"): "IndexError for a view index from code",
    ("xmodal.data.store", "SplitView.images"): "IndexError for view indices from code",
    ("xmodal.data.types", "Mesh.__setattr__"): "Mesh is immutable: setting an attribute is a bug",
    ("xmodal.data.types", "as_mesh"): "an object of an unsupported Python type",
    # evaluation: array helpers called by the task functions, which check the data first
    ("xmodal.eval.context", "EvalContext.check_stop"): "TaskStopped is internal: the runner stops cleanly on it",
    ("xmodal.eval.crossmodal", "pair_score_matrix"): "feature arrays of mismatched shapes from code",
    ("xmodal.eval.crossmodal", "select_gallery"): "max_items from a validated config",
    ("xmodal.eval.crossmodal", "rank_retrieval"): "score arrays of mismatched shapes from code",
    ("xmodal.eval.crossmodal", "crossmodal_metrics"): "feature arrays of mismatched lengths from code",
    ("xmodal.eval.descriptors", "d2_descriptor"): "clouds from a checked store; bins/pairs from code",
    ("xmodal.eval.features", "effective_views"): "view counts from a validated EvaluateConfig",
    ("xmodal.eval.features", "view_indices"): "v is capped by the caller",
    ("xmodal.eval.features", "view_features"): "views >= 1 guaranteed by the caller",
    ("xmodal.eval.features", "subsample_points"): "subset index from code (point_features counts from 0)",
    ("xmodal.eval.features", "point_features"): "subsets from a validated EvaluateConfig (point_subsets >= 1) / code",
    ("xmodal.eval.features", "pool_views"): "feature arrays of the wrong shape from code",
    ("xmodal.eval.fewshot", "sample_episodes"): "episode sizes from a validated config",
    ("xmodal.eval.fewshot", "fewshot_eval"): "feature/label arrays of mismatched shapes from code",
    ("xmodal.eval.figures", "tsne_embed"): "the t-SNE task skips splits with fewer than 3 objects",
    ("xmodal.eval.figures", "tsne_figure"): "panels assembled by code",
    ("xmodal.eval.linear_svm", "SquaredHingeSVC.fit"): "arrays of mismatched shapes from code",
    ("xmodal.eval.linear_svm", "newton_ovr_squared_hinge"): "a solver form / starting point passed by code",
    ("xmodal.eval.linear_svm", "_start_value"): "a starting point of the wrong shape passed by code",
    ("xmodal.eval.partseg", "_check_arrays"): "prediction arrays of mismatched shapes from code",
    ("xmodal.eval.partseg", "shape_ious"): "category ids checked by PartSegData",
    ("xmodal.eval.partseg", "face_labelling_accuracy"): "arrays from code; faces of a Mesh have positive area",
    ("xmodal.eval.partseg", "mean_face_accuracy"): "one ShapeFaces per shape, assembled by code",
    ("xmodal.eval.partseg", "restrict_predictions"): "logits of the wrong shape from code",
    ("xmodal.eval.partseg", "reinitialize"): "a module passed by code that cannot be re-initialised",
    ("xmodal.eval.partseg", "train_partseg"): "a model without trainable parameters / val without category_parts: code",
    ("xmodal.eval.partseg", "_pretrained_encoder"): "run= of an unsupported Python type",
    ("xmodal.eval.pretext", "sample_pairs"): "the pretext task skips splits with fewer than 2 objects",
    ("xmodal.eval.pretext", "pair_logits"): "feature arrays of mismatched lengths from code",
    ("xmodal.eval.pretext", "cross_modal_accuracy"): "arrays of mismatched shapes from code",
    ("xmodal.eval.pretext", "pair_distance_stats"): "arrays of mismatched shapes from code",
    ("xmodal.eval.pretext", "pretext_metrics"): "arrays of mismatched shapes from code",
    ("xmodal.eval.retrieval", "rank_gallery"): "feature arrays of the wrong shape / too few, checked by the task",
    ("xmodal.eval.retrieval", "_check_features"): "arrays of mismatched shapes / too few, checked by the task",
    ("xmodal.eval.retrieval", "query_chunk"): "chunk= of the retrieval API passed by code (no setting names it)",
    ("xmodal.eval.retrieval", "psb_query_mask"): "class names and labels assembled by code",
    ("xmodal.eval.retrieval", "psb_statistics"): "statistic parameters from code",
    ("xmodal.eval.svm", "_check_xy"): "arrays of mismatched shapes from code",
    ("xmodal.eval.svm", "linear_svm_eval"): "train/test features of different widths from code",
    # models and losses: tensors of the wrong shape, or constructor arguments from validated configs
    ("xmodal.losses", "_reduce"): "reduction= from code",
    ("xmodal.losses", "triplet_loss"): "tensors of mismatched shapes from code",
    ("xmodal.losses", "_check_pairs"): "tensors of mismatched shapes from code",
    ("xmodal.losses", "pair_accuracy"): "tensors of mismatched shapes from code",
    ("xmodal.losses", "self_supervised_loss"): "both loss terms off: loss.mode is validated by the config",
    ("xmodal.losses", "pair_scores"): "logits of the wrong shape from code",
    ("xmodal.losses", "_check_matrix"): "tensors of the wrong shape/dtype from code",
    ("xmodal.losses", "batch_cross_modal_loss"): "batch invariant of the sampler",
    ("xmodal.train.trust", "apply_trust_ratio_"): "coefficient= from code; optim.point_trust is validated by the config",
    ("xmodal.train.averaging", "WeightAverage.networks"): "asked before the first sample: code (the trainer checks count)",
    ("xmodal.train.checkpoint", "save_checkpoint"): "extra_tensors named like the model's or optimiser's: code",
    ("xmodal.losses", "batch_pair_bce"): "batch invariant of the sampler",
    ("xmodal.losses", "channel_decorrelation"): "a tensor of the wrong shape from code",
    ("xmodal.losses", "TripletLoss.__init__"): "reduction= from code",
    ("xmodal.losses", "CrossModalLoss.__init__"): "reduction= from code",
    ("xmodal.models.dgcnn", "knn"): "features of the wrong shape from code",
    ("xmodal.models.dgcnn", "_EdgeConvBase._check"): "features of the wrong shape from code",
    ("xmodal.models.dgcnn", "EdgeConv.forward_cl"): "features of the wrong shape from code",
    ("xmodal.models.dgcnn", "EdgeConv._autograd_bn"): "a module configuration that cannot synchronise: code",
    ("xmodal.models.dgcnn", "sync_edgeconv_stats"): "a module configuration that cannot synchronise: code",
    ("xmodal.models.dgcnn", "DGCNN.__init__"): "k from a validated config (load_run builds run files' kwargs first)",
    ("xmodal.models.dgcnn", "DGCNN._check"): "points of the wrong shape from code",
    ("xmodal.models.heads", "PairClassifier.__init__"): "input_norm from a validated config",
    ("xmodal.models.heads", "PairClassifier.forward"): "features of the wrong shape from code",
    ("xmodal.models.heads", "PairClassifier.pair_logits"): "features of the wrong shape from code",
    ("xmodal.models.heads", "PairClassifier.project"): "projection heads used on a classifier without them",
    ("xmodal.models.partseg", "PartSegNet.__init__"): "sizes from the part-segmentation data and a validated config",
    ("xmodal.models.partseg", "PartSegNet.features"): "categories missing or of the wrong length: code",
    ("xmodal.models.registry", "_dgcnn_reference"): "fast=True passed by code to the reference implementation",
    ("xmodal.models.registry", "PluginImageEncoder.forward"): "images of the wrong shape from code",
    ("xmodal.models.resnet", "ResNet.__init__"): "stage layout / channels from code",
    ("xmodal.models.resnet", "ResNet._check_input"): "images of the wrong shape from code",
    # training internals (settings are checked by PretrainConfig before they get here)
    ("xmodal.train.augment", "as_rng"): "a seed is required by design: a call without one is a bug",
    ("xmodal.train.augment", "resize_images"): "images of the wrong dtype/shape from code",
    ("xmodal.train.augment", "crop_resize_flip"): "arrays of the wrong shape from code",
    ("xmodal.train.augment", "rotate_points"): "points of the wrong shape from code",
    ("xmodal.train.augment", "jitter_points"): "noise of the wrong shape from code",
    ("xmodal.train.augment", "scale_shift_points"): "points, scales or shifts of the wrong shape from code",
    ("xmodal.train.checkpoint", "_jsonable"): "a non-JSON object in a state written by code",
    ("xmodal.train.checkpoint", "write_safetensors"): "an OSError inside atomic_path, which raises WriteError naming the file",
    ("xmodal.train.distributed", "GlobalBatchNorm._check_input_dim"): "input of the wrong rank from code",
    ("xmodal.train.sampler", "PretrainBatches.__init__"): "rank/world size, point_subsample and ranges from code",
    ("xmodal.train.sampler", "check_training_split"): "a world size below 1 from code (torchrun sets it)",
    ("xmodal.train.sampler", "PretrainBatches.__getitem__"): "IndexError of a sequence API, indices from code",
    ("xmodal.train.step", "pooled_view_rows"): "embeddings of the wrong shape from code",
    ("xmodal.train.step", "Stepper.__call__"): "StepDiverged is internal: the trainer turns it into TrainingDiverged",
    ("xmodal.utils.io", "_json_default"): "a non-JSON object written by code",
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "__main__.py":  # importing it runs the CLI; it raises nothing
            assert "raise" not in path.read_text(encoding="utf-8")
            continue
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out.append((".".join(parts), path))
    return out


class _Raises(ast.NodeVisitor):
    """``(function qualname, class qualname or None, line, raised expression)`` of each ``raise X``."""

    def __init__(self):
        self.stack: list[tuple[str, str]] = []  # (kind, name)
        self.found: list[tuple[str, str | None, int, ast.expr]] = []

    def _scope(self, node, kind):
        self.stack.append((kind, node.name))
        self.generic_visit(node)
        self.stack.pop()

    def visit_FunctionDef(self, node):
        self._scope(node, "def")

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._scope(node, "class")

    def visit_Raise(self, node):
        if node.exc is not None:
            name = ".".join(n for _, n in self.stack) or "<module>"
            cls = next((".".join(n for _, n in self.stack[: i + 1]) for i in range(len(self.stack) - 1, -1, -1)
                        if self.stack[i][0] == "class"), None)
            self.found.append((name, cls, node.lineno, node.exc))
        self.generic_visit(node)


def _lookup(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve(module, cls_name: str | None, expr: ast.expr):
    """The exception class a raise expression raises, or None for a re-raise of a caught object."""
    target = expr.func if isinstance(expr, ast.Call) else expr
    if isinstance(target, ast.Name) and not isinstance(expr, ast.Call) and target.id not in vars(module):
        return None  # ``raise exc``: re-raises an exception caught above
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
        obj = getattr(_lookup(module, cls_name), target.attr)
    else:
        dotted = ast.unparse(target)
        obj = _lookup(module if dotted.split(".")[0] in vars(module) else builtins, dotted)
    if isinstance(obj, type):
        return obj
    return typing.get_type_hints(obj, vars(module))["return"]  # a factory: the class it returns


def _raise_sites():
    """``(module, function, line, class)`` of every raise in the package."""
    sites = []
    for modname, path in _modules():
        module = importlib.import_module(modname)
        visitor = _Raises()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        for func, cls_name, line, expr in visitor.found:
            exc = _resolve(module, cls_name, expr)
            if exc is not None:
                sites.append((modname, func, line, exc))
    return sites


SITES = _raise_sites()


def test_the_walk_finds_the_raise_sites():
    # the walk sees the family raises, factories included (utils.io._write_error -> WriteError)
    family = {exc.__name__ for *_, exc in SITES if issubclass(exc, XmodalError)}
    assert {"ConfigError", "DataError", "MeshError", "StoreError", "CheckpointError", "WriteError"} <= family
    assert ("xmodal.utils.io", "atomic_path", "WriteError") in {(m, f, e.__name__) for m, f, _, e in SITES}
    assert len(SITES) > 300


def test_every_non_family_raise_is_reviewed():
    unreviewed = [
        f"{mod}:{line} {func}: raise {exc.__name__}"
        for mod, func, line, exc in SITES
        if not issubclass(exc, XmodalError) and (mod, func) not in ALLOWED
    ]
    assert not unreviewed, "raise a class of xmodal.errors (or review the site in ALLOWED):\n" + "\n".join(unreviewed)


def test_allow_list_has_no_stale_entries():
    used = {(mod, func) for mod, func, _, exc in SITES if not issubclass(exc, XmodalError)}
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"ALLOWED entries without a non-family raise (remove them): {stale}"
    assert all(reason.strip() for reason in ALLOWED.values())


#: the built-in exception each family class replaced (old ``except`` clauses still catch it)
BUILTIN_BASE = {
    "ConfigError": ValueError, "DataError": ValueError, "MeshError": ValueError, "LabelsError": ValueError,
    "StoreError": ValueError, "PrepareError": ValueError, "PartSegError": ValueError,
    "CheckpointError": RuntimeError, "TrainingDiverged": RuntimeError, "OutputLockedError": RuntimeError,
    "OutputExistsError": FileExistsError, "MissingInputError": FileNotFoundError, "WriteError": OSError,
    "MissingPackageError": ImportError, "Interrupted": Exception,
}


def test_family_classes_keep_their_builtin_base():
    errors = importlib.import_module("xmodal.errors")
    family = {n: c for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, XmodalError)}
    assert set(family) - {"XmodalError"} == set(BUILTIN_BASE) == set(errors.__all__) - {"XmodalError"}
    for name, base in BUILTIN_BASE.items():
        assert issubclass(family[name], base), name
