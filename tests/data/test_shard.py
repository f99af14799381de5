"""Sharded prepare (``--shard I/N``) and ``merge``: the merged parts equal the unsharded build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest


from xmodal.cli import main  # noqa: E402
from xmodal.config import load_config  # noqa: E402
from xmodal.data.builtin import BuiltinSource  # noqa: E402
from xmodal.data.merge import merge_datasets  # noqa: E402
from xmodal.data.prepare import PrepareConfig, prepare  # noqa: E402
from xmodal.data.sharding import parse_shard, plan_chunks, shard_chunks  # noqa: E402
from xmodal.data.store import ShapeStore, shard_relpath  # noqa: E402
from xmodal.errors import (  # noqa: E402
    ConfigError, DataError, MeshError, OutputExistsError, OutputLockedError,
)

# 14 classes x (1 train + 1 test) = 28 objects; chunks of 5: train 5+5+4, test 5+5+4 -> 6 chunks
KW = dict(views=2, points=64, image_size=32, chunk_size=5)
N = 3


class _OneBroken(BuiltinSource):
    """The built-in shapes with one object that cannot be loaded, so that ``failed`` is not empty."""

    broken = "chair/train/chair_0000"

    def load(self, item):
        if item.id == self.broken:
            raise MeshError(f"builtin:{item.id}", "broken on purpose")
        return super().load(item)


def _source() -> _OneBroken:
    return _OneBroken(train_per_class=1, test_per_class=1)


def _build(out: Path, **kw) -> Path:
    prepare(PrepareConfig(out=out, **{**KW, **kw}), source=_source(), progress=False)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The unsharded build, its N parts and their merge (read-only for the tests)."""
    root = tmp_path_factory.mktemp("shard")
    whole = _build(root / "whole")
    parts = [_build(root / f"part{i}", shard=f"{i}/{N}") for i in range(1, N + 1)]
    merge_datasets(reversed(parts), root / "merged")  # any order
    return {"root": root, "whole": whole, "parts": parts, "merged": root / "merged"}


def _arrays(root: Path) -> dict:
    store = ShapeStore(root)
    out = {}
    for split in store.splits:
        sv = store.split(split)
        out[split] = {
            "ids": sv.ids,
            "labels": sv.labels,
            "points": sv.all_points(),
            "images": np.stack([sv.images(i) for i in range(sv.n)]),
            "cameras": np.stack([sv.cameras(i) for i in range(sv.n)]),
            "point_labels": np.stack([sv.point_labels(i) for i in range(sv.n)]),
        }
    return out


def _assert_same_arrays(a: Path, b: Path) -> None:
    x, y = _arrays(a), _arrays(b)
    assert x.keys() == y.keys()
    for split in x:
        assert x[split]["ids"] == y[split]["ids"]
        for key in ("labels", "points", "images", "cameras", "point_labels"):
            np.testing.assert_array_equal(x[split][key], y[split][key], err_msg=f"{split}/{key}")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _copy_parts(built, tmp_path) -> list[Path]:
    return [Path(shutil.copytree(p, tmp_path / p.name)) for p in built["parts"]]


def _edit(path: Path, edit) -> None:
    data = _json(path)
    edit(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("text, want", [("", None), ("1/1", (1, 1)), ("2/3", (2, 3)), (" 3/3 ", (3, 3))])
def test_parse_shard(text, want):
    assert parse_shard(text) == want


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", "-1/2"])
def test_parse_shard_refuses_bad_parts(text):
    with pytest.raises(ConfigError, match="I/N"):
        parse_shard(text)
    with pytest.raises(ConfigError, match="shard"):
        PrepareConfig(source="builtin:shapes", out="x", shard=text).validate()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 11])
def test_parts_partition_the_chunks_evenly(n):
    sizes = {"train": 23, "test": 7}
    every = plan_chunks(sizes, 4)
    assert every == [("train", c) for c in range(6)] + [("test", 0), ("test", 1)]
    parts = [shard_chunks(sizes, 4, (i, n)) for i in range(1, n + 1)]
    assert sorted(c for p in parts for c in p) == sorted(every)  # each chunk in exactly one part
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_chunks(sizes, 4, None) == every


