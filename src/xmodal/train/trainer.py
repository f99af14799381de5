"""Self-supervised pre-training (paper §3.3, Algorithm 1): the ``pretrain`` job.

The pieces, each in its own module:

* :mod:`xmodal.train.rundir` – the run folder: checks, resume, ``run.json``;
* :mod:`xmodal.train.model` – networks, optimiser, mixed precision;
* :mod:`xmodal.train.sampler` – the batch of every step, a pure function of ``(seed, step)``;
* :mod:`xmodal.train.step` – one optimisation step;
* :mod:`xmodal.train.runlog` – ``metrics.jsonl``, TensorBoard, progress;
* :mod:`xmodal.train.validation` – the optional learning curve on held-out training objects;
* :mod:`xmodal.train.averaging` – the optional weight averaging of the exported networks;
* :mod:`xmodal.train.checkpoint` – checkpoints and the final encoders.

Exactness: the batch of step ``s`` depends only on ``(seed, s)``, torch's RNG is re-seeded
from ``(seed, s, rank)`` at each step (inside a forked RNG, so the caller's RNG is
untouched), and checkpoints hold the optimizer/scheduler state, so on the CPU a run resumed
from step ``s`` reproduces the losses of one that never stopped, and a ``torchrun`` run on
``W`` processes (global BatchNorm, see :mod:`xmodal.train.distributed`) reproduces a
single-process run up to float rounding (with ``loss.cross_pairs: sample`` and none of the
terms that compare samples within a batch: the batch forms of ``cross_pairs``,
``projected_nce``, ``point_nce`` and ``point_decorrelation`` are computed on each process's share
of the batch and averaged).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from xmodal.config import to_dict
from xmodal.data.datasets import open_dataset
from xmodal.data.store import ShapeStore
from xmodal.errors import ConfigError, DataError, Interrupted, TrainingDiverged
from xmodal.models.dgcnn import edgeconv_kind
from xmodal.train.averaging import WeightAverage, is_sample_step
from xmodal.train.checkpoint import architecture_from_config, checkpoint_paths, restore_checkpoint, save_checkpoint, save_encoders
from xmodal.train.config import PretrainConfig, config_hash
from xmodal.train.distributed import DistContext, barrier, cleanup_distributed, init_distributed
from xmodal.train.model import XModalNet, autocast_dtype, build_optimizer, build_training_model
from xmodal.train.rundir import (check_resumable, check_resume_data, check_run_dir, data_fingerprint, manifest_summary,
                                 truncate_metrics, write_run_info)
from xmodal.train.runlog import RunLog
from xmodal.train.sampler import BatchSpec, PretrainBatches, check_training_split
from xmodal.train.step import OPTIONAL_TERMS, StepDiverged, Stepper
from xmodal.train.validation import Validator, holdout_split
from xmodal.utils.lock import output_lock
from xmodal.utils.signals import StopRequest, ignore_stop_signals

__all__ = ["TrainingDiverged", "XModalNet", "pretrain", "step_seed"]

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of step ``step`` on process ``rank`` (dropout etc.), from ``(seed, step, rank)``."""
    return int(np.random.SeedSequence([int(seed), 0x7874, int(step), int(rank)]).generate_state(1)[0])


