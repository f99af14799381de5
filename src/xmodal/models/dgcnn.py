"""DGCNN point encoder Fp (paper §3.2; Wang et al., "Dynamic Graph CNN" [53]).

Four EdgeConv blocks (64, 64, 64, 128 channels). Each block builds a kNN graph on its *input*
features (the first block on xyz), forms the edge feature ``[x_j - x_i, x_i]`` for every
neighbour ``j`` of point ``i``, applies two 1x1 convolutions each followed by BatchNorm and
LeakyReLU(0.2), and max-pools over the ``k`` neighbours. The four block outputs are
concatenated (320 channels), lifted to ``emb_dims`` (512) by a 1x1 conv + BN + LeakyReLU, and
max-pooled over the points into the global feature.

The neighbourhood **includes the point itself** by default, as in the reference DGCNN code
(its self-edge has ``x_j - x_i = 0``); ``include_self=False`` excludes it.

Two EdgeConv implementations with the *same parameters* (identical ``state_dict`` keys and
shapes, so weights move freely between them):

* :class:`EdgeConvReference` – the textbook form: gather the neighbours, build the
  ``(B, 2C, N, k)`` edge tensor, ``conv2d -> BN2d -> LeakyReLU -> conv2d -> BN2d -> LeakyReLU``,
  max over ``k``.
* :class:`EdgeConv` – the fast form, mathematically identical (train and eval mode, values and
  gradients):

  1. *first conv per point, not per edge*: ``W [x_j - x_i, x_i] = W_a x_j + (W_b - W_a) x_i``,
     so ``a = W_a x`` and ``c = (W_b - W_a) x`` are computed once per point, ``(B*N, C_out)``;
     the edge pre-activation is ``a[j] + c[i]`` (one ``index_select`` + broadcast add; the
     ``(B, 2C, N, k)`` edge tensor and the repeat of ``x_i`` are never built).
  2. *BN1 + LeakyReLU fused with the gather* (custom autograd function): the batch statistics
     are taken over all ``B*N*k`` edges exactly like ``BatchNorm2d``; for backward only the
     per-point ``a``, ``c`` are kept and the edge tensor is recomputed (one gather) instead of
     being stored.
  3. *BN2 + LeakyReLU + max fused*: BN (a per-channel affine map) and LeakyReLU are monotonic,
     so ``max_k act(bn(z)) = act(bn(max_k z))`` when the BN scale ``gamma`` is >= 0, and the
     min when it is negative. The sign of ``gamma`` is folded into the second conv's weight
     (``z' = sign(gamma) z``) so a single ``max`` serves all channels; the BN statistics are
     still computed over every edge (and the backward includes their gradient), but the
     normalised/activated ``(B, N, k, C)`` tensors are never materialised.
  4. channels-last layout ``(B, N, k, C)`` throughout, so both 1x1 convs are plain GEMMs and BN
     reduces over contiguous rows.

  Per edge, the fast block keeps two ``(B, N, k, C_out)`` tensors for backward (the conv2
  input and output) against about seven in the reference.

**Statistics over several processes.** Under DistributedDataParallel BatchNorm must normalise
over the global batch. The reference EdgeConv gets that from replacing its BatchNorm layers
(:func:`xmodal.train.distributed.convert_batchnorm`); the fast one never calls its BatchNorm
layers, so it is told explicitly: :func:`sync_edgeconv_stats` (which ``convert_batchnorm``
calls) sets ``sync_stats`` (and optionally ``process_group``) on every :class:`EdgeConv`. In
training mode, with ``torch.distributed`` initialised and more than one process in the group,
each fused BatchNorm then makes one all-reduce in forward -- per-channel ``n * mean``,
``n * (var + mean^2)`` and the count ``n``, in float64, from which the global mean and biased
variance follow -- and one in backward, of the two per-channel gradient sums its input gradient
needs (``sum dy`` and ``sum dy * (x - mean)``, as ``nn.SyncBatchNorm``). The running statistics
are updated with the global mean, variance and count, so every process holds what one process
on the concatenated batch would. The parameter gradients stay per process (DDP reduces them).
Otherwise (eval mode, no process group, a group of one, ``sync_stats`` False) nothing is
reduced and no collective is called. ``fused=False`` cannot synchronise and refuses to.

**Mixed precision.** Under ``torch.autocast`` (bf16 or fp16) the GEMMs (the two 1x1 convs) run
in the low precision; the fused BatchNorm functions take their statistics, normalise, and form
the statistics' gradient terms in float32 (float64 stays float64), and return activations and
input gradients in the low precision. kNN distances are computed in float32 as well (in bf16
about 5 % of a DGCNN's neighbours change).

kNN memory is ``O(B * N^2)`` for the pairwise distances (4 MiB per cloud at N=1024); pass
``knn_chunk`` to process the queries in chunks of that many points (``O(B * chunk * N)``).
Ties in the max: both implementations send the gradient to one of the tied edges (``max``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.errors import ConfigError

__all__ = ["knn", "EdgeConvReference", "EdgeConv", "DGCNN", "POINT_INITS", "sync_edgeconv_stats", "edgeconv_kind"]

_SLOPE = 0.2
#: weight initialisations of :class:`DGCNN` (``init=``; ``model.point_init``)
POINT_INITS = ("default", "kaiming")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kNN distances and BatchNorm arithmetic run in: float32 for bf16/fp16, else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------
# kNN graph
# ---------------------------------------------------------------------------------------------
def _check_k(k: int, n: int, include_self: bool) -> None:
    avail = n if include_self else n - 1
    if k < 1 or k > avail:
        what = "points" if include_self else "other points"
        # the data's cloud size against the model's k (model.k, the run's architecture): a setting
        raise ConfigError(f"k={k} neighbours requested but each cloud has only {avail} {what} (N={n})",
                          hint="lower model.k, or use clouds with more points")


@torch.no_grad()
def knn(x: Tensor, k: int, *, include_self: bool = True, chunk_size: int | None = None) -> Tensor:
    """Indices of the ``k`` nearest neighbours of every point (squared Euclidean distance).

    Args:
        x: (B, C, N) features.
        k: number of neighbours; must be <= N (<= N-1 with ``include_self=False``).
        include_self: keep the point itself among its neighbours (DGCNN's convention).
        chunk_size: process this many query points at a time (memory ``O(B*chunk*N)``
            instead of ``O(B*N^2)``); ``None`` = all at once.

    Returns:
        (B, N, k) int64 indices into the N points, nearest first (no gradient).

    The distances are computed in float32 (float64 for float64 input) with autocast off: in
    bf16 the expansion ``|q|^2 - 2 q.x + |x|^2`` loses the small differences that rank near
    neighbours (about 5 % of a DGCNN's neighbours change).
    """
    if x.ndim != 3:
        raise ValueError(f"knn expects features of shape (B, C, N), got {tuple(x.shape)}")
    _check_k(k, x.shape[2], include_self)
    with torch.autocast(x.device.type, enabled=False):
        return _knn(x.to(_compute_dtype(x.dtype)), k, include_self, chunk_size)


def _knn(x: Tensor, k: int, include_self: bool, chunk_size: int | None) -> Tensor:
    """:func:`knn` on checked (B, C, N) features, in their dtype."""
    n = x.shape[2]
    xt = x.transpose(1, 2)  # (B, N, C)
    sq = (xt * xt).sum(-1)  # (B, N)
    step = n if chunk_size is None else max(1, int(chunk_size))
    out = []
    for s in range(0, n, step):
        q = xt[:, s : s + step]  # (B, q, C)
        # |q|^2 - 2 q.x + |x|^2, via one batched GEMM (the expanded form cdist would use too)
        d = torch.baddbmm(sq[:, None, :], q, x, alpha=-2.0)  # (B, q, N)
        d.add_(sq[:, s : s + step, None])
        if not include_self:
            rows = torch.arange(d.shape[1], device=x.device)
            d[:, rows, rows + s] = float("inf")
        out.append(d.topk(k, dim=-1, largest=False).indices)
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def _flat_index(idx: Tensor) -> Tensor:
    """(B, N, k) per-cloud indices -> (B*N*k,) indices into the flattened (B*N) rows."""
    b, n, _ = idx.shape
    offset = torch.arange(b, device=idx.device).view(b, 1, 1) * n
    return (idx + offset).reshape(-1)


# ---------------------------------------------------------------------------------------------
# BatchNorm helpers (mirror torch.nn.modules.batchnorm._BatchNorm.forward)
# ---------------------------------------------------------------------------------------------
def _uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


@dataclass(frozen=True)
class _Norm:
    """How a fused function normalises (its non-differentiable BatchNorm arguments).

    ``running_mean``/``running_var`` (C,): used when ``batch_stats`` is False. ``group``: the
    process group whose batches the batch statistics cover; ``None`` = this process only (no
    collective calls).
    """

    running_mean: Tensor | None
    running_var: Tensor | None
    batch_stats: bool
    eps: float
    group: object | None = None


@torch.no_grad()
def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor,
                          count: int | Tensor) -> None:
    """Update ``bn``'s running stats from batch ``mean`` and biased ``var`` over ``count`` values
    (an int or a 0-dim tensor). A tensor count stays a tensor on every device: no host
    synchronisation on an accelerator, and no graph break under ``torch.compile`` (reading a CPU
    tensor's value with ``float`` split each EdgeConv's compiled graph in three). The factor is
    the same float32 number either way: the float64 ratio rounded once."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    bn.num_batches_tracked.add_(1)
    m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if isinstance(count, Tensor):
        unbiased = var * (count / (count - 1).clamp_min(1)).to(var.dtype)
    else:
        n = float(count)
        unbiased = var * (n / max(n - 1, 1))
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)


def _batch_stats(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column mean and biased variance of (M, C), in :func:`_compute_dtype` (the kernel
    BatchNorm itself uses). Given float32 running buffers the kernel accumulates bf16/fp16 input
    in float32 and returns float32 statistics (momentum 0 leaves the scratch buffers as they are)."""
    cd = _compute_dtype(x2d.dtype)
    if x2d.dtype == cd:
        return torch.batch_norm_update_stats(x2d, None, None, 0.0)
    ch = x2d.shape[1]
    rm, rv = x2d.new_zeros(ch, dtype=cd), x2d.new_ones(ch, dtype=cd)
    mean, var = torch.batch_norm_update_stats(x2d, rm, rv, 0.0)
    return mean.to(cd), var.to(cd)


def _merge_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics of the union of the batches of every process in ``group``.

    One all-reduce (float64) of ``[n * mean, n * (var + mean^2), n]`` per process; the global
    variance ``E[x^2] - mean^2`` is formed in float64 from per-process statistics that are
    themselves computed stably, so its cancellation stays below float32 round-off unless
    ``|mean| / std`` exceeds about 1e4.
    Returns the global mean and biased variance (C,) in ``mean``'s dtype and the global count
    (0-dim float64).
    """
    ch = mean.numel()
    m = mean.double()
    buf = torch.cat([m * count, (var.double() + m * m) * count, m.new_full((1,), float(count))])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    total = buf[-1]
    gmean = buf[:ch] / total
    gvar = (buf[ch : 2 * ch] / total - gmean * gmean).clamp_min_(0.0)
    return gmean.to(mean.dtype), gvar.to(var.dtype), total


def _norm_stats(x2d: Tensor, norm: _Norm) -> tuple[Tensor, Tensor, int | Tensor | None]:
    """(mean, biased var, count) that normalise the (M, C) rows ``x2d``: the batch statistics
    (over all processes of ``norm.group`` when set), else the running ones (count ``None``)."""
    if not norm.batch_stats:
        cd = _compute_dtype(x2d.dtype)
        return norm.running_mean.to(cd), norm.running_var.to(cd), None
    mean, var = _batch_stats(x2d)
    if norm.group is None:
        return mean, var, x2d.shape[0]
    return _merge_stats(mean, var, x2d.shape[0], norm.group)


def _bn_backward_global(g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, count: Tensor,
                        group) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm backward when the statistics cover every process's batch.

    g, x: (M, C) this process's output gradient and input rows (both overwritten); mean, invstd:
    the global statistics (C,); count: the global number of rows. One all-reduce of
    ``[sum g, sum g * (x - mean)]`` (what SyncBatchNorm reduces as ``sum_dy``, ``sum_dy_xmu``)
    gives the input gradient of the objective summed over processes; the returned weight and
    bias gradients are this process's share (DDP reduces them like any parameter gradient).
    """
    xmu = x.sub_(mean)
    sum_dy = g.sum(0)
    sum_dy_xmu = (xmu * g).sum(0)
    red = torch.cat([sum_dy, sum_dy_xmu])
    dist.all_reduce(red, op=dist.ReduceOp.SUM, group=group)
    mean_dy, mean_dy_xmu = (red / count).to(g.dtype).chunk(2)
    scale = weight * invstd
    gx = g.sub_(mean_dy).mul_(scale).addcmul_(xmu, -scale * invstd * invstd * mean_dy_xmu)
    return gx, sum_dy_xmu * invstd, sum_dy


def _stats_outputs(ctx, mean: Tensor, var: Tensor, count, batch_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The batch statistics returned (for the running-stat update) by the fused functions:
    fresh, non-differentiable tensors ``mean``, ``var`` (C,) and ``count`` (0-dim float64;
    all empty when the running stats were used)."""
    if batch_stats:
        count = torch.as_tensor(count, dtype=torch.float64)
    else:
        mean, var, count = mean.new_empty(0), var.new_empty(0), mean.new_empty(0, dtype=torch.float64)
    ctx.mark_non_differentiable(mean, var, count)
    return mean, var, count


def _edges(a: Tensor, c: Tensor, idx: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """The edge pre-activations ``a[idx] + c`` as a fresh (P, k, C) tensor of ``dtype`` (the
    per-point a, c are converted, not the k times larger edge tensor)."""
    p, ch = c.shape
    e = a.to(dtype).index_select(0, idx).view(p, k, ch)
    return e.add_(c.to(dtype).unsqueeze(1))


class _GatherBNLeaky(torch.autograd.Function):
    """h = leaky(BN(a[idx] + c)) over edges; BN stats over all edges. Shapes: a, c (P, C);
    idx (P*k,); returns h (P, k, C) in ``a``'s dtype and the statistics (see
    :func:`_stats_outputs`). The BatchNorm arithmetic runs in :func:`_compute_dtype`; backward
    recomputes the edge tensor from a, c."""

    @staticmethod
    def forward(ctx, a, c, idx, k, weight, bias, norm: _Norm):
        ch = c.shape[1]
        e = _edges(a, c, idx, k, _compute_dtype(a.dtype))
        mean, var, count = _norm_stats(e.view(-1, ch), norm)
        invstd = torch.rsqrt(var + norm.eps)
        scale = weight * invstd
        h = e.mul_(scale).add_(bias - mean * scale)  # in place: e itself is recomputed in backward
        h = F.leaky_relu_(h, _SLOPE).to(a.dtype)
        ctx.save_for_backward(a, c, idx, weight, mean, invstd, h)
        ctx.k, ctx.norm, ctx.count = k, norm, count
        return (h, *_stats_outputs(ctx, mean, var, count, norm.batch_stats))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh, _gmean, _gvar, _gcount):
        a, c, idx, weight, mean, invstd, h = ctx.saved_tensors
        p, ch = c.shape
        norm, cd = ctx.norm, mean.dtype
        g = torch.ops.aten.leaky_relu_backward(gh.to(cd), h, _SLOPE, True).view(-1, ch)  # in cd
        e = _edges(a, c, idx, ctx.k, cd).view(-1, ch)
        if not norm.batch_stats:
            gb = g.sum(0)
            gw = ((e - mean) * g).sum(0) * invstd
            ge = g * (weight * invstd)
        elif norm.group is None:
            ge, gw, gb = torch.ops.aten.native_batch_norm_backward(
                g, e, weight, None, None, mean, invstd, True, norm.eps, [True, True, True]
            )
        else:
            ge, gw, gb = _bn_backward_global(g, e, weight, mean, invstd, ctx.count, norm.group)
        ga = torch.zeros_like(a, dtype=cd).index_add_(0, idx, ge)
        gc = ge.view(p, ctx.k, ch).sum(1)
        return ga.to(a.dtype), gc.to(c.dtype), None, None, gw, gb, None


class _GatherLeaky(torch.autograd.Function):
    """h = leaky(a[idx] + c) over edges, for a BatchNorm with fixed statistics folded into a, c.

    With fixed (running) statistics BN1 is a per-channel affine map, so it is applied to the
    per-point terms before the gather (``a * scale``, ``c * scale + shift``, plain autograd ops on
    P rows) and the edges only need the gather, the add and the activation; backward keeps the
    activated edges and needs no edge tensor of its own. Shapes: a, c (P, C); idx (P*k,);
    returns h (P, k, C) in ``dtype``.
    """

    @staticmethod
    def forward(ctx, a, c, idx, k, dtype):
        p, ch = c.shape
        h = F.leaky_relu_(a.index_select(0, idx).view(p, k, ch).add_(c.unsqueeze(1)), _SLOPE)
        ctx.save_for_backward(idx, h)
        ctx.k, ctx.p = k, p
        return h.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        idx, h = ctx.saved_tensors
        ch = h.shape[2]
        g = torch.ops.aten.leaky_relu_backward(gh.to(h.dtype), h, _SLOPE, True)  # (P, k, C)
        ga = g.new_zeros((ctx.p, ch)).index_add_(0, idx, g.view(-1, ch))
        return ga, g.sum(1), None, None, None


class _BNLeakyMax(torch.autograd.Function):
    """out = leaky(|g| * (max_k z - mean) * invstd + beta), BN stats over all edges of z.

    z: (P, k, C) with the sign of the BN weight already folded in; returns out (P, C) in z's
    dtype and the statistics (see :func:`_stats_outputs`). The BatchNorm arithmetic runs in
    :func:`_compute_dtype`."""

    @staticmethod
    def forward(ctx, z, gabs, beta, norm: _Norm):
        ch = z.shape[2]
        mean, var, count = _norm_stats(z.view(-1, ch), norm)
        invstd = torch.rsqrt(var + norm.eps)
        zmax, arg = z.max(dim=1)  # indices: the backward scatters to one edge per tie, like max
        xhat = (zmax.to(mean.dtype) - mean) * invstd
        out = F.leaky_relu(xhat * gabs + beta, _SLOPE)
        ctx.save_for_backward(z if norm.batch_stats else None, arg, xhat, gabs, mean, invstd, out)
        ctx.shape, ctx.dtype, ctx.norm, ctx.count = z.shape, z.dtype, norm, count
        return (out.to(z.dtype), *_stats_outputs(ctx, mean, var, count, norm.batch_stats))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, _gmean, _gvar, _gcount):
        z, arg, xhat, gabs, mean, invstd, out = ctx.saved_tensors
        norm = ctx.norm
        gy = torch.ops.aten.leaky_relu_backward(gout.to(out.dtype), out, _SLOPE, True)  # (P, C)
        gbeta = gy.sum(0)
        ggabs = (gy * xhat).sum(0)
        gsel = gy * (gabs * invstd)  # gradient reaching the selected (max) edge, (P, C)
        if norm.batch_stats:
            # d/dz of the batch mean / variance, spread over all M edges (of every process):
            # dz = invstd * (g_xhat - mean(g_xhat) - xhat * mean(g_xhat * xhat)), g_xhat sparse,
            # sum(g_xhat) = |g| * gbeta and sum(g_xhat * xhat) = |g| * ggabs.
            sums = torch.cat([gbeta, ggabs])
            if norm.group is not None:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=norm.group)
            s1, s2 = (sums / ctx.count).to(gabs.dtype).mul_(gabs.repeat(2)).chunk(2)
            alpha = -invstd * invstd * s2
            const = -invstd * s1 - mean * alpha
            # every edge gets const + alpha * z (computed in cd, stored in z's dtype); the selected
            # ones also gsel, their sum formed in cd and rounded once: written over them
            gz = z.new_empty(ctx.shape)
            torch.addcmul(const, z, alpha, out=gz)
            gsel = torch.addcmul(const, z.gather(1, arg.unsqueeze(1)).squeeze(1), alpha).add_(gsel)
        else:  # only the selected edges get a gradient
            gz = gsel.new_zeros(ctx.shape, dtype=ctx.dtype)
        return gz.scatter_(1, arg.unsqueeze(1), gsel.to(ctx.dtype).unsqueeze(1)), ggabs, gbeta, None


