"""Joining the parts of a sharded ``prepare`` into one dataset: :func:`merge_datasets`.

``xmodal prepare ... --shard I/N`` builds, on any machine, the chunks of part I of a dataset
(:mod:`xmodal.data.sharding`); every part holds the whole plan (``plan.json``: settings, source,
classes, every object) plus its own shard files. A merge checks that the parts belong together,
then gathers their shard files (hard links where the file system allows, else copies; every
file lands atomically) and writes the manifest exactly as an unsharded ``prepare`` does. The
result equals the unsharded build: the same ``plan.json``, the same shard files (so the same
ids in the same order, points, images, labels, cameras, point labels), the same ``failed``
list, the same ``manifest.json``. Only ``prepare.yaml`` (the first part's config, with ``out``
set to the merged folder and no ``shard``; its ``workers`` are that part's) and the lock file
can differ. ``xmodal prepare`` with the unsharded command into the merged folder finds every
shard written and has nothing to do.

Refused, naming the part and what differs: a folder that is not a finished part (no plan, no
shard, no manifest yet), parts of different N, a part given twice, a missing part, parts built
with other settings (views, points, image size, seed, test ratio, grayscale, chunk size, ...),
another source (its description, less file paths: machines may mount the data elsewhere), or
another class or object list (e.g. another ``?classification=``).

A merge is quick (links) and can simply be run again when it stopped half-way; one process
merges into a folder at a time (:func:`xmodal.utils.lock.output_lock`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from xmodal.config import load_config, save_config
from xmodal.data.prepare import (
    CONFIG_NAME,
    claim_output,
    describe_difference,
    finalize_store,
    identity_settings,
    plan_key,
)
from xmodal.data.prepare_config import PrepareConfig
from xmodal.data.sharding import format_shard, shard_chunks
from xmodal.data.store import MANIFEST_NAME, PLAN_NAME, failed_relpath, shard_relpath, validate_manifest
from xmodal.errors import ConfigError, DataError, MissingInputError
from xmodal.utils.io import atomic_path, read_json
from xmodal.utils.lock import output_lock

__all__ = ["merge_datasets"]

log = logging.getLogger(__name__)

#: keys of a source description that name files or folders (ignored when comparing parts)
_PATH_KEYS = ("spec", "root", "cla_files")


@dataclass(frozen=True)
class _Part:
    """One finished part: its folder, plan, manifest and ``(I, N)``."""

    path: Path
    plan: dict
    manifest: dict
    shard: tuple[int, int]

    @property
    def name(self) -> str:
        return f"part {format_shard(self.shard)} ({self.path})"


def _read_json_of(path: Path, part: Path) -> dict:
    try:
        data = read_json(path)
    except ValueError as exc:
        raise DataError(f"{path.name} is unreadable ({exc})", path=part) from exc
    if not isinstance(data, dict):
        raise DataError(f"{path.name} is not a JSON object", path=part)
    return data


def _read_part(path: Path) -> _Part:
    """A finished part of a sharded prepare, or an error saying what the folder is instead."""
    if not path.is_dir():
        raise MissingInputError("no such dataset folder", path=path)
    if not (path / PLAN_NAME).is_file():
        raise DataError(f"not a folder written by 'xmodal prepare --shard I/N' (no {PLAN_NAME})", path=path)
    plan = _read_json_of(path / PLAN_NAME, path)
    shard = plan.get("shard")
    if shard is None:
        raise DataError("was prepared without --shard: it is a whole dataset, not a part", path=path,
                        hint="prepare each part with the same command plus --shard I/N, then merge the parts")
    shard = _part_of(plan, path)
    if not (path / MANIFEST_NAME).is_file():
        raise DataError(f"part {format_shard(shard)} is unfinished (no {MANIFEST_NAME} yet)", path=path,
                        hint=f"run its 'xmodal prepare ... --shard {format_shard(shard)}' command again to finish it")
    manifest = validate_manifest(_read_json_of(path / MANIFEST_NAME, path), path / MANIFEST_NAME)
    if manifest.get("shard") != plan["shard"]:
        raise DataError(f"{MANIFEST_NAME} and {PLAN_NAME} describe different parts", path=path,
                        hint="run its 'xmodal prepare' command again")
    return _Part(path, plan, manifest, shard)


def _is_count(x, lo: int = 1) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _part_of(plan: dict, part: Path) -> tuple[int, int]:
    """The ``(I, N)`` of a part's plan, once what the merge builds paths and counts from is
    checked: ``shard`` with 1 <= I <= N, ``settings.chunk_size`` >= 1, and ``items`` mapping plain
    split names (each names a folder of the output: no separator, no ``..``) to lists."""
    shard, items = plan.get("shard"), plan.get("items")
    settings = plan.get("settings") if isinstance(plan.get("settings"), dict) else {}
    if not isinstance(shard, dict) or not _is_count(shard.get("count")) or not _is_count(shard.get("index")) \
            or shard["index"] > shard["count"]:
        raise DataError(f"{PLAN_NAME}: 'shard' must be {{'index': I, 'count': N}} with 1 <= I <= N", path=part)
    if not _is_count(settings.get("chunk_size")) or not isinstance(items, dict) or not all(
            isinstance(v, list) for v in items.values()):
        raise DataError(f"{PLAN_NAME}: 'settings.chunk_size' (>= 1) and 'items' (split -> objects) are needed",
                        path=part)
    bad = [s for s in items if not s or s in (".", "..") or any(c in s for c in "/\\\0")]
    if bad:
        raise DataError(f"{PLAN_NAME}: split name {bad[0]!r} is not a plain folder name", path=part)
    return shard["index"], shard["count"]


def _whole(plan: dict) -> dict:
    """The plan of the unsharded dataset: a part's plan less its ``shard``."""
    return {k: v for k, v in plan.items() if k != "shard"}