def pretrain(cfg: PretrainConfig, *, store: Optional[ShapeStore] = None, resume: bool = False,
             progress: bool = True, allow_other_data: bool = False) -> dict:
    """Pre-train Fimg, Fp and Ff on the dataset ``cfg.data.path``, writing the run folder ``cfg.out``.

    >>> cfg = resolve_pretrain_config("cpu").with_paths(data="ds", out="runs/cpu")  # doctest: +SKIP
    >>> summary = pretrain(cfg)  # doctest: +SKIP

    Args:
        cfg: the run's settings (:class:`~xmodal.train.config.PretrainConfig`), with the dataset
            folder ``data.path`` (``xmodal prepare``) and the run folder ``out`` (which must not
            hold a run unless ``resume``). The resolved config is written to ``out/config.yaml``.
        store: an open :class:`ShapeStore` (with images) to train on instead of opening
            ``cfg.data.path`` (which may then be empty).
        resume: continue from ``out/checkpoints/last.*`` (exactly; only ``iterations`` and the
            keys in :data:`xmodal.train.config.RESUME_MUTABLE_KEYS` may change) on the dataset the
            run was trained on.
        allow_other_data: with ``resume``, accept a dataset folder other than the run's (its
            settings must still match).
        progress: tqdm progress bar (rank 0).

    Returns a summary dict: ``steps``, ``start_step``, ``final`` (the last metrics record),
    ``run``, ``metrics``, ``checkpoint``, ``encoders``, ``world_size``, ``elapsed``.

    On SIGTERM or SIGINT the run finishes its current step, writes a checkpoint there and raises
    :class:`~xmodal.errors.Interrupted` (``--resume`` then continues exactly); a second signal
    stops at once. A second process writing the same ``out`` is refused
    (:class:`~xmodal.errors.OutputLockedError`).

    Raises:
        TrainingDiverged: a NaN/inf loss (the checkpoint on disk is the last good one).
        OutputExistsError: ``out`` holds a run and ``resume`` is False.
        ConfigError: a missing ``data.path`` / ``out``; resuming with changed settings or on other data.
    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this; rank 0 writes.
    """
    cfg.validate()
    cfg.require_paths(data=False)
    out = Path(cfg.out)
    if resume:  # checked before the lock creates the folder
        check_resumable(out)
    cfg.require_paths(data=store is None)
    if store is None and not resume:  # a run already there (an earlier version allowed it) may continue
        _check_out_outside_data(out, Path(cfg.data.path))
    ctx = init_distributed(cfg.device)
    data = store if store is not None else open_dataset(cfg.data.path)
    lock = output_lock(out, "pretrain") if ctx.is_main else contextlib.nullcontext()
    try:
        with lock, StopRequest() as stop:
            trainer = _Trainer(data, out, cfg, ctx, resume=resume, allow_other_data=allow_other_data)
            return trainer.run(progress=progress, stop=stop)
    finally:
        if store is None:
            data.close()
        cleanup_distributed(ctx)


def _check_out_outside_data(out: Path, data: Path) -> None:
    """Refuse a new run folder that is the dataset's folder or inside it: the run's files would mix
    with the dataset's (whose folder is ``prepare``'s to write, resume and overwrite)."""
    o, d = out.expanduser().resolve(), data.expanduser().resolve()
    if o == d or d in o.parents:
        raise ConfigError(f"is {'the dataset folder' if o == d else 'inside the dataset folder'} {data}", path=out,
                          hint="choose an --out outside the dataset")


