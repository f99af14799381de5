"""Settings of the ``prepare`` stage (:class:`PrepareConfig`).

Resolved by :mod:`xmodal.config` like every stage's config: dataclass defaults <- ``key=value``
overrides. On the command line the ``xmodal prepare`` flags map onto these fields
(``--image-size`` -> ``image_size``, ``--rgb`` -> ``grayscale=false``, ...). The resolved config
is written to ``DATASET/prepare.yaml``.

The settings that shape the data (views, points, image size, colour, seed, test ratio,
oversampling, chunk size) are also recorded in ``plan.json`` and the manifest, and a re-run
into the same folder must repeat them (or ``overwrite``); ``workers`` only sets the speed.
``shard`` (``I/N``) builds one of N disjoint parts of the dataset (:mod:`xmodal.data.sharding`),
which ``xmodal merge`` joins into the dataset an unsharded build writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.config import paths_to_str, require_fields
from xmodal.data.sharding import parse_shard
from xmodal.errors import ConfigError

__all__ = ["PrepareConfig"]


@dataclass
class PrepareConfig:
    """Everything that determines a ``prepare`` job (defaults: 12 views of 224 px, 2,048 points)."""

    #: a spec for :func:`xmodal.data.sources.open_source`: ``builtin:shapes[?train=32&test=8]``,
    #: a mesh folder (ModelNet layout or class sub-folders), a Princeton Shape Benchmark folder
    #: (``DIR?classification=coarse1``), a Labeled PSB folder or a ModelNet40 HDF5 folder
    source: str = ""
    #: the dataset folder to write (or to resume)
    out: str = ""
    #: V rendered views per object (0: points only; the paper renders 180)
    views: int = 12
    #: N points per cloud
    points: int = 2048
    #: S, the side of the square images in pixels
    image_size: int = 224
    #: processes (1: in this process)
    workers: int = 1
    #: seeds cameras and point sampling (per object: ``(seed, id)``) and the split of sources without one
    seed: int = 0
    #: objects per shard (the unit of resumption and of parallel work)
    chunk_size: int = 32
    #: held-out test fraction for sources without a split
    test_ratio: float = 0.2
    #: 1-channel images (the paper's renders); false stores RGB (V, S, S, 3)
    grayscale: bool = True
    #: point-cloud sources: render splat images of the points (false: such a store has no images)
    render_points: bool = True
    #: surface candidates per output point before farthest point sampling
    oversample: int = 8
    #: meshes with more faces are listed under ``failed`` instead of prepared; 0: no fixed
    #: limit, a mesh fails only when it would need more memory than each worker's share of the
    #: memory available when the job starts (``xmodal.data.mesh_limit``); like ``workers``, it
    #: is not part of the dataset's settings
    max_faces: int = 0
    #: replace an existing dataset made with other settings
    overwrite: bool = False
    #: ``I/N``: build only part I of N (1 <= I <= N) of the objects, for ``xmodal merge``
    #: (see :mod:`xmodal.data.sharding`); empty: the whole dataset
    shard: str = ""

    def __post_init__(self) -> None:
        paths_to_str(self, "source", "out")

    def validate(self) -> None:
        for key in ("views", "points", "image_size", "workers", "chunk_size", "oversample", "max_faces"):
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, int):
                raise ConfigError(f"{key} must be an integer, got {val!r}")
        if self.views < 0:
            raise ConfigError(f"views must be >= 0 (0: no images), got {self.views}")
        if self.points <= 0:
            raise ConfigError(f"points must be > 0, got {self.points}")
        if not 16 <= self.image_size <= 4096:
            raise ConfigError(f"image_size must be in [16, 4096] pixels, got {self.image_size}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_faces < 0:
            raise ConfigError(f"max_faces must be >= 0 (0: limited by the available memory), got {self.max_faces}")
        if self.oversample < 1:
            raise ConfigError(f"oversample must be >= 1, got {self.oversample}")
        if not 0.0 <= float(self.test_ratio) < 1.0:
            raise ConfigError(f"test_ratio must be in [0, 1), got {self.test_ratio}")
        parse_shard(self.shard)

    def require_paths(self, *, source: bool = True) -> None:
        """Raise :class:`ConfigError` unless ``out`` (and, with ``source=True``, ``source``) is given."""
        require_fields(self, *(("source", "out") if source else ("out",)))
