"""Contact sheet of one prepared object: its rendered views beside its point cloud.

``xmodal show DATASET ID --out sheet.png`` is the quickest check that a
``prepare`` run produced what it should (cameras all around, sensible shading,
points on the surface, part labels where expected).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Optional, Union

import numpy as np

from xmodal.data.geometry import to_z_up
from xmodal.data.datasets import open_dataset
from xmodal.data.store import ShapeStore
from xmodal.errors import ConfigError, DataError
from xmodal.utils.io import atomic_path

__all__ = ["show", "find_object"]


def find_object(store: ShapeStore, object_id: Union[str, int], split: Optional[str] = None) -> tuple[str, int]:
    """``(split, index)`` of an object given by id, or by integer index into ``split`` (default train).

    Raises:
        DataError: naming the dataset: no such object (with a few suggestions), an index out
            of range, or no such split (:class:`~xmodal.errors.StoreError`).
    """
    where = store.root if store.root is not None else "dataset"
    if isinstance(object_id, (int, np.integer)) and not isinstance(object_id, bool):
        name = split or _index_split(store, where, int(object_id))
        view = store.split(name)
        i = int(object_id)
        if not -view.n <= i < view.n:
            raise DataError(f"index {i} out of range for split '{name}' with {view.n} objects", path=where)
        return name, i % view.n if view.n else i
    object_id = str(object_id)
    splits = [split] if split else store.splits
    all_ids: list[str] = []
    for name in splits:
        view = store.split(name)
        try:
            return name, view.index_of(object_id)
        except KeyError:
            all_ids.extend(view.ids)
    close = difflib.get_close_matches(object_id, all_ids, n=5, cutoff=0.5) or all_ids[:5]
    in_split = f" in split '{split}'" if split else ""
    hint = f"; did you mean one of {close}?" if close else " (it holds no objects)"
    raise DataError(f"no object '{object_id}'{in_split}{hint}", path=where)


def _index_split(store: ShapeStore, where, index: int) -> str:
    """``train``, the split an object index refers to when none is named."""
    if "train" in store.splits:
        return "train"
    splits = ", ".join(store.splits) or "none"
    raise DataError(f"no split 'train' to take object {index} from (splits: {splits})", path=where,
                    hint=f"name the split, e.g. --split {store.splits[0]}" if store.splits else None)


def show(
    dataset: Union[str, os.PathLike, ShapeStore],
    object_id: Union[str, int],
    out: Union[str, os.PathLike],
    *,
    split: Optional[str] = None,
    max_views: int = 12,
    dpi: int = 100,
) -> Path:
    """Write a contact sheet of one object and return its path.

    Args:
        dataset: a store folder, a raw ModelNet40 HDF5 folder, or an open :class:`ShapeStore`.
        object_id: an object id (searched in ``split``, or every split) or an integer
            index into ``split`` (default ``"train"``).
        out: image file to write (atomically), in the format its suffix names (``.png``, ``.pdf``,
            ``.svg``, ``.jpg``, ...: what matplotlib writes; PNG without a suffix); an existing
            folder gets ``<id>.png`` inside.
        split: split to look in.
        max_views: at most this many views are shown (the first ones).
        dpi: resolution of a raster image.

    Returns:
        The written path.
    """
    if max_views < 0:
        raise ConfigError(f"max_views must be >= 0, got {max_views}")
    out = Path(out)
    if out.is_dir():
        fmt = "png"
    else:
        fmt = image_format(out)
    store = dataset if isinstance(dataset, ShapeStore) else open_dataset(dataset)
    name, i = find_object(store, object_id, split)
    view = store.split(name)
    oid = view.ids[i]
    cls = store.classes[int(view.labels[i])]
    pts = view.points(i)
    plab = view.point_labels(i)
    n_views = min(store.views, max_views) if view.has_images else 0
    images = view.images(i, range(n_views)) if n_views else None
    cams = view.cameras(i) if n_views else None

    if out.is_dir():
        out = out / (re.sub(r"[^A-Za-z0-9._-]+", "_", oid) + ".png")

    fig = _draw(oid, cls, name, i, images, cams, pts, plab, store.part_names, store.up_axis)
    with atomic_path(out, suffix=f".{fmt}") as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return out


def image_format(path: Path) -> str:
    """The matplotlib format named by ``path``'s suffix (``"png"`` without one); a
    :class:`~xmodal.errors.ConfigError` naming the path for a suffix matplotlib cannot write."""
    from matplotlib.figure import Figure

    fmt = path.suffix[1:].lower()
    if not fmt:
        return "png"
    supported = Figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ConfigError(f"cannot write a {path.suffix} image (formats: {', '.join(sorted(supported))})", path=path)
    return fmt


def _draw(oid, cls, split, index, images, cams, pts, plab, part_names, up_axis):
    # Figure + Agg canvas directly (not pyplot): no global state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the 3d projection)

    k = 0 if images is None else len(images)
    ncols = math.ceil(math.sqrt(k)) if k else 0
    nrows = math.ceil(k / ncols) if k else 0
    cell, cloud = 1.7, 4.6
    width = ncols * cell + cloud + 0.4
    height = max(nrows * cell + 0.2, cloud) + 0.6
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{oid}   class: {cls}   ({split} #{index})", fontsize=11)
    if k:
        outer = fig.add_gridspec(1, 2, width_ratios=[ncols * cell, cloud])
        grid = outer[0].subgridspec(nrows, ncols)
        cloud_spec = outer[1]
        for v in range(k):
            ax = fig.add_subplot(grid[v // ncols, v % ncols])
            img = images[v]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            label = f"v{v}"
            if cams is not None:
                label += f"  az {cams[v, 0]:.0f}° pol {cams[v, 1]:.0f}°"
            ax.set_title(label, fontsize=7)
            ax.set_axis_off()
    else:
        cloud_spec = fig.add_gridspec(1, 1)[0]

    ax = fig.add_subplot(cloud_spec, projection="3d")
    p = to_z_up(pts, up_axis)  # plotted as (x, y, vertical): a rotation, so not mirrored
    if plab is not None:
        parts = np.unique(plab)
        cmap = _cmap("tab20")
        colors = cmap(np.searchsorted(parts, plab) % 20)
        ax.scatter(p[:, 0], p[:, 1], p[:, 2], c=colors, s=2, depthshade=False)
        handles = []
        from matplotlib.lines import Line2D

        for j, part in enumerate(parts[:12]):
            name = part_names[part] if part_names is not None and 0 <= part < len(part_names) else f"part {part}"
            handles.append(Line2D([], [], ls="", marker="o", ms=4, color=cmap(j % 20), label=name))
        ax.legend(handles=handles, loc="upper left", fontsize=6, frameon=False)
    else:
        ax.scatter(p[:, 0], p[:, 1], p[:, 2], c=p[:, 2], cmap="viridis", s=2, depthshade=False)
    lim = max(1.0, float(np.abs(p).max()) if len(p) else 1.0)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_zlim(-lim, lim)
    ax.set_box_aspect((1, 1, 1))
    ax.set_title(f"{len(pts)} points ({up_axis} up)", fontsize=8)
    ax.tick_params(labelsize=6)
    return fig


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name]