# --------------------------------------------------------------------------- prepare + merge


def test_three_parts_merged_equal_the_unsharded_build(built):
    whole, merged = built["whole"], built["merged"]
    _assert_same_arrays(merged, whole)
    man = _json(merged / "manifest.json")
    assert man == _json(whole / "manifest.json")  # every key: counts, shards, shard sizes, failed, source, ...
    assert [f["id"] for f in man["failed"]] == [_OneBroken.broken]
    assert _json(merged / "plan.json") == _json(whole / "plan.json")
    # prepare.yaml: part 1's config, for the merged folder, unsharded: the unsharded build's but for `out`
    cfg = load_config(PrepareConfig, merged / "prepare.yaml")
    assert cfg.shard == "" and cfg == replace(load_config(PrepareConfig, whole / "prepare.yaml"), out=str(merged))
    # the shard files are the unsharded build's, hard-linked from the parts
    for rel in man["shards"]["train"] + man["shards"]["test"]:
        assert any(os.path.samefile(merged / rel, p / rel) for p in built["parts"] if (p / rel).exists()), rel


def test_each_part_is_a_store_of_its_own_objects(built):
    whole = ShapeStore(built["whole"])
    seen: list[str] = []
    for i, part in enumerate(built["parts"], start=1):
        man = _json(part / "manifest.json")
        assert man["shard"] == {"index": i, "count": N}
        store = ShapeStore(part)
        # part i holds the chunks g = i-1, i-1+N, ... of the plan: train/i-1 and test/i-1 here
        assert man["shards"] == {"train": [shard_relpath("train", i - 1)], "test": [shard_relpath("test", i - 1)]}
        for split in store.splits:
            ids = store.split(split).ids
            assert ids and set(ids) <= set(whole.split(split).ids)
            seen += ids
    assert sorted(seen) == sorted(whole.split("train").ids + whole.split("test").ids)  # disjoint, complete


def test_unsharded_prepare_into_the_merged_folder_has_nothing_to_do(built, tmp_path):
    merged = Path(shutil.copytree(built["merged"], tmp_path / "merged"))
    before = {p: p.stat().st_mtime_ns for p in (merged / "shards").rglob("*.h5")}
    man = prepare(PrepareConfig(out=merged, **KW), source=_source(), progress=False)
    assert man == _json(built["whole"] / "manifest.json")
    assert {p: p.stat().st_mtime_ns for p in (merged / "shards").rglob("*.h5")} == before


def test_a_part_resumes_as_itself_and_refuses_another_part(built, tmp_path):
    part = Path(shutil.copytree(built["parts"][0], tmp_path / "p1"))
    before = {p: p.stat().st_mtime_ns for p in (part / "shards").rglob("*.h5")}
    man = prepare(PrepareConfig(out=part, shard=f"1/{N}", **KW), source=_source(), progress=False)
    assert man["shard"] == {"index": 1, "count": N}
    assert {p: p.stat().st_mtime_ns for p in (part / "shards").rglob("*.h5")} == before
    with pytest.raises(OutputExistsError, match=f"shard: 1/{N} -> 2/{N}"):
        prepare(PrepareConfig(out=part, shard=f"2/{N}", **KW), source=_source(), progress=False)


def test_merge_again_is_a_noop_and_copies_on_request(built, tmp_path):
    merged = Path(shutil.copytree(built["merged"], tmp_path / "merged", copy_function=os.link))
    assert merge_datasets(built["parts"], merged) == _json(built["whole"] / "manifest.json")
    copied = merge_datasets(built["parts"], tmp_path / "copied", link=False)
    assert copied == _json(built["whole"] / "manifest.json")
    rel = copied["shards"]["test"][0]
    assert not os.path.samefile(tmp_path / "copied" / rel, built["parts"][0] / rel)
    _assert_same_arrays(tmp_path / "copied", built["whole"])


def test_merge_refuses_another_dataset_in_out_unless_overwrite(built, tmp_path):
    other = _build(tmp_path / "other", points=32, views=0)
    with pytest.raises(OutputExistsError, match=r"other: holds a dataset prepared with other settings \(.*points: 32 -> 64"):
        merge_datasets(built["parts"], other)
    assert ShapeStore(other).num_points == 32  # untouched
    merge_datasets(built["parts"], other, overwrite=True)
    _assert_same_arrays(other, built["whole"])
    with pytest.raises(DataError, match="the output folder is part 1/3"):
        merge_datasets(built["parts"], built["parts"][0])


