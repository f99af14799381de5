"""Worker script of ``test_distributed.py::test_fused_edgeconv_global_stats_match_one_process``.

``python dgcnn_ddp_worker.py OUT`` (one process) or under ``torchrun --nproc_per_node W``: builds
the same float64 DGCNN (fused EdgeConv) in every process, converts its BatchNorm for the group
(:func:`xmodal.train.distributed.convert_batchnorm`), runs two training-mode forward + backward
passes on this process's contiguous slice of a fixed global batch of 5 clouds (3 + 2 on two
processes: unequal counts) and one eval-mode forward, and writes ``OUT/rank{R}.safetensors``:
per step the block / point / global features, the input gradient and every parameter gradient
(this process's share), then the BatchNorm buffers, the eval output, and the number of
``all_reduce`` calls made in each forward and backward.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from xmodal.models.dgcnn import DGCNN
from xmodal.train.distributed import convert_batchnorm

B, N, K, STEPS = 5, 48, 6, 2


class _CountingAllReduce:
    """Stands in for ``torch.distributed.all_reduce`` and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _model(world: int) -> nn.Module:
    torch.manual_seed(0)
    model = DGCNN(k=K, fast=True).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # BatchNorm scales of both signs (the fused max folds the sign into conv2)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
    return convert_batchnorm(model, "cpu", world).train()


def main(out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    counter = _CountingAllReduce(dist.all_reduce)
    dist.all_reduce = counter
    model = _model(world)
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(STEPS + 1, B, N, 3, generator=g, dtype=torch.float64)
    ws = torch.randn(STEPS, B, 512, generator=g, dtype=torch.float64)
    lo, hi = (0, 3) if (world, rank) == (2, 0) else (3, 5) if world == 2 else (0, B)
    res, counts = {}, []
    for step in range(STEPS):
        x = xs[step, lo:hi].clone().requires_grad_()
        counter.calls = 0
        feats = model.forward_features(x)
        fwd = counter.calls
        (feats["global"] * ws[step, lo:hi]).sum().backward()
        counts += [fwd, counter.calls - fwd]
        for i, f in enumerate(feats["blocks"]):
            res[f"{step}/block{i}"] = f.detach()
        res[f"{step}/point"], res[f"{step}/global"] = feats["point"].detach(), feats["global"].detach()
        res[f"{step}/grad/input"] = x.grad
        for name, p in model.named_parameters():
            res[f"{step}/grad/{name}"] = p.grad.clone()
        model.zero_grad(set_to_none=True)
    for name, b in model.named_buffers():
        res[f"buffer/{name}"] = b.clone()
    counter.calls = 0
    with torch.no_grad():
        res["eval"] = model.eval()(xs[STEPS, lo:hi])
    counts.append(counter.calls)
    res["counts"] = torch.tensor(counts)  # [fwd, bwd] per step, then the eval forward
    save_file({k: v.contiguous() for k, v in res.items()}, str(out / f"rank{rank}.safetensors"))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
