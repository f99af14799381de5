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

kNN memory is ``O(B * N^2)`` for the pairwise distances (4 MiB per cloud at N=1024); pass
``knn_chunk`` to process the queries in chunks of that many points (``O(B * chunk * N)``).
Ties in the max: both implementations send the gradient to one of the tied edges (``max``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["knn", "EdgeConvReference", "EdgeConv", "DGCNN"]

_SLOPE = 0.2


# ---------------------------------------------------------------------------------------------
# kNN graph
# ---------------------------------------------------------------------------------------------
def _check_k(k: int, n: int, include_self: bool) -> None:
    avail = n if include_self else n - 1
    if k < 1 or k > avail:
        what = "points" if include_self else "other points"
        raise ValueError(f"k={k} neighbours requested but each cloud has only {avail} {what} (N={n})")


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
    """
    if x.ndim != 3:
        raise ValueError(f"knn expects features of shape (B, C, N), got {tuple(x.shape)}")
    b, _, n = x.shape
    _check_k(k, n, include_self)
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


@torch.no_grad()
def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, count: int) -> None:
    """Update ``bn``'s running stats from batch ``mean`` and biased ``var`` over ``count`` values."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    bn.num_batches_tracked.add_(1)
    m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)


def _batch_stats(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column mean and biased variance of (M, C); the kernel BatchNorm itself uses."""
    return torch.batch_norm_update_stats(x2d, None, None, 0.0)


def _stats_outputs(ctx, mean: Tensor, var: Tensor, batch_stats: bool) -> tuple[Tensor, Tensor]:
    """The batch statistics returned (for the running-stat update) by the fused functions:
    fresh, non-differentiable tensors (empty when the running stats were used)."""
    if not batch_stats:
        mean, var = mean.new_empty(0), var.new_empty(0)
    ctx.mark_non_differentiable(mean, var)
    return mean, var


class _GatherBNLeaky(torch.autograd.Function):
    """h = leaky(BN(a[idx] + c)) over edges; BN stats over all edges. Shapes: a, c (P, C);
    idx (P*k,); returns h (P, k, C). Backward recomputes the edge tensor from a, c."""

    @staticmethod
    def forward(ctx, a, c, idx, k, weight, bias, mean, var, batch_stats, eps):
        p, ch = c.shape
        e = a.index_select(0, idx).view(p, k, ch).add_(c.unsqueeze(1))
        if batch_stats:
            mean, var = _batch_stats(e.view(-1, ch))
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        h = e.mul_(scale).add_(bias - mean * scale)  # in place: e itself is recomputed in backward
        F.leaky_relu_(h, _SLOPE)
        ctx.save_for_backward(a, c, idx, weight, mean, invstd, h)
        ctx.k, ctx.batch_stats, ctx.eps = k, batch_stats, eps
        return (h, *_stats_outputs(ctx, mean, var, batch_stats))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh, _gmean, _gvar):
        a, c, idx, weight, mean, invstd, h = ctx.saved_tensors
        p, ch = c.shape
        k = ctx.k
        g = torch.ops.aten.leaky_relu_backward(gh, h, _SLOPE, True).view(-1, ch)
        e = a.index_select(0, idx).view(p, k, ch).add_(c.unsqueeze(1)).view(-1, ch)
        if ctx.batch_stats:
            ge, gw, gb = torch.ops.aten.native_batch_norm_backward(
                g, e, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True]
            )
        else:
            gb = g.sum(0)
            gw = ((e - mean) * g).sum(0) * invstd
            ge = g * (weight * invstd)
        ga = torch.zeros_like(a).index_add_(0, idx, ge)
        gc = ge.view(p, k, ch).sum(1)
        return ga, gc, None, None, gw, gb, None, None, None, None


class _BNLeakyMax(torch.autograd.Function):
    """out = leaky(|g| * (max_k z - mean) * invstd + beta), BN stats over all edges of z.

    z: (P, k, C) with the sign of the BN weight already folded in; returns (P, C)."""

    @staticmethod
    def forward(ctx, z, gabs, beta, mean, var, batch_stats, eps):
        p, k, ch = z.shape
        if batch_stats:
            mean, var = _batch_stats(z.view(-1, ch))
        invstd = torch.rsqrt(var + eps)
        zmax, arg = z.max(dim=1)  # indices: the backward scatters to one edge per tie, like max
        xhat = (zmax - mean) * invstd
        out = F.leaky_relu(xhat * gabs + beta, _SLOPE)
        ctx.save_for_backward(z if batch_stats else None, arg, xhat, gabs, mean, invstd, out)
        ctx.shape = z.shape
        ctx.batch_stats = batch_stats
        return (out, *_stats_outputs(ctx, mean, var, batch_stats))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, _gmean, _gvar):
        z, arg, xhat, gabs, mean, invstd, out = ctx.saved_tensors
        p, k, ch = ctx.shape
        gy = torch.ops.aten.leaky_relu_backward(gout, out, _SLOPE, True)  # (P, C)
        gbeta = gy.sum(0)
        ggabs = (gy * xhat).sum(0)
        gsel = gy * (gabs * invstd)  # gradient reaching the selected (max) edge, (P, C)
        if ctx.batch_stats:
            # d/dz of the batch mean / variance, spread over all M = P*k edges:
            # dz = invstd * (g_xhat - mean(g_xhat) - xhat * mean(g_xhat * xhat)), g_xhat sparse.
            m = float(p * k)
            s1 = (gy * gabs).sum(0) / m
            s2 = ggabs * gabs / m
            alpha = -invstd * invstd * s2
            const = -invstd * s1 - mean * alpha
            gz = torch.addcmul(const, z, alpha)
        else:
            gz = gsel.new_zeros((p, k, ch))
        gz.scatter_add_(1, arg.unsqueeze(1), gsel.unsqueeze(1))
        return gz, ggabs, gbeta, None, None, None, None


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
    """

    def __init__(self, in_channels: int, out_channels: int, k: int = 20, *, include_self: bool = True,
                 knn_chunk: int | None = None, fused: bool = True) -> None:
        super().__init__(in_channels, out_channels, k, include_self=include_self, knn_chunk=knn_chunk)
        self.fused = bool(fused)

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
        sign = torch.where(bn2.weight.detach() >= 0, 1.0, -1.0).to(xt.dtype)
        w2 = self.conv2.weight.view(co, co) * sign[:, None]
        if self.fused:
            h, m1, v1 = _GatherBNLeaky.apply(
                a, cc, flat, k, bn1.weight, bn1.bias,
                bn1.running_mean, bn1.running_var, _uses_batch_stats(bn1), bn1.eps,
            )
            z = F.linear(h, w2)  # (B*N, k, C_out)
            out, m2, v2 = _BNLeakyMax.apply(
                z, bn2.weight.abs(), bn2.bias, sign * bn2.running_mean if bn2.running_mean is not None else None,
                bn2.running_var, _uses_batch_stats(bn2), bn2.eps,
            )
        else:
            e = a.index_select(0, flat).view(b * n, k, co) + cc.unsqueeze(1)
            h, m1, v1 = self._bn_rows(bn1, e.view(-1, co))
            h = F.leaky_relu_(h, _SLOPE).view(b * n, k, co)
            z = F.linear(h, w2)
            if _uses_batch_stats(bn2):
                v2, m2 = torch.var_mean(z.view(-1, co), dim=0, unbiased=False)
                mean, var = m2, v2
                m2, v2 = m2.detach(), v2.detach()
            else:
                mean, var = sign * bn2.running_mean, bn2.running_var
            y = (z.max(1).values - mean) * (bn2.weight.abs() * torch.rsqrt(var + bn2.eps)) + bn2.bias
            out = F.leaky_relu(y, _SLOPE)
        m_edges = b * n * k
        if _uses_batch_stats(bn1):
            _update_running_stats(bn1, m1, v1, m_edges)
        if _uses_batch_stats(bn2):
            _update_running_stats(bn2, sign * m2, v2, m_edges)
        return out.view(b, n, co)

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

    Attributes:
        out_dim: ``emb_dims``.
    """

    def __init__(self, k: int = 20, channels: tuple[int, ...] = (64, 64, 64, 128), emb_dims: int = 512,
                 fast: bool = True, *, include_self: bool = True, knn_chunk: int | None = None,
                 fused: bool = True) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
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
