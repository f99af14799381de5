"""Distributed data-parallel helpers (``torchrun``) for pre-training.

Launch the ordinary ``xmodal pretrain`` command under ``torchrun``::

    torchrun --nproc_per_node 4 -m xmodal pretrain --data DATA --out RUN --preset paper

Each process reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment,
joins the process group (NCCL on CUDA, Gloo on CPU), takes its contiguous slice of
every global batch (:mod:`xmodal.train.sampler`) and wraps the networks in
``DistributedDataParallel``; only rank 0 writes files and shows progress.

Batch normalisation must see the *global* batch for a distributed run to compute
what one process would. :func:`convert_batchnorm` tells the fused DGCNN EdgeConv blocks
to reduce the statistics they compute inside their own autograd functions
(:func:`xmodal.models.dgcnn.sync_edgeconv_stats`: one all-reduce per BatchNorm in forward
and one in backward), and swaps every other BatchNorm layer (ResNet, Ff's input
normalisation, DGCNN's last layer, the reference EdgeConv's) for ``torch.nn.SyncBatchNorm``
on CUDA, or for :class:`GlobalBatchNorm` on CPU, where SyncBatchNorm refuses to run
("SyncBatchNorm expected input tensor to be on GPU").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from xmodal.errors import ConfigError
from xmodal.models.dgcnn import EdgeConv, sync_edgeconv_stats
from xmodal.utils.device import machine_device

__all__ = [
    "DistContext",
    "env_world",
    "resolve_device",
    "init_distributed",
    "cleanup_distributed",
    "GlobalBatchNorm",
    "convert_batchnorm",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
]

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    #: True when :func:`init_distributed` created the process group (and must destroy it)
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (0, 1, 0 without it)."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise ConfigError(f"malformed RANK/WORLD_SIZE/LOCAL_RANK environment: {exc}") from exc
    return rank, world, local


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``"cuda"`` -> ``cuda:LOCAL_RANK``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    return machine_device(spec)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; resolve this process's device."""
    rank, world, local = env_world()
    dev = resolve_device(device, local)
    owns = False
    if world > 1:
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend=backend, init_method="env://")
            owns = True
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, owns_group=owns)


def cleanup_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index or 0])
        else:
            dist.barrier()


def all_reduce_mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of ``t`` over processes (a copy; ``t`` itself when not distributed)."""
    if not ctx.distributed:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / ctx.world_size


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of a sum is the sum of the gradients.

    Written here because ``torch.distributed.nn.functional.all_reduce`` (the same thing) is
    deprecated in favour of a private module.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``sum over processes of x``, differentiable (backward: sum of the gradients)."""
    return _AllReduceSum.apply(x)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the union of the batches of all processes, for any device/backend.

    In training, the per-channel mean and (biased) variance are computed over every
    dimension but 1 of the inputs of *all* processes: two differentiable all-reduces
    (:func:`all_reduce_sum`: sum and count, then the sum of
    squared deviations), so gradients flow back to every process's inputs exactly as in
    one process with the concatenated batch; the arithmetic runs in float32 (float64 for
    float64 input). Running statistics are updated like
    ``nn.BatchNorm`` (unbiased variance, ``momentum`` or cumulative average). In
    evaluation, or outside a process group, it is plain ``F.batch_norm``. Works for
    inputs (B, C), (B, C, L), (B, C, H, W), ... and keeps BatchNorm's state-dict keys.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (B, C, ...), got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not (use_batch and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> float32; float64 stays
        count = torch.tensor([x.numel() / max(c, 1)], device=x.device, dtype=xf.dtype)
        stats = all_reduce_sum(torch.cat([xf.sum(dims), count]))
        total = stats[-1]
        mean = stats[:-1] / total
        shape = [1, c] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims)) / total
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (total / (total - 1)).clamp_min(0) if total > 1 else var
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach().to(self.running_var.dtype), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _global_bn(bn: _BatchNorm) -> GlobalBatchNorm:
    """A :class:`GlobalBatchNorm` sharing ``bn``'s parameters and running statistics."""
    out = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats).to(
        device=bn.weight.device if bn.affine else None
    )
    if bn.affine:
        with torch.no_grad():
            out.weight = bn.weight
            out.bias = bn.bias
    if bn.track_running_stats:
        out.running_mean = bn.running_mean
        out.running_var = bn.running_var
        out.num_batches_tracked = bn.num_batches_tracked
    out.train(bn.training)
    return out


def _replace_batchnorm(module: nn.Module, make) -> nn.Module:
    """``module`` with every BatchNorm layer ``bn`` replaced by ``make(bn)``, except those of a
    fused :class:`EdgeConv`: it never calls them, it reads their parameters and reduces its own
    statistics (:func:`xmodal.models.dgcnn.sync_edgeconv_stats`)."""
    if isinstance(module, EdgeConv):
        return module
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        out = make(module)
    for name, child in module.named_children():
        out.add_module(name, _replace_batchnorm(child, make))
    return out


def convert_batchnorm(module: nn.Module, device, world_size: Optional[int] = None) -> nn.Module:
    """Make every BatchNorm of ``module`` normalise over the global batch.

    ``world_size`` (default: the process group's, or 1): when 1 the module is returned
    unchanged. The fused DGCNN EdgeConv blocks are told to reduce their statistics over the
    default process group (:func:`~xmodal.models.dgcnn.sync_edgeconv_stats`; their own
    BatchNorm layers stay as they are). Every other BatchNorm1d/2d/3d becomes
    ``nn.SyncBatchNorm`` on CUDA and :class:`GlobalBatchNorm` on CPU, sharing the old layer's
    parameters and running statistics (state-dict keys are unchanged).

    Raises:
        ValueError: an ``EdgeConv(fused=False)``, which cannot reduce its statistics.
    """
    if world_size is None:
        world_size = dist.get_world_size() if (dist.is_available() and dist.is_initialized()) else 1
    if world_size <= 1:
        return module
    sync_edgeconv_stats(module)
    if torch.device(device).type == "cuda":
        return _replace_batchnorm(module, nn.SyncBatchNorm.convert_sync_batchnorm)
    return _replace_batchnorm(module, _global_bn)
