"""Tests for xmodal.utils.io: atomic writes leave no partial files."""

from __future__ import annotations

import pytest

from xmodal.utils.io import append_jsonl, atomic_path, atomic_write, read_json, read_jsonl, write_json


def test_write_read_json(tmp_path):
    import numpy as np

    write_json(tmp_path / "a.json", {"x": np.int64(3), "y": np.arange(2)})
    assert read_json(tmp_path / "a.json") == {"x": 3, "y": [0, 1]}


def test_atomic_write_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write("new partial")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "g.bin"
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_bytes(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc"


def test_read_json_names_file_when_corrupt(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_json(p)


def test_jsonl_ignores_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    append_jsonl(p, {"step": 1})
    append_jsonl(p, {"step": 2})
    with open(p, "a") as fh:
        fh.write('{"step": 3, "lo')  # a write cut short by a kill
    assert [r["step"] for r in read_jsonl(p)] == [1, 2]
    with open(p, "w") as fh:
        fh.write('{"a": 1}\n{broken\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    write_json(tmp_path / "p.json", {})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o666 & ~mask


# --------------------------------------------------------------------------- failed writes
import errno  # noqa: E402
import os  # noqa: E402

from xmodal.errors import DataError, WriteError  # noqa: E402


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_previous_file_and_names_it(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_json(target, {"step": 1})
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(WriteError, match="state.json: could not be written \\(No space left on device\\); its previous") as info:
        write_json(target, {"step": 2})
    assert isinstance(info.value, OSError) and "free some space" in info.value.hint
    monkeypatch.undo()
    assert read_json(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    write_json(target, {"step": 2})  # the same write after space is freed
    assert read_json(target) == {"step": 2}


def test_failing_library_write_inside_atomic_path_becomes_write_error(tmp_path):
    target = tmp_path / "weights.bin"
    with pytest.raises(WriteError, match="weights.bin: could not be written.*nothing was written"):
        with atomic_path(target):
            raise OSError(errno.EIO, "Input/output error")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_append_to_unwritable_log_is_a_write_error(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"step": 1})
    real_open = open

    def failing_open(path, mode="r", *a, **k):
        if "a" in mode:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(WriteError, match="metrics.jsonl: could not be written \\(Permission denied\\)"):
        append_jsonl(log, {"step": 2})
    monkeypatch.undo()
    assert read_jsonl(log) == [{"step": 1}]


def test_bad_json_is_a_data_error_naming_the_file(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="run.json: not valid JSON"):
        read_json(bad)