class _Trainer:
    """One call of :func:`pretrain`: set-up in ``__init__``, then :meth:`run`."""

    def __init__(self, store: ShapeStore, out: Path, cfg: PretrainConfig, ctx: DistContext, *, resume: bool,
                 allow_other_data: bool = False) -> None:
        self.store, self.out, self.cfg, self.ctx = store, out, cfg, ctx
        #: the dataset's folder ("" for an in-memory store), and how messages name the dataset
        self.data_root = getattr(store, "root", None) or cfg.data.path
        self.data_spec = self.data_root or "<in-memory store>"
        if cfg.data.split not in store.splits:
            raise DataError(f"no split '{cfg.data.split}' (has {store.splits})", path=self.data_spec)
        self.split = store.split(cfg.data.split)
        self.train_idx, val_idx = None, None
        if cfg.val.enabled:
            self.train_idx, val_idx = holdout_split(self.split.labels, cfg.val.fraction, seed=cfg.seed)
        n_train = self.split.n if self.train_idx is None else len(self.train_idx)
        # the data must fit the settings before anything is written into the run folder
        check_training_split(self.split, BatchSpec.from_config(cfg), n=n_train, world_size=ctx.world_size,
                             where=self.data_spec)
        self.ckpt = check_run_dir(out, cfg, resume)
        self.resumed = bool(resume)
        barrier(ctx)  # every process has checked the folder before rank 0 writes into it
        self.fingerprint = data_fingerprint(store, cfg.data.split, n_train)
        check_resume_data(self.ckpt, self.fingerprint, self.data_spec, out=out, allow_other_data=allow_other_data)
        self.start = self.ckpt.step if self.ckpt is not None else 0
        self.net = build_training_model(cfg, ctx)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.net)
        self.amp_dtype = autocast_dtype(cfg.amp, ctx.device)
        cuda_fp16 = ctx.device.type == "cuda" and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda_fp16) if ctx.device.type == "cuda" else None
        if self.ckpt is not None:
            restore_checkpoint(self.ckpt, nets=self.net.networks(), optimizer=self.optimizer,
                               scheduler=self.scheduler, scaler=self.scaler)
            log.info("resuming %s from step %d", out, self.start)
        self.average = self._weight_average()
        self.validator = None
        if val_idx is not None and ctx.is_main:
            self.validator = Validator(self.split, val_idx, cfg.val, num_points=cfg.data.num_points, seed=cfg.seed)
        self._write_run_info(n_val=0 if val_idx is None else len(val_idx))

    def _weight_average(self) -> Optional[WeightAverage]:
        """The running mean of the weights (``optim.average_from`` > 0), restored from the checkpoint."""
        optim = self.cfg.optim
        if optim.average_from <= 0:
            return None
        if optim.average_from > self.cfg.iterations:
            log.warning("optim.average_from = %d is past the last step (%d): the run exports its last weights",
                        optim.average_from, self.cfg.iterations)
        average = WeightAverage()
        if self.ckpt is not None:
            average.load(self.net.networks(), self.ckpt.tensors, int(self.ckpt.state.get("average_samples", 0)),
                         self.ckpt.path)
        return average

    def _samples_average(self, done: int) -> bool:
        """Whether the weights after step ``done`` go into the average."""
        optim = self.cfg.optim
        return self.average is not None and is_sample_step(done, start=optim.average_from, every=optim.average_every,
                                                           last=self.cfg.iterations)

    def _averaged_net(self) -> Optional[XModalNet]:
        """The averaged networks as an :class:`XModalNet` (eval mode); None before the first sample."""
        if self.average is None or self.average.count == 0:
            return None
        nets = self.average.networks()
        return XModalNet(nets["image_encoder"], nets["point_encoder"], nets["pair_classifier"],
                         freeze_point_bn=self.cfg.model.freeze_point_bn).eval()

    def _write_run_info(self, *, n_val: int) -> None:
        if self.ctx.is_main:
            info = {
                "dataset": str(Path(self.data_root).resolve()) if self.data_root else self.data_spec,
                "split": self.cfg.data.split,
                "manifest": manifest_summary(self.store),
                "objects_trained_on": self.fingerprint["n"],
                "objects_held_out": n_val,
                "world_size": self.ctx.world_size,
                "device": str(self.ctx.device),
                "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
                "edgeconv": edgeconv_kind(self.net.point_encoder),
            }
            write_run_info(self.out, self.cfg, info, resumed_from=self.start if self.ckpt is not None else None)
            # without a checkpoint the run starts again at step 0, its step-0 validation included
            truncate_metrics(self.out / "metrics.jsonl", self.start if self.ckpt is not None else -1)
        barrier(self.ctx)

    def _model(self) -> nn.Module:
        """The module the steps call: the networks, inside DDP under torchrun, compiled on request.

        Checkpoints and validation use ``self.net`` itself (the same parameters)."""
        model: nn.Module = self.net
        if self.ctx.distributed:
            dev = self.ctx.device
            model = DistributedDataParallel(self.net, device_ids=[dev.index] if dev.type == "cuda" else None,
                                            find_unused_parameters=not self.cfg.loss.use_cross_modal)
        return torch.compile(model) if self.cfg.compile else model

    def _loader(self):
        cfg, ctx = self.cfg, self.ctx
        ds = PretrainBatches(
            self.split, BatchSpec.from_config(cfg), up_axis=self.store.up_axis, start=self.start,
            stop=cfg.iterations, rank=ctx.rank, world_size=ctx.world_size, indices=self.train_idx,
        )
        return torch.utils.data.DataLoader(
            ds, batch_size=None, shuffle=False, num_workers=cfg.data.workers,
            prefetch_factor=cfg.data.prefetch_factor if cfg.data.workers > 0 else None,
            pin_memory=ctx.device.type == "cuda", worker_init_fn=ignore_stop_signals,
        )

    def _extra_state(self, runlog: RunLog) -> dict:
        return {
            "config_hash": config_hash(self.cfg),
            "data": self.fingerprint,
            "elapsed": runlog.elapsed(),
            "average_samples": self.average.count if self.average is not None else 0,
            **self._encoder_info(),
        }

    def _save(self, done: int, runlog: RunLog) -> Optional[Path]:
        """Write the checkpoint of step ``done`` (rank 0; None elsewhere)."""
        if not self.ctx.is_main:
            return None
        return save_checkpoint(self.out, step=done, nets=self.net.networks(), optimizer=self.optimizer,
                               scheduler=self.scheduler, scaler=self.scaler, extra=self._extra_state(runlog),
                               extra_tensors=self.average.state_tensors() if self.average is not None else None)

    def _encoder_info(self) -> dict:
        return {
            "architecture": architecture_from_config(self.cfg),
            "image_size": self.cfg.data.image_size,
            "num_points": self.cfg.data.num_points,
            "up_axis": self.store.up_axis,
            "grayscale": bool(self.store.grayscale),
        }

    def _validate(self, step: int, runlog: RunLog) -> None:
        """A curve point: the trained networks' ``val.*`` and, once weights are averaged, the
        averaged networks' ``val.averaged.*``."""
        if self.validator is not None:
            size = self.cfg.data.image_size
            values = self.validator(self.net, self.ctx.device, image_size=size)
            averaged = self._averaged_net()
            if averaged is not None:
                more = self.validator(averaged, self.ctx.device, image_size=size)
                values.update({k.replace("val.", "val.averaged.", 1): v for k, v in more.items() if k.startswith("val.")})
                values["val_seconds"] = round(values["val_seconds"] + more["val_seconds"], 3)
            runlog.pause(values["val_seconds"])
            runlog.validation(step, values)
        barrier(self.ctx)

    def _after_step(self, done: int, runlog: RunLog, lr: float) -> Optional[Path]:
        cfg, last = self.cfg, done == self.cfg.iterations
        if done % cfg.log_every == 0 or last:
            runlog.flush(done, lr)
        if self._samples_average(done):
            self.average.update(self.net.networks())
        if cfg.val.enabled and (done % cfg.val.every == 0 or last):
            self._validate(done, runlog)
        saved = None
        if done % cfg.checkpoint_every == 0 or last:
            saved = self._save(done, runlog)
            barrier(self.ctx)
        return saved

    def _stop_requested(self, stop: StopRequest) -> int:
        """The signal number of a stop request on any process (0: none); all processes agree."""
        flag = torch.tensor([float(stop.signum or 0)], device=self.ctx.device)
        if self.ctx.distributed:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def _interrupt(self, done: int, signum: int, runlog: RunLog, saved: Optional[Path], data) -> Interrupted:
        """Save the state of step ``done`` (unless just saved) and describe how to resume."""
        if runlog.window:
            runlog.flush(done, self.optimizer.param_groups[0]["lr"])
        if saved is None:
            saved = self._save(done, runlog)
        barrier(self.ctx)
        name = signal.Signals(signum).name
        return Interrupted(
            f"stopped by {name} after step {done} of {self.cfg.iterations}; checkpoint written to "
            f"{saved or checkpoint_paths(self.out)[1]}",
            signum=signum, path=self.out,
            hint=f"continue with: xmodal pretrain --data {data} --out {self.out} --resume",
        )

    def _loop(self, runlog: RunLog, stop: StopRequest) -> Optional[Path]:
        """Run the steps ``start+1 .. iterations``; returns the last checkpoint written (or None)."""
        stepper = Stepper(self._model(), self.cfg, self.ctx, self.optimizer, self.scheduler, self.amp_dtype, self.scaler)
        last_ckpt = checkpoint_paths(self.out)[1] if self.ckpt is not None else None
        dev = self.ctx.device
        fork = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        # compile=true: a machine whose tool chain cannot build the kernels runs the step eagerly
        # instead of failing (torch logs why once); the setting is restored after the loop
        eager_fallback = torch._dynamo.config.patch(suppress_errors=True) if self.cfg.compile else contextlib.nullcontext()
        with torch.random.fork_rng(devices=fork), eager_fallback:
            for batch in self._loader():
                s = int(batch["step"])
                torch.manual_seed(step_seed(self.cfg.seed, s, self.ctx.rank))
                lr = self.optimizer.param_groups[0]["lr"]
                try:
                    parts = stepper(batch, s + 1)
                except StepDiverged as d:
                    raise TrainingDiverged(d.step, d.part, d.value, last_ckpt) from None
                runlog.step(parts, lr)
                saved = self._after_step(s + 1, runlog, lr)
                last_ckpt = saved or last_ckpt
                signum = self._stop_requested(stop)
                if signum and s + 1 < self.cfg.iterations:
                    raise self._interrupt(s + 1, signum, runlog, saved, self.data_spec)
        return last_ckpt

    def run(self, *, progress: bool, stop: StopRequest) -> dict:
        cfg, ctx = self.cfg, self.ctx
        prior = float(self.ckpt.state.get("elapsed", 0.0)) if self.ckpt is not None else 0.0
        runlog = RunLog(self.out, batch_size=cfg.batch_size, use_cross_modal=cfg.loss.use_cross_modal,
                        prior_elapsed=prior, writer=ctx.is_main, progress=progress,
                        start=self.start, total=cfg.iterations, resumed=self.resumed,
                        extra_terms=tuple(t for t, w in OPTIONAL_TERMS.items() if getattr(cfg.loss, w) > 0))
        try:
            if cfg.val.enabled and self.ckpt is None:
                self._validate(0, runlog)  # the curve starts at the random initialisation
            last_ckpt = self._loop(runlog, stop)
        finally:
            runlog.close()
        steps = max(self.start, cfg.iterations)
        if self.start >= cfg.iterations and self.ckpt is not None:
            last_ckpt = checkpoint_paths(self.out)[1]
        if ctx.is_main:
            info = {**self._encoder_info(), "step": steps, "config_hash": config_hash(cfg), "config": to_dict(cfg)}
            averaged = self._averaged_net()
            if averaged is not None:  # what the exported weights are: a mean of this many samples
                info["averaged"] = {"from": cfg.optim.average_from, "every": cfg.optim.average_every,
                                    "samples": self.average.count}
            save_encoders(self.out, nets=(averaged if averaged is not None else self.net).networks(), info=info)
        final = runlog.final_record() if ctx.is_main else runlog.last
        barrier(ctx)
        return {
            "steps": steps,
            "start_step": self.start,
            "final": final,
            "run": str(self.out),
            "metrics": str(self.out / "metrics.jsonl"),
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "encoders": str(self.out / "encoders.safetensors"),
            "world_size": ctx.world_size,
            "elapsed": round(runlog.elapsed(), 3),
        }