def _difference(a: _Part, b: _Part) -> str:
    """How ``b`` was built differently from ``a`` (``""``: the same): settings first, then the
    source, then the class and object lists."""
    pa, pb = _whole(a.plan), _whole(b.plan)
    sa, sb = identity_settings(pa), identity_settings(pb)
    diffs = [f"{k}: {sa.get(k)!r} -> {sb.get(k)!r}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    if not diffs:
        ra = {k: v for k, v in (pa.get("source") or {}).items() if k not in _PATH_KEYS}
        rb = {k: v for k, v in (pb.get("source") or {}).items() if k not in _PATH_KEYS}
        diffs = [f"source {k}: {ra.get(k)!r} -> {rb.get(k)!r}" for k in sorted(set(ra) | set(rb))
                 if ra.get(k) != rb.get(k)]
    if not diffs and plan_key(pa) != plan_key(pb):
        diffs = [describe_difference(pa, pb)]
    for key in ("up_axis", "part_names"):
        if not diffs and a.manifest.get(key) != b.manifest.get(key):
            diffs = [f"{key}: {a.manifest.get(key)!r} -> {b.manifest.get(key)!r}"]
    return ", ".join(diffs)


def _check_parts(parts: list[_Part], out: Path) -> None:
    """All N parts of one dataset, each once, built alike; else a :class:`DataError` naming the part
    (or ``out``, the dataset being merged, when a part is missing)."""
    first = parts[0]
    n = first.shard[1]
    seen: dict[tuple[int, int], _Part] = {}
    for part in parts:
        if part.shard[1] != n:
            raise DataError(f"is part {format_shard(part.shard)}, but {first.name} is one of {n} parts; "
                            "all parts must come from the same --shard I/N split", path=part.path)
        if part.shard in seen:
            raise DataError(f"is part {format_shard(part.shard)}, given twice (also {seen[part.shard].path})",
                            path=part.path)
        seen[part.shard] = part
    missing = [format_shard((i, n)) for i in range(1, n + 1) if (i, n) not in seen]
    if missing:
        raise DataError(f"part {', '.join(missing)} of the dataset missing (given: "
                        f"{', '.join(p.name for p in sorted(parts, key=lambda p: p.shard))})",
                        path=out, hint="pass every part's folder, or build the missing ones with --shard")
    for part in parts[1:]:
        diff = _difference(first, part)
        if diff:
            raise DataError(f"{part.name} was built differently from {first.name}: {diff}; every part must be "
                            "prepared with the same source and settings (only --shard differs)", path=part.path)


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    """Put ``src`` at ``dst`` atomically: a hard link when ``link`` and the file system allow, else a copy."""
    if dst.is_file() and os.path.samefile(src, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return
        except OSError:  # another file system, or no hard links there: copy
            tmp.unlink(missing_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _gather(part: _Part, out: Path, plan: dict, link: bool) -> int:
    """Put the part's shard and failure files into ``out``; returns the number of shards."""
    sizes = {split: len(recs) for split, recs in plan["items"].items()}
    chunks = shard_chunks(sizes, plan["settings"]["chunk_size"], part.shard)
    for split, c in chunks:
        src = part.path / shard_relpath(split, c)
        if not src.is_file():
            raise DataError(f"{shard_relpath(split, c)} is missing, though the part is finished", path=part.path,
                            hint=f"run its 'xmodal prepare ... --shard {format_shard(part.shard)}' command again")
        _link_or_copy(src, out / shard_relpath(split, c), link)
        failed = failed_relpath(split, c)
        if (part.path / failed).is_file():
            _link_or_copy(part.path / failed, out / failed, link)
        else:
            (out / failed).unlink(missing_ok=True)
    return len(chunks)


def _write_config(part: Path, out: Path) -> None:
    """``out/prepare.yaml``: the part's resolved config, for the merged folder and without ``shard``."""
    path = part / CONFIG_NAME
    if not path.is_file():
        return
    try:
        cfg = load_config(PrepareConfig, path)
    except (ConfigError, ValueError, OSError) as exc:
        log.warning("%s: not copied to the merged dataset (%s)", path, exc)
        return
    save_config(dataclasses.replace(cfg, out=str(out), shard=""), out / CONFIG_NAME)


def merge_datasets(parts: Iterable["str | os.PathLike"], out: "str | os.PathLike", *, overwrite: bool = False,
                   link: bool = True) -> dict:
    """Join the N parts of a sharded ``prepare`` (``--shard 1/N`` ... ``N/N``) into the dataset ``out``.

    Args:
        parts: the parts' folders, in any order; every part exactly once.
        out: the merged dataset folder (created; a re-run into it finishes or repeats the merge).
        overwrite: replace a different dataset in ``out``.
        link: hard-link the shard files where the file system allows (else they are copied);
            False always copies.

    Returns:
        The manifest, equal to the manifest of the unsharded ``prepare``.

    Raises:
        DataError: a folder is not a finished part, a part is missing or given twice, parts
            differ in N, settings, source, classes or objects (the message names the part and
            the setting).
        OutputExistsError: ``out`` holds another dataset and ``overwrite`` is False.
        OutputLockedError: another process is writing ``out``.
    """
    out = Path(out)
    read = [_read_part(Path(p)) for p in parts]
    if not read:
        raise ConfigError("merge: no parts given")
    _check_parts(read, out)
    read.sort(key=lambda p: p.shard)
    for part in read:
        if out.exists() and os.path.samefile(out, part.path):
            raise DataError(f"the output folder is {part.name} itself; merge into a new folder", path=out)
    plan = _whole(read[0].plan)
    with output_lock(out, "merge"):
        plan = claim_output(out, plan, overwrite, hint="choose another --out, or pass --overwrite to replace it")
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # the manifest comes last, when every shard is in
        n_shards = sum(_gather(part, out, plan, link) for part in read)
        _write_config(read[0].path, out)
        first = read[0].manifest
        manifest = finalize_store(out, plan, up_axis=first["up_axis"], part_names=first["part_names"])
    log.info("merged %d parts (%d shard files) into %s", len(read), n_shards, out)
    return manifest
