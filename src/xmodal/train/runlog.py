"""What a pre-training run reports while it runs: ``metrics.jsonl``, TensorBoard, a progress bar.

``metrics.jsonl`` holds two kinds of records, both keyed by ``step``:

* training records, one per ``log_every`` steps: the means over the window of each loss part
  (``loss``, ``triplet``, ``cross``, ``cm_acc``, and ``nce`` / ``point_nce`` / ``decor`` when
  ``loss.projected_nce`` / ``loss.point_nce`` / ``loss.point_decorrelation`` is on;
  ``cross``/``cm_acc`` are null without the cross-modality term), the learning rate, ``time`` (training seconds so far, validation
  excluded) and ``samples_per_s``;
* validation records (``val.every`` > 0): ``val.*`` metrics of :mod:`xmodal.train.validation`,
  with ``time`` and ``val_seconds``.

TensorBoard events go to ``RUN/tb/`` when ``torch.utils.tensorboard`` imports.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from xmodal.train.step import LOSS_PARTS, OPTIONAL_TERMS
from xmodal.utils.io import append_jsonl, read_jsonl

__all__ = ["RunLog", "is_val_record"]

log = logging.getLogger(__name__)


def is_val_record(record: dict) -> bool:
    """True for a validation record of ``metrics.jsonl``."""
    return any(k.startswith("val.") for k in record)


def _tensorboard(out: Path, start: int = 0, resumed: bool = False):
    """A writer of ``RUN/tb/`` events (None where TensorBoard is not installed). A run resumed at
    step ``start`` hides the events an earlier leg wrote after that step (it stopped after its last
    checkpoint; resumed without one, all of them), so every step appears once, as in ``metrics.jsonl``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # tensorboard is optional: never required
        log.info("TensorBoard logging off (%s: install xmodal[tensorboard] for RUN/tb/ events); metrics.jsonl "
                 "holds the same records", type(exc).__name__)
        return None
    purge = start + 1 if start > 0 else (0 if resumed else None)
    return SummaryWriter(log_dir=str(out / "tb"), purge_step=purge)


class RunLog:
    """The metrics log of one process's run (writing only where ``writer`` is True).

    Args:
        out: the run folder; batch_size: the global batch (for samples/s);
        use_cross_modal: whether ``cross``/``cm_acc`` are meaningful; extra_terms: the optional
        loss terms to log (keys of :data:`~xmodal.train.step.OPTIONAL_TERMS`);
        prior_elapsed: training seconds of the run before this start (resume);
        writer: this process writes files (rank 0); progress: show a tqdm bar;
        start, total: steps done before and at the end (for the bar); resumed: a resumed run
        (``start`` 0: resumed before its first checkpoint).
    """

    def __init__(self, out: Path, *, batch_size: int, use_cross_modal: bool, prior_elapsed: float = 0.0,
                 writer: bool = True, progress: bool = True, start: int = 0, total: int = 0,
                 extra_terms: tuple = (), resumed: bool = False) -> None:
        self.path = out / "metrics.jsonl"
        self.batch_size = int(batch_size)
        self.use_cm = bool(use_cross_modal)
        self.extra_terms = tuple(extra_terms)
        self.prior = float(prior_elapsed)
        self.writer = bool(writer)
        self.window: list[list[float]] = []
        self.last: Optional[dict] = None
        self.paused = 0.0
        self.t0 = self.t_window = time.perf_counter()
        self.tb = _tensorboard(out, start, resumed) if (writer and start < total) else None
        self.bar = None
        if writer and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="pretrain", unit="it", dynamic_ncols=True)

    def elapsed(self) -> float:
        """Training seconds so far (this start plus ``prior_elapsed``), pauses excluded."""
        return self.prior + time.perf_counter() - self.t0 - self.paused

    def step(self, parts: list[float], lr: float) -> None:
        """Record one step's :data:`LOSS_PARTS` values."""
        self.window.append(parts)
        if self.bar is not None:
            loss, trip, cross, acc = parts[:4]
            cm = {"cross": f"{cross:.4f}", "acc": f"{acc:.2f}"} if self.use_cm else {"cross": "-", "acc": "-"}
            self.bar.set_postfix(loss=f"{loss:.4f}", trip=f"{trip:.4f}", **cm, lr=f"{lr:.1e}", refresh=False)
            self.bar.update(1)

    def flush(self, step: int, lr: float) -> dict:
        """Write the mean of the window as the record of ``step``; returns it."""
        now = time.perf_counter()
        mean = np.mean(np.asarray(self.window, dtype=np.float64), axis=0)
        rec: dict = {"step": int(step)}
        for name, value in zip(LOSS_PARTS, mean):
            if name in OPTIONAL_TERMS and name not in self.extra_terms:
                continue
            rec[name] = float(value) if (self.use_cm or name in ("loss", "triplet")) else None
        rec["lr"] = float(lr)
        rec["time"] = round(self.elapsed(), 4)
        rec["samples_per_s"] = round(self.batch_size * len(self.window) / max(now - self.t_window, 1e-9), 3)
        self.window, self.t_window = [], now
        self.last = rec
        self._write(rec, "pretrain")
        return rec

    def pause(self, seconds: float) -> None:
        """Exclude ``seconds`` (validation, checkpoint I/O) from the training time and the throughput window."""
        self.paused += seconds
        self.t_window += seconds

    def validation(self, step: int, values: dict) -> dict:
        """Write a validation record for ``step``."""
        rec = {"step": int(step), **values, "time": round(self.elapsed(), 4)}
        self._write(rec, "")
        log.info("step %d validation: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k.startswith("val.")))
        return rec

    def _write(self, rec: dict, tb_prefix: str) -> None:
        if not self.writer:
            return
        append_jsonl(self.path, rec)
        if self.tb is not None:
            for key, value in rec.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{tb_prefix}/{key}" if tb_prefix else key, value, rec["step"])

    def final_record(self) -> Optional[dict]:
        """The last training record (from this start, else from the file)."""
        if self.last is None and self.path.exists():
            recs = [r for r in read_jsonl(self.path) if not is_val_record(r)]
            self.last = recs[-1] if recs else None
        return self.last

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