# ---------------------------------------------------------------------------------------------
# EdgeConv
# ---------------------------------------------------------------------------------------------
class _EdgeConvBase(nn.Module):
    """Parameters shared by both EdgeConv implementations (identical state_dict keys).

    conv1: Conv2d(2*C_in, C_out, 1, bias=False), bn1: BatchNorm2d(C_out),
    conv2: Conv2d(C_out, C_out, 1, bias=False), bn2: BatchNorm2d(C_out).
    """

    def __init__(self, in_channels: int, out_channels: int, k: int = 20, *, include_self: bool = True,
                 knn_chunk: int | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.k, self.include_self, self.knn_chunk = int(k), bool(include_self), knn_chunk
        self.conv1 = nn.Conv2d(2 * in_channels, out_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def extra_repr(self) -> str:
        return f"k={self.k}, include_self={self.include_self}"

    def graph(self, x: Tensor) -> Tensor:
        """x: (B, C, N) -> kNN indices (B, N, k) built on these features."""
        return knn(x.detach(), self.k, include_self=self.include_self, chunk_size=self.knn_chunk)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"EdgeConv expects (B, {self.in_channels}, N) features, got {tuple(x.shape)}")


class EdgeConvReference(_EdgeConvBase):
    """Straightforward EdgeConv: ``forward(x (B, C_in, N), idx=None) -> (B, C_out, N)``.

    ``idx`` (B, N, k) overrides the kNN graph (by default built on ``x``).
    """

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        self._check(x)
        if idx is None:
            idx = self.graph(x)
        b, c, n = x.shape
        k = idx.shape[-1]
        xt = x.transpose(1, 2).reshape(b * n, c)
        nbr = xt[_flat_index(idx)].view(b, n, k, c)  # x_j
        ctr = x.transpose(1, 2).unsqueeze(2).expand(b, n, k, c)  # x_i repeated
        edge = torch.cat([nbr - ctr, ctr], dim=3).permute(0, 3, 1, 2).contiguous()  # (B, 2C, N, k)
        h = F.leaky_relu(self.bn1(self.conv1(edge)), _SLOPE)
        h = F.leaky_relu(self.bn2(self.conv2(h)), _SLOPE)
        return h.max(dim=-1)[0]


class EdgeConv(_EdgeConvBase):
    """Fast EdgeConv (see the module docstring); same parameters and outputs as
    :class:`EdgeConvReference`.

    ``forward(x (B, C_in, N), idx=None) -> (B, C_out, N)``. ``forward_cl`` takes and returns the
    channels-last layout ``(B, N, C)`` used between blocks inside :class:`DGCNN`.
    ``fused=False`` runs the same algebra with plain autograd ops (for comparison).

    Attributes:
        sync_stats: when True (set by :func:`sync_edgeconv_stats`) and ``torch.distributed`` is
            initialised with more than one process in ``process_group``, the training-mode
            BatchNorm statistics cover the batches of all those processes (fused only).
        process_group: the group to reduce over; ``None`` = the default (world) group.
    """

    #: with fixed BatchNorm statistics (eval mode, frozen BatchNorm) fold BN1 into the per-point terms
    #: (:class:`_GatherLeaky`); False sends them through the general :class:`_GatherBNLeaky` (same
    #: result; kept for benchmarks/train_bench.py and the equivalence tests)
    fold_fixed_bn: bool = True

    def __init__(self, in_channels: int, out_channels: int, k: int = 20, *, include_self: bool = True,
                 knn_chunk: int | None = None, fused: bool = True) -> None:
        super().__init__(in_channels, out_channels, k, include_self=include_self, knn_chunk=knn_chunk)
        self.fused = bool(fused)
        self.sync_stats = False
        self.process_group = None

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        self._check(x)
        return self.forward_cl(x.transpose(1, 2), idx).transpose(1, 2)

    def forward_cl(self, xt: Tensor, idx: Tensor | None = None) -> Tensor:
        """xt: (B, N, C_in) channels-last -> (B, N, C_out)."""
        b, n, c = xt.shape
        if c != self.in_channels:
            raise ValueError(f"EdgeConv expects (B, N, {self.in_channels}) features, got {tuple(xt.shape)}")
        if idx is None:
            idx = self.graph(xt.transpose(1, 2))
        k = idx.shape[-1]
        co = self.out_channels
        flat = _flat_index(idx)
        # conv1 per point: W [x_j - x_i, x_i] = W_a x_j + (W_b - W_a) x_i
        w1 = self.conv1.weight.view(co, 2 * c)
        wa, wb = w1[:, :c], w1[:, c:]
        xf = xt.reshape(b * n, c)
        a, cc = F.linear(xf, wa), F.linear(xf, wb - wa)  # (B*N, C_out) each, per point
        # sign of the BN2 scale folded into conv2 so that max commutes with BN2 + LeakyReLU
        bn1, bn2 = self.bn1, self.bn2
        sign = torch.where(bn2.weight.detach() >= 0, 1.0, -1.0).to(bn2.weight.dtype)
        w2 = self.conv2.weight.view(co, co) * sign[:, None]
        blocks = self._fused_bn if self.fused else self._autograd_bn
        out, (m1, v1, n1), (m2, v2, n2) = blocks(a, cc, flat, k, w2, sign)
        if _uses_batch_stats(bn1):
            _update_running_stats(bn1, m1, v1, n1)
        if _uses_batch_stats(bn2):
            _update_running_stats(bn2, sign * m2, v2, n2)
        return out.view(b, n, co)

    def _stats_group(self):
        """The process group the BatchNorm statistics are reduced over, or ``None`` (this
        process's batch only: no collective calls) when not synchronising or alone in it."""
        if not (self.sync_stats and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _fused_bn(self, a: Tensor, cc: Tensor, flat: Tensor, k: int, w2: Tensor, sign: Tensor):
        """The fused path: a, cc (P, C) per-point conv1 terms, flat (P*k,) neighbour rows, w2
        (C, C) conv2 with the BN2 sign folded in -> out (P, C), (mean, var, count) of BN1 and
        of BN2 (sign-folded mean)."""
        bn1, bn2 = self.bn1, self.bn2
        group = self._stats_group()
        if _uses_batch_stats(bn1) or not self.fold_fixed_bn:
            norm1 = _Norm(bn1.running_mean, bn1.running_var, _uses_batch_stats(bn1), bn1.eps, group)
            h, *stats1 = _GatherBNLeaky.apply(a, cc, flat, k, bn1.weight, bn1.bias, norm1)
        else:  # fixed statistics: BN1 is an affine map, applied per point before the gather
            cd = _compute_dtype(a.dtype)
            scale = bn1.weight.to(cd) * torch.rsqrt(bn1.running_var.to(cd) + bn1.eps)
            shift = bn1.bias.to(cd) - bn1.running_mean.to(cd) * scale
            h = _GatherLeaky.apply(a.to(cd) * scale, torch.addcmul(shift, cc.to(cd), scale), flat, k, a.dtype)
            stats1 = (None, None, None)
        z = F.linear(h, w2)  # (P, k, C)
        rm2 = sign * bn2.running_mean if bn2.running_mean is not None else None
        norm2 = _Norm(rm2, bn2.running_var, _uses_batch_stats(bn2), bn2.eps, group)
        out, *stats2 = _BNLeakyMax.apply(z, bn2.weight.abs(), bn2.bias, norm2)
        return out, stats1, stats2

    def _autograd_bn(self, a: Tensor, cc: Tensor, flat: Tensor, k: int, w2: Tensor, sign: Tensor):
        """The same as :meth:`_fused_bn` with plain autograd ops (local statistics only)."""
        if self._stats_group() is not None:
            raise RuntimeError("EdgeConv(fused=False) takes BatchNorm statistics of this process only; "
                               "use fused=True to synchronise them")
        p, co = cc.shape
        bn1, bn2 = self.bn1, self.bn2
        e = a.index_select(0, flat).view(p, k, co) + cc.unsqueeze(1)
        h, m1, v1 = self._bn_rows(bn1, e.view(-1, co))
        h = F.leaky_relu_(h, _SLOPE).view(p, k, co)
        z = F.linear(h, w2)
        if _uses_batch_stats(bn2):
            v2, m2 = torch.var_mean(z.view(-1, co), dim=0, unbiased=False)
            mean, var = m2, v2
            m2, v2 = m2.detach(), v2.detach()
        else:
            mean, var = sign * bn2.running_mean, bn2.running_var
            m2 = v2 = None
        y = (z.max(1).values - mean) * (bn2.weight.abs() * torch.rsqrt(var + bn2.eps)) + bn2.bias
        return F.leaky_relu(y, _SLOPE), (m1, v1, p * k), (m2, v2, p * k)

    @staticmethod
    def _bn_rows(bn: nn.modules.batchnorm._BatchNorm, x2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Differentiable BN of (M, C) rows with ``bn``'s parameters; running stats not touched."""
        if _uses_batch_stats(bn):
            with torch.no_grad():
                mean, var = _batch_stats(x2d)
            out = F.batch_norm(x2d, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        else:
            mean, var = bn.running_mean, bn.running_var
            out = F.batch_norm(x2d, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return out, mean, var


def sync_edgeconv_stats(module: nn.Module, process_group=None, enabled: bool = True) -> int:
    """Make every :class:`EdgeConv` inside ``module`` take its training-mode BatchNorm statistics
    over the batches of all processes of ``process_group`` (``None``: the default group).

    Per BatchNorm: one all-reduce of the per-channel statistics in forward and one of the two
    gradient sums in backward (as ``nn.SyncBatchNorm``). Nothing is reduced, and no collective
    is called, while ``torch.distributed`` is not initialised or the group has one process.
    ``enabled=False`` switches it off again. Returns the number of EdgeConv blocks set.

    Raises:
        ValueError: an EdgeConv with ``fused=False`` (its plain autograd ops cannot reduce).
    """
    convs = [(name, m) for name, m in module.named_modules() if isinstance(m, EdgeConv)]
    if enabled:
        unfused = [name for name, m in convs if not m.fused]
        if unfused:
            raise ValueError(f"{unfused[0] or type(module).__name__}: EdgeConv(fused=False) cannot synchronise "
                             "its BatchNorm statistics; use fused=True or the reference EdgeConv (fast=False)")
    for _, m in convs:
        m.sync_stats, m.process_group = bool(enabled), process_group if enabled else None
    return len(convs)


def edgeconv_kind(module: nn.Module) -> str | None:
    """Which EdgeConv ``module`` runs: ``"fused"``, ``"autograd"`` (``EdgeConv(fused=False)``),
    ``"reference"`` (several joined by ``+``), or ``None`` when it has no EdgeConv."""
    kinds = set()
    for m in module.modules():
        if isinstance(m, EdgeConv):
            kinds.add("fused" if m.fused else "autograd")
        elif isinstance(m, EdgeConvReference):
            kinds.add("reference")
    return "+".join(sorted(kinds)) or None


# ---------------------------------------------------------------------------------------------
# DGCNN
# ---------------------------------------------------------------------------------------------
class DGCNN(nn.Module):
    """DGCNN encoder: ``forward(x (B, N, 3)) -> (B, emb_dims)``.

    Args:
        k: neighbours per point (default 20; must not exceed N).
        channels: output channels of the EdgeConv blocks.
        emb_dims: size of the per-point embedding and of the global feature.
        fast: use :class:`EdgeConv` (else :class:`EdgeConvReference`); weights are interchangeable.
        include_self: whether a point is its own neighbour (DGCNN convention: yes).
        knn_chunk: query chunk size for the kNN distances (``None``: all at once, O(B*N^2)).
        fused: with ``fast``, use the fused autograd kernels (else plain autograd ops).
        init: how the convolution weights start: ``"default"`` (PyTorch's, as the reference DGCNN
            code; with BatchNorm in training mode the scale does not matter) or ``"kaiming"`` (He
            normal for LeakyReLU(0.2), fan-in: every layer keeps the scale of its input). With
            frozen BatchNorm statistics (the identity) nothing rescales the activations, and under
            ``"default"`` each EdgeConv block's output is about 7x smaller than its input, so the
            deep blocks contribute almost nothing and get ~75x smaller relative gradients
            (docs/EXPERIMENTS.md).

    Attributes:
        out_dim: ``emb_dims``.
    """

    def __init__(self, k: int = 20, channels: tuple[int, ...] = (64, 64, 64, 128), emb_dims: int = 512,
                 fast: bool = True, *, include_self: bool = True, knn_chunk: int | None = None,
                 fused: bool = True, init: str = "default") -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if init not in POINT_INITS:
            raise ValueError(f"init must be one of {list(POINT_INITS)}, got {init!r}")
        self.k, self.fast, self.channels = int(k), bool(fast), tuple(int(c) for c in channels)
        self.out_dim = int(emb_dims)
        blocks = []
        in_ch = 3
        for co in self.channels:
            if fast:
                blocks.append(EdgeConv(in_ch, co, k, include_self=include_self, knn_chunk=knn_chunk, fused=fused))
            else:
                blocks.append(EdgeConvReference(in_ch, co, k, include_self=include_self, knn_chunk=knn_chunk))
            in_ch = co
        self.edge_convs = nn.ModuleList(blocks)
        self.conv_out = nn.Conv1d(sum(self.channels), emb_dims, kernel_size=1, bias=False)
        self.bn_out = nn.BatchNorm1d(emb_dims)
        if init == "kaiming":
            for m in self.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    nn.init.kaiming_normal_(m.weight, a=_SLOPE, mode="fan_in", nonlinearity="leaky_relu")

    def _check(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != 3:
            raise ValueError(f"DGCNN expects points of shape (B, N, 3), got {tuple(x.shape)}")
        _check_k(self.k, x.shape[1], self.edge_convs[0].include_self)

    def forward_features(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """x: (B, N, 3) -> ``{"global": (B, E), "blocks": [(B, C_i, N)] * 4, "point": (B, E, N)}``."""
        self._check(x)
        b, n, _ = x.shape
        if self.fast:
            feats = []
            h = x
            for blk in self.edge_convs:
                h = blk.forward_cl(h)
                feats.append(h)
            cat = torch.cat(feats, dim=-1).view(b * n, -1)  # (B*N, 320)
            pt = F.linear(cat, self.conv_out.weight.squeeze(-1))
            pt = F.leaky_relu(self.bn_out(pt), _SLOPE).view(b, n, -1)
            glob = pt.max(dim=1).values
            return {"global": glob, "blocks": [f.transpose(1, 2) for f in feats], "point": pt.transpose(1, 2)}
        h = x.transpose(1, 2)
        blocks = []
        for blk in self.edge_convs:
            h = blk(h)
            blocks.append(h)
        pt = F.leaky_relu(self.bn_out(self.conv_out(torch.cat(blocks, dim=1))), _SLOPE)
        return {"global": pt.max(dim=-1)[0], "blocks": blocks, "point": pt}

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, 3) -> (B, emb_dims)."""
        return self.forward_features(x)["global"]