# --------------------------------------------------------------------------- refusals


def _drop_count(plan_or_manifest: dict) -> None:
    plan_or_manifest["shard"]["count"] = 4


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", r"part 3/3 of the dataset missing \(given: part 1/3 \(.*part1\), part 2/3"),
        ("duplicate", r"part2: is part 2/3, given twice"),
        ("unfinished", r"part2: part 2/3 is unfinished \(no manifest.json yet\)"),
        ("whole", r"whole: was prepared without --shard"),
        ("count", r"part3: is part 3/4, but part 1/3 \(.*\) is one of 3 parts"),
        ("settings", r"part2: part 2/3 \(.*\) was built differently from part 1/3 \(.*\): image_size: 32 -> 64"),
        ("source", r"part3: .*built differently.*: source train_per_class: 1 -> 2"),
        ("objects", r"part3: .*built differently.*: the class list, the object list"),
    ],
)
def test_merge_refuses_parts_that_do_not_belong_together(built, tmp_path, case, match):
    p1, p2, p3 = _copy_parts(built, tmp_path)
    parts = [p1, p2, p3]
    if case == "missing":
        parts = [p1, p2]
    elif case == "duplicate":
        parts = [p1, p2, p2]
    elif case == "unfinished":
        (p2 / "manifest.json").unlink()
    elif case == "whole":
        parts = [Path(shutil.copytree(built["whole"], tmp_path / "whole")), p2, p3]
    elif case == "count":
        _edit(p3 / "plan.json", _drop_count)
        _edit(p3 / "manifest.json", _drop_count)
    elif case == "settings":
        _edit(p2 / "plan.json", lambda p: p["settings"].update(image_size=64))
    elif case == "source":
        _edit(p3 / "plan.json", lambda p: p["source"].update(train_per_class=2))
    elif case == "objects":
        _edit(p3 / "plan.json", lambda p: (p["classes"].pop(), p["items"]["train"].pop()))
    with pytest.raises(DataError, match=match):
        merge_datasets(parts, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()  # checked before anything is written


def test_a_part_built_with_another_seed_is_refused(built, tmp_path):
    p1, p2, _ = _copy_parts(built, tmp_path)
    p3 = _build(tmp_path / "p3-seed1", shard=f"3/{N}", seed=1)
    with pytest.raises(DataError, match=r"p3-seed1: part 3/3 .* was built differently from part 1/3 .*: seed: 0 -> 1"):
        merge_datasets([p1, p2, p3], tmp_path / "merged")


# --------------------------------------------------------------------------- CLI, lock


def test_prepare_cli_shard_flag(capsys):
    assert main(["-q", "prepare", "--source", "s", "--out", "o", "--shard", "2/3", "--print-config"]) == 0
    assert "shard: 2/3" in capsys.readouterr().out
    assert main(["-q", "prepare", "--source", "s", "--out", "o", "--shard", "3/2"]) == 2
    assert capsys.readouterr().err.startswith("xmodal prepare: error: shard must read I/N with 1 <= I <= N")


def test_merge_cli(built, tmp_path, capsys):
    parts = [str(p) for p in built["parts"]]
    assert main(["-q", "merge", *parts, "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert f"dataset of 3 parts written to {tmp_path / 'm'} (14 classes; train: 13, test: 14; 1 failed)" in out
    assert main(["-q", "merge", *parts[:2], "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"xmodal merge: error: {tmp_path / 'm2'}: part 3/3 of the dataset missing")
    assert "Traceback" not in err
    assert err[1].startswith("  hint: ")


_HOLD = """
import sys, time
from xmodal.utils.lock import output_lock
with output_lock(sys.argv[1], "merge"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_merge_into_the_same_folder_is_refused(built, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "m")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=rf"is being written by xmodal merge \(pid {holder.pid} "):
            merge_datasets(built["parts"], tmp_path / "m")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert not (tmp_path / "m" / "manifest.json").exists()
