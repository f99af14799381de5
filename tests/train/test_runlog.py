"""RunLog: the metrics log of a run (metrics.jsonl, TensorBoard events)."""

from __future__ import annotations

import sys
import types

import pytest

from xmodal.train.runlog import RunLog


class _Writer:
    made: list[dict] = []

    def __init__(self, **kwargs):
        _Writer.made.append(kwargs)

    def close(self):
        pass


@pytest.fixture()
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    _Writer.made = []
    return _Writer


def test_a_resumed_run_hides_the_events_written_after_its_checkpoint(tmp_path, fake_tensorboard):
    """A leg stopped at step 11 after its checkpoint at step 8: the next leg logs steps 9.. again,
    so TensorBoard must drop the earlier leg's events from step 9 on (metrics.jsonl is cut back)."""
    RunLog(tmp_path, batch_size=2, use_cross_modal=True, progress=False, start=0, total=30)
    RunLog(tmp_path, batch_size=2, use_cross_modal=True, progress=False, start=8, total=30)
    # resumed before its first checkpoint: every earlier event goes (metrics.jsonl is emptied)
    RunLog(tmp_path, batch_size=2, use_cross_modal=True, progress=False, start=0, total=30, resumed=True)
    assert [w["purge_step"] for w in fake_tensorboard.made] == [None, 9, 0]
    assert all(w["log_dir"] == str(tmp_path / "tb") for w in fake_tensorboard.made)
    # a finished run extended by nothing, and a process that does not write: no writer
    RunLog(tmp_path, batch_size=2, use_cross_modal=True, progress=False, start=30, total=30)
    RunLog(tmp_path, batch_size=2, use_cross_modal=True, progress=False, writer=False, start=0, total=30)
    assert len(fake_tensorboard.made) == 3


def test_without_tensorboard_the_log_names_the_extra(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with caplog.at_level("INFO", logger="xmodal.train.runlog"):
        log = RunLog(tmp_path, batch_size=2, use_cross_modal=True, progress=False, start=0, total=3)
    assert log.tb is None
    assert "TensorBoard logging off" in caplog.text and "xmodal[tensorboard]" in caplog.text
