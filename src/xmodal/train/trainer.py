"""Self-supervised pre-training (paper §3.3, Algorithm 1).

Each step takes a batch of ``B`` samples ``(p, img1, img2, img3, y = (1, 1, 0))``
(:mod:`xmodal.train.sampler`), and

1. encodes the ``3B`` images in one forward pass of Fimg -> ``f1, f2, f3`` (B, 512) each
   (BatchNorm sees all three sets together) and the clouds with Fp -> ``fp`` (B, 512);
2. classifies the three (image, cloud) pairs with Ff -> logits (B, 3, 2);
3. minimises ``L = L_triplet(f1, f2, f3) + β L_cross(logits, y)`` (Eq. 1-3; ``loss.mode``
   drops either term for the paper's ablations) with SGD and a step LR schedule.

Everything is written to the run folder (see ``docs/ARCHITECTURE.md``): ``config.yaml``,
``run.json``, ``metrics.jsonl``, ``checkpoints/last.*``, ``encoders.*`` (and TensorBoard
events under ``tb/`` when ``torch.utils.tensorboard`` imports).

Exactness: the batch of step ``s`` depends only on ``(seed, s)``, torch's RNG is
re-seeded from ``(seed, s, rank)`` at each step (inside a forked RNG, so the caller's RNG
is untouched), and checkpoints hold the optimizer/scheduler state, so on the CPU a run
resumed from step ``s`` reproduces the losses of one that never stopped, and a
``torchrun`` run on ``W`` processes (global BatchNorm, see
:mod:`xmodal.train.distributed`) reproduces a single-process run up to float rounding.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

import xmodal
from xmodal.config import load_config, save_config, to_dict
from xmodal.errors import ConfigError, TrainingDiverged
from xmodal.models.batchnorm import hold_batchnorm_stats
from xmodal.models.dgcnn import edgeconv_kind
from xmodal.train.augment import crop_resize_flip
from xmodal.train.checkpoint import (
    NETS,
    architecture_from_config,
    build_networks,
    checkpoint_paths,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    save_encoders,
)
from xmodal.train.config import RESUME_MUTABLE_KEYS, PretrainConfig, config_diff, config_hash
from xmodal.train.distributed import (
    DistContext,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    convert_batchnorm,
    init_distributed,
)
from xmodal.train.sampler import PretrainBatches
from xmodal.transforms import images_to_tensor
from xmodal.utils.io import append_jsonl, atomic_write, read_json, read_jsonl, write_json

__all__ = ["TrainingDiverged", "XModalNet", "pretrain", "step_seed"]

log = logging.getLogger(__name__)

_RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "checkpoints", "encoders.json", "encoders.safetensors")


class XModalNet(nn.Module):
    """Fimg, Fp and Ff in one module (one DDP wrapper for the three networks).

    ``forward(images (3B, C, S, S), points (B, N, 3) or None)`` ->
    ``(f_img (3B, D_img), f_pts (B, D_pts) or None, logits (B, 3, 2) or None)``; the
    image rows are ``[img1 batch, img2 batch, img3 batch]``. ``points=None`` skips Fp and
    Ff (cross-view-only training).

    ``freeze_point_bn=True`` keeps every BatchNorm layer of Fp in eval mode even when the
    module is put in train mode (``model.freeze_point_bn``): their running statistics are
    neither used from the batch nor updated; their affine parameters still train.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        point_encoder: nn.Module,
        pair_classifier: nn.Module,
        *,
        freeze_point_bn: bool = False,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.point_encoder = point_encoder
        self.pair_classifier = pair_classifier
        self.freeze_point_bn = bool(freeze_point_bn)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_point_bn:
            hold_batchnorm_stats(self.point_encoder)
        return self

    def forward(self, images: torch.Tensor, points: Optional[torch.Tensor] = None):
        f_img = self.image_encoder(images)
        if points is None:
            return f_img, None, None
        b = points.shape[0]
        f_pts = self.point_encoder(points)
        logits = self.pair_classifier(f_img, f_pts.repeat(3, 1))  # rows j*B + i pair img_j(i) with p(i)
        return f_img, f_pts, logits.view(3, b, -1).transpose(0, 1)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of step ``step`` on process ``rank`` (dropout etc.), from ``(seed, step, rank)``."""
    return int(np.random.SeedSequence([int(seed), 0x7874, int(step), int(rank)]).generate_state(1)[0])


# --------------------------------------------------------------------------- helpers


def _amp_dtype(cfg: PretrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda":
        if cfg.amp in ("bf16", "fp16"):
            log.warning("amp=%s is ignored on %s: the CPU path runs in float32", cfg.amp, device)
        return None
    if cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _open_store(data):
    from xmodal.data.store import ShapeStore, open_dataset

    if isinstance(data, ShapeStore):
        return data, False
    return open_dataset(data), True


def _manifest_summary(store) -> dict:
    man = store.manifest
    return {
        "classes": len(man.get("classes", [])),
        "counts": man.get("counts"),
        "views": man.get("views"),
        "points": man.get("points"),
        "image_size": man.get("image_size"),
        "grayscale": man.get("grayscale"),
        "up_axis": man.get("up_axis"),
        "source": man.get("source"),
    }


def _data_fingerprint(store, split: str) -> dict:
    return {
        "split": split,
        "n": int(store.split(split).n),
        "views": int(store.views),
        "points": int(store.num_points),
        "image_size": store.image_size,
        "up_axis": store.up_axis,
    }


def _check_run_dir(out: Path, cfg: PretrainConfig, resume: bool):
    """Validate the run folder; return the checkpoint to resume from (or None)."""
    if not resume:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"{out}: exists and is not a folder")
        present = [f for f in _RUN_FILES if (out / f).exists()]
        if present:
            raise FileExistsError(
                f"{out}: already holds a run ({', '.join(present)}); pass --resume (resume=True) to continue it, "
                "or choose another --out"
            )
        return None
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no run folder to resume")
    saved_cfg = out / "config.yaml"
    if saved_cfg.is_file():
        saved = load_config(PretrainConfig, saved_cfg)
        diff = config_diff(saved, cfg)
        if diff:
            raise ConfigError(
                f"{saved_cfg}: cannot resume with a different config (only {', '.join(sorted(RESUME_MUTABLE_KEYS))} "
                "may change):\n  " + "\n  ".join(diff)
            )
    ckpt = load_checkpoint(out)
    if ckpt is not None:
        h = ckpt.state.get("config_hash")
        if h is not None and h != config_hash(cfg):
            raise ConfigError(f"{ckpt.path}: was written with another config (hash {h} != {config_hash(cfg)})")
        if ckpt.step > cfg.iterations:
            raise ConfigError(
                f"{ckpt.path}: the run is already at step {ckpt.step} > iterations={cfg.iterations}; "
                "resuming can only extend a run"
            )
    return ckpt


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    recs = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    with atomic_write(path) as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")


def _make_tb_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # tensorboard is optional: never required
        log.debug("TensorBoard logging off (%s)", exc)
        return None
    return SummaryWriter(log_dir=str(out / "tb"))


def _first_nonfinite(values: dict[str, float]) -> Optional[str]:
    for part in ("triplet", "cross", "loss"):
        v = values.get(part)
        if v is not None and not math.isfinite(v):
            return part
    return None


# --------------------------------------------------------------------------- main entry


def pretrain(data, out, cfg: Optional[PretrainConfig] = None, *, resume: bool = False, progress: bool = True) -> dict:
    """Pre-train Fimg, Fp and Ff on the dataset ``data``, writing the run folder ``out``.

    Args:
        data: dataset folder (``xmodal prepare``) or an open :class:`ShapeStore` with images.
        out: run folder; must not hold a run unless ``resume``.
        cfg: settings (default: ``PretrainConfig()``, the paper's).
        resume: continue from ``out/checkpoints/last.*`` (exactly; only ``iterations`` and the
            keys in :data:`xmodal.train.config.RESUME_MUTABLE_KEYS` may change).
        progress: tqdm progress bar (rank 0).

    Returns a summary dict: ``steps``, ``start_step``, ``final`` (the last metrics record),
    ``run``, ``metrics``, ``checkpoint``, ``encoders``, ``world_size``, ``elapsed``.

    Raises:
        TrainingDiverged: a NaN/inf loss (the checkpoint on disk is the last good one).
        FileExistsError: ``out`` holds a run and ``resume`` is False.
        ConfigError: resuming with changed settings.
    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this; rank 0 writes.
    """
    cfg = cfg if cfg is not None else PretrainConfig()
    cfg.validate()
    ctx = init_distributed(cfg.device)
    try:
        return _pretrain(data, Path(out), cfg, ctx, resume=resume, progress=progress)
    finally:
        cleanup_distributed(ctx)


def _pretrain(data, out: Path, cfg: PretrainConfig, ctx: DistContext, *, resume: bool, progress: bool) -> dict:
    from xmodal.losses import pair_accuracy, self_supervised_loss

    device = ctx.device
    store, owns_store = _open_store(data)
    try:
        split_name = cfg.data.split
        if split_name not in store.splits:
            raise ValueError(f"{getattr(store, 'root', data)}: no split '{split_name}' (has {store.splits})")
        split = store.split(split_name)
        ckpt = _check_run_dir(out, cfg, resume)
        barrier(ctx)  # every process has checked the folder before rank 0 writes into it
        fingerprint = _data_fingerprint(store, split_name)
        if ckpt is not None and ckpt.state.get("data") not in (None, fingerprint):
            raise ConfigError(
                f"{ckpt.path}: the run was trained on other data ({ckpt.state['data']}) than {data} ({fingerprint})"
            )
        start = ckpt.step if ckpt is not None else 0

        # ---------------------------------------------------------------- networks
        arch = architecture_from_config(cfg)
        nets = build_networks(arch, seed=cfg.seed)
        net = XModalNet(
            nets["image_encoder"],
            nets["point_encoder"],
            nets["pair_classifier"],
            freeze_point_bn=cfg.model.freeze_point_bn,
        )
        net = convert_batchnorm(net, device, ctx.world_size).to(device)
        net.train()
        opt = torch.optim.SGD(
            net.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.optim.step_size, gamma=cfg.optim.gamma)
        amp_dtype = _amp_dtype(cfg, device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16) if device.type == "cuda" else None
        named = {n: getattr(net, n) for n in NETS}
        if ckpt is not None:
            restore_checkpoint(ckpt, nets=named, optimizer=opt, scheduler=sched, scaler=scaler)
            log.info("resuming %s from step %d", out, start)
        use_cm = cfg.loss.use_cross_modal
        model: nn.Module = net
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(
                net,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=not use_cm,
            )

        # ---------------------------------------------------------------- run folder
        metrics_path = out / "metrics.jsonl"
        info_common = {
            "architecture": arch,
            "image_size": cfg.data.image_size,
            "num_points": cfg.data.num_points,
            "up_axis": store.up_axis,
        }
        prior_elapsed = float(ckpt.state.get("elapsed", 0.0)) if ckpt is not None else 0.0
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            run_info = read_json(out / "run.json") if (resume and (out / "run.json").exists()) else {}
            run_info.update(
                {
                    "dataset": str(Path(getattr(store, "root", data) or data).resolve()),
                    "split": split_name,
                    "manifest": _manifest_summary(store),
                    "xmodal_version": xmodal.__version__,
                    "torch_version": torch.__version__,
                    "python_version": platform.python_version(),
                    "world_size": ctx.world_size,
                    "device": str(device),
                    "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
                    "edgeconv": edgeconv_kind(net.point_encoder),
                    "config_hash": config_hash(cfg),
                }
            )
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            run_info.setdefault("started", now)
            if ckpt is not None:
                run_info.setdefault("resumed", []).append({"from_step": start, "time": now})
            write_json(out / "run.json", run_info)
            _truncate_metrics(metrics_path, start)
        barrier(ctx)

        # ---------------------------------------------------------------- data
        ds = PretrainBatches(
            split,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            num_points=cfg.data.num_points,
            image_size=cfg.data.image_size,
            up_axis=store.up_axis,
            aug=cfg.aug,
            point_subsample=cfg.data.point_subsample,
            start=start,
            stop=cfg.iterations,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            shuffle=False,
            num_workers=cfg.data.workers,
            prefetch_factor=cfg.data.prefetch_factor if cfg.data.workers > 0 else None,
            pin_memory=device.type == "cuda",
        )

        # ---------------------------------------------------------------- loop
        tb = _make_tb_writer(out) if ctx.is_main and start < cfg.iterations else None
        bar = None
        if ctx.is_main and progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.iterations, initial=start, desc="pretrain", unit="it", dynamic_ncols=True)
        last_ckpt = checkpoint_paths(out)[1] if ckpt is not None else None
        extra_state = {"config_hash": config_hash(cfg), "data": fingerprint, **info_common}
        window: list[list[float]] = []
        last_record: Optional[dict] = None
        t0 = time.perf_counter()
        t_window = t0
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=fork_devices):
                for batch in loader:
                    s = int(batch["step"])
                    torch.manual_seed(step_seed(cfg.seed, s, ctx.rank))
                    lr = opt.param_groups[0]["lr"]
                    parts = _train_step(
                        model, batch, cfg, device, opt, sched, scaler, amp_dtype, use_cm,
                        self_supervised_loss, pair_accuracy, ctx, s + 1,
                    )
                    window.append(parts)
                    done = s + 1
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{parts[0]:.4f}", trip=f"{parts[1]:.4f}", cross=f"{parts[2]:.4f}" if use_cm else "-",
                            acc=f"{parts[3]:.2f}" if use_cm else "-", lr=f"{lr:.1e}", refresh=False,
                        )
                        bar.update(1)
                    if done % cfg.log_every == 0 or done == cfg.iterations:
                        now = time.perf_counter()
                        mean = np.mean(np.asarray(window, dtype=np.float64), axis=0)
                        last_record = {
                            "step": done,
                            "loss": float(mean[0]),
                            "triplet": float(mean[1]),
                            "cross": float(mean[2]) if use_cm else None,
                            "cm_acc": float(mean[3]) if use_cm else None,
                            "lr": float(lr),
                            "time": round(prior_elapsed + now - t0, 4),
                            "samples_per_s": round(cfg.batch_size * len(window) / max(now - t_window, 1e-9), 3),
                        }
                        window, t_window = [], now
                        if ctx.is_main:
                            append_jsonl(metrics_path, last_record)
                            if tb is not None:
                                for key in ("loss", "triplet", "cross", "cm_acc", "lr", "samples_per_s"):
                                    if last_record[key] is not None:
                                        tb.add_scalar(f"pretrain/{key}", last_record[key], done)
                    if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                        if ctx.is_main:
                            extra_state["elapsed"] = prior_elapsed + time.perf_counter() - t0
                            last_ckpt = save_checkpoint(
                                out, step=done, nets=named, optimizer=opt, scheduler=sched, scaler=scaler,
                                extra=extra_state,
                            )
                        barrier(ctx)
        except _Diverged as d:
            raise TrainingDiverged(d.step, d.part, d.value, last_ckpt) from None
        finally:
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()

        # ---------------------------------------------------------------- final files
        steps = max(start, cfg.iterations)
        enc_paths = (out / "encoders.safetensors", out / "encoders.json")
        if ctx.is_main:
            if start >= cfg.iterations and ckpt is not None:
                last_ckpt = checkpoint_paths(out)[1]
            enc_info = {**info_common, "step": steps, "config_hash": config_hash(cfg), "config": to_dict(cfg)}
            save_encoders(out, nets=named, info=enc_info)
            if last_record is None and metrics_path.exists():
                recs = read_jsonl(metrics_path)
                last_record = recs[-1] if recs else None
        barrier(ctx)
        return {
            "steps": steps,
            "start_step": start,
            "final": last_record,
            "run": str(out),
            "metrics": str(metrics_path),
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "encoders": str(enc_paths[0]),
            "world_size": ctx.world_size,
            "elapsed": round(prior_elapsed + time.perf_counter() - t0, 3),
        }
    finally:
        if owns_store:
            store.close()


class _Diverged(Exception):
    def __init__(self, step: int, part: str, value: float):
        self.step, self.part, self.value = step, part, value


def _train_step(model, batch, cfg, device, opt, sched, scaler, amp_dtype, use_cm, loss_fn, acc_fn, ctx, step) -> list[float]:
    """One optimisation step; returns ``[loss, triplet, cross, cm_acc]`` averaged over processes."""
    nb = device.type == "cuda"
    images = batch["images"].to(device, non_blocking=nb)  # (3, b, S, S[, 3]) uint8
    b = images.shape[1]
    x = images_to_tensor(images.reshape((3 * b,) + tuple(images.shape[2:])))  # (3b, C, S, S)
    if cfg.aug.enabled:
        x = crop_resize_flip(
            x, batch["boxes"].reshape(3 * b, 4).to(device), batch["flip"].reshape(3 * b).to(device), cfg.data.image_size
        )
    points = batch["points"].to(device, non_blocking=nb) if use_cm else None
    labels = batch["labels"].to(device, non_blocking=nb)
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    with autocast:
        f_img, _f_pts, logits = model(x, points)
    f_img = f_img.float()
    f1, f2, f3 = f_img[:b], f_img[b : 2 * b], f_img[2 * b :]
    logits = logits.float() if logits is not None else None
    if use_cm:
        out = loss_fn(
            f1, f2, f3, logits, labels,
            margin=cfg.loss.margin, beta=cfg.loss.beta,
            use_cross_view=cfg.loss.use_cross_view, use_cross_modal=True,
        )
        cross, acc = out["cross"].detach(), acc_fn(logits, labels)
    else:  # cross-view only: Fp and Ff are not run, so there is no cross-modality term to report
        from xmodal.losses import triplet_loss

        trip = triplet_loss(f1, f2, f3, margin=cfg.loss.margin)
        out = {"loss": trip, "triplet": trip.detach()}
        cross = acc = torch.zeros((), device=device)
    loss = out["loss"]
    with torch.no_grad():
        vec = torch.stack([loss.detach().float(), out["triplet"].float(), cross.float(), acc.float()])
        vec = all_reduce_mean(vec, ctx)
    parts = [float(v) for v in vec.cpu()]
    values = {"loss": parts[0], "triplet": parts[1], "cross": parts[2]}
    bad = _first_nonfinite(values)
    if bad is not None:
        raise _Diverged(step, bad, values[bad])
    opt.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    sched.step()
    return parts
