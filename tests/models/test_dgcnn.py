"""Tests of the DGCNN point encoder: fast EdgeConv == reference EdgeConv, kNN, invariances."""

import pytest
import torch
from torch import nn

from xmodal.models.dgcnn import DGCNN, EdgeConv, EdgeConvReference, knn

B, N, K = 2, 64, 8


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """BN weights of both signs (exercises the sign folding of the fast max) and offsets."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))


def _close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max(1, max |expected|) (errors scale with the magnitude)."""
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs diff {err:.3g} > {tol:.1g} * {scale:.3g}"


def _pair(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    ref = DGCNN(k=K, fast=False, **kw).to(dtype)
    _randomise_bn(ref)
    fast = DGCNN(k=K, fast=True, **kw).to(dtype)
    fast.load_state_dict(ref.state_dict())  # same keys -> weights transfer
    return ref, fast


def _points(seed, dtype=torch.float32, b=B, n=N):
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_shapes_and_features():
    model = DGCNN(k=K)
    out = model.forward_features(_points(0))
    assert out["global"].shape == (B, 512)
    assert [tuple(f.shape) for f in out["blocks"]] == [(B, 64, N), (B, 64, N), (B, 64, N), (B, 128, N)]
    assert out["point"].shape == (B, 512, N)
    torch.testing.assert_close(out["global"], out["point"].amax(dim=-1))
    assert model.out_dim == 512
    assert model(_points(0)).shape == (B, 512)


def test_state_dict_keys_identical_between_implementations():
    assert list(DGCNN(fast=True).state_dict()) == list(DGCNN(fast=False).state_dict())


@pytest.mark.parametrize("fused", [True, False])
def test_fast_matches_reference_train_eval_and_grads(fused):
    """Exactness in float64 (float32 round-off can flip near-tied kNN graphs of later blocks,
    which legitimately changes a few gradient entries)."""
    dtype, tol = torch.float64, 1e-10
    ref, fast = _pair(dtype, fused=fused)
    for step in range(3):  # train mode; also populates running stats
        x = _points(step, dtype)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        fr, ff = ref.forward_features(xr), fast.forward_features(xf)
        for a, b in zip(fr["blocks"] + [fr["point"], fr["global"]], ff["blocks"] + [ff["point"], ff["global"]]):
            _close(b, a, tol, "features")
        w = torch.randn(B, 512, generator=torch.Generator().manual_seed(10 + step)).to(dtype)
        (fr["global"] * w).sum().backward()
        (ff["global"] * w).sum().backward()
        _close(xf.grad, xr.grad, tol, "input grad")
        for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
            _close(pf.grad, pr.grad, tol, name)
        ref.zero_grad()
        fast.zero_grad()
    for (name, br), bf in zip(ref.named_buffers(), fast.buffers()):
        _close(bf.double(), br.double(), tol, name)
    assert int(fast.edge_convs[0].bn2.num_batches_tracked) == 3
    ref.eval()
    fast.eval()
    x = _points(7, dtype)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    _close(yf, yr, tol, "eval output")
    yr.square().sum().backward()
    yf.square().sum().backward()
    _close(xf.grad, xr.grad, tol, "input grad")
    for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        _close(pf.grad, pr.grad, tol, name)


def test_fast_matches_reference_float32():
    ref, fast = _pair(torch.float32)
    for step in range(2):
        x = _points(step)
        fr, ff = ref.forward_features(x), fast.forward_features(x)
        _close(ff["point"], fr["point"], 1e-4, "point features")
        fr["global"].sum().backward()
        ff["global"].sum().backward()
        for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
            _close(pf.grad, pr.grad, 1e-3, name)
    ref.eval()
    fast.eval()
    with torch.no_grad():
        _close(fast(_points(5)), ref(_points(5)), 1e-4, "eval output")


def test_max_ties_send_gradient_to_one_edge_like_reference():
    """Duplicate points make tied edges; the total gradient must match the reference."""
    ref, fast = _pair(torch.float64)
    x = _points(0, torch.float64)
    x[:, 1] = x[:, 0]  # a duplicated point
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).sum().backward()
    fast(xf).sum().backward()
    for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        _close(pf.grad, pr.grad, 1e-8, name)
    # the pair of duplicates together receives the same gradient
    _close(xf.grad[:, :2].sum(1), xr.grad[:, :2].sum(1), 1e-8, "duplicate pair")


def test_edgeconv_block_fast_matches_reference_on_given_graph():
    torch.manual_seed(0)
    ref = EdgeConvReference(16, 32, k=5).double()
    _randomise_bn(ref, seed=3)
    fast = EdgeConv(16, 32, k=5).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 16, 40, dtype=torch.float64)
    idx = torch.randint(0, 40, (3, 40, 5))  # arbitrary graph, repeated neighbours allowed
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr, idx), fast(xf, idx)
    assert yf.shape == (3, 32, 40)
    torch.testing.assert_close(yf, yr)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad)


def test_fused_functions_pass_gradcheck():
    torch.manual_seed(0)
    conv = EdgeConv(4, 6, k=3).double()
    _randomise_bn(conv, seed=5)
    x = torch.randn(2, 4, 10, dtype=torch.float64, requires_grad=True)
    idx = knn(x.detach(), 3)
    assert torch.autograd.gradcheck(lambda t: conv(t, idx), (x,))
    conv.eval()
    assert torch.autograd.gradcheck(lambda t: conv(t, idx), (x,))


def test_global_feature_is_permutation_invariant():
    model = DGCNN(k=K).double()
    _randomise_bn(model)
    model.eval()
    x = _points(1, torch.float64)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, outp = model.forward_features(x), model.forward_features(x[:, perm])
    torch.testing.assert_close(outp["global"], out["global"])
    torch.testing.assert_close(outp["point"], out["point"][:, :, perm])


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("chunk", [None, 7])
def test_knn_matches_brute_force(include_self, chunk):
    x = torch.randn(2, 5, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = knn(x, 6, include_self=include_self, chunk_size=chunk)
    assert idx.shape == (2, 30, 6) and idx.dtype == torch.int64
    pts = x.transpose(1, 2)
    for b in range(2):
        for i in range(30):
            d = ((pts[b] - pts[b, i]) ** 2).sum(-1)
            if not include_self:
                d[i] = float("inf")
            expected = sorted(range(30), key=lambda j: d[j].item())[:6]
            assert idx[b, i].tolist() == expected
    if include_self:
        assert torch.equal(idx[:, :, 0], torch.arange(30).expand(2, 30))  # self is nearest
    else:
        assert not (idx == torch.arange(30).view(1, 30, 1)).any()


def test_k_larger_than_n_errors_clearly():
    with pytest.raises(ValueError, match=r"k=20 .* only 10 points"):
        DGCNN(k=20)(torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match="only 9 other points"):
        knn(torch.randn(1, 3, 10), 10, include_self=False)
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        DGCNN(k=4)(torch.randn(2, 3, 10))


# ---------------------------------------------------------------------------------------------
# mixed precision (CPU autocast)
# ---------------------------------------------------------------------------------------------
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # |fl(x) - x| <= u |x|


def _one_rounding_away(actual, exact, dtype, what):
    """``actual`` (dtype) is ``exact`` (float32) rounded once to ``dtype``, element by element."""
    err = (actual.float() - exact).abs()
    bound = _UNIT_ROUNDOFF[dtype] * exact.abs() + 2.0**-25  # + half the smallest fp16 subnormal
    assert actual.dtype == dtype and bool((err <= bound).all()), f"{what}: max excess {(err - bound).max():.3g}"


def _run_fused(fn, inputs, params, norm, grad_out):
    """Forward + backward of a fused function; returns (outputs, input grads, param grads)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    for p in params:
        p.grad = None
    out, mean, var, count = fn(*leaves, *params, norm)
    out.backward(grad_out.to(out.dtype))
    return (out, mean, var), [t.grad for t in leaves], [p.grad.clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_functions_keep_batchnorm_arithmetic_in_float32(dtype):
    """On bf16/fp16 inputs the fused functions compute exactly what they compute on the same
    values in float32: equal statistics and parameter gradients (float32), and outputs and input
    gradients one rounding to the low precision away. BatchNorm statistics taken in the low
    precision would be ~u off instead (and the backward used to fail on them)."""
    from xmodal.models.dgcnn import _BNLeakyMax, _GatherBNLeaky, _Norm

    g = torch.Generator().manual_seed(0)
    p, k, ch = 120, 6, 16
    a = torch.randn(p, ch, generator=g).to(dtype)
    c = (torch.randn(p, ch, generator=g) + 3).to(dtype)  # an offset: mean/std of the edges ~3
    idx = torch.randint(0, p, (p * k,), generator=g)
    z = (2 * torch.randn(p, k, ch, generator=g) + 1).to(dtype)
    gh, gout = torch.randn(p, k, ch, generator=g).to(dtype), torch.randn(p, ch, generator=g).to(dtype)
    w, b = torch.randn(ch, generator=g), torch.randn(ch, generator=g)
    gather = lambda a_, c_, w_, b_, norm: _GatherBNLeaky.apply(a_, c_, idx, k, w_, b_, norm)  # noqa: E731
    cases = [(gather, [a, c], [w, b], gh), (_BNLeakyMax.apply, [z], [w.abs(), b], gout)]
    for fn, inputs, params, grad_out in cases:
        params = [t.clone().requires_grad_() for t in params]
        norm = _Norm(None, None, True, 1e-5)
        (out, mean, var), gin, gpar = _run_fused(fn, inputs, params, norm, grad_out)
        (out32, mean32, var32), gin32, gpar32 = _run_fused(fn, [t.float() for t in inputs], params, norm, grad_out)
        assert mean.dtype == var.dtype == torch.float32
        torch.testing.assert_close(mean, mean32, rtol=1e-6, atol=0)
        torch.testing.assert_close(var, var32, rtol=1e-6, atol=0)
        for gp, gp32 in zip(gpar, gpar32):
            assert gp.dtype == torch.float32
            torch.testing.assert_close(gp, gp32, rtol=1e-6, atol=1e-6)
        _one_rounding_away(out, out32, dtype, "output")
        for i, (gi, gi32) in enumerate(zip(gin, gin32)):
            _one_rounding_away(gi, gi32, dtype, f"input grad {i}")


def _autocast_step(model, x, w, dtype):
    """Train-mode forward + backward of ``(global * w).sum()`` under CPU autocast (``dtype`` None:
    float32); returns (features, input grad, flat parameter grad)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        feats = model.forward_features(x)
    (feats["global"].float() * w).sum().backward()
    return feats, x.grad, torch.cat([p.grad.flatten() for p in model.parameters()])


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _cos(a, b):
    a, b = a.float().flatten(), b.float().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


# Tolerances, measured first (4 clouds of 32 points, k = 32 so that every kNN graph is complete and
# cannot change with the rounding; seeds 0-3, fused and reference EdgeConv alike):
# * bf16 (unit roundoff u = 2^-8 = 0.0039): features (blocks, point, global) <= 3.0 % relative
#   (Frobenius) error, running statistics <= 0.8 %: a few u per GEMM layer. Gradients 0.33-0.59
#   relative error, cosine >= 0.838: the max over neighbours routes each gradient to one edge and
#   rounding swaps near-tied maxima (in float32 a mere 2^-9 relative perturbation of the points
#   already moves the gradients by 12-28 %). Bounds: 0.05 for features, 0.8 / cosine 0.75 for grads.
# * fp16 (u = 2^-11): features <= 0.4 %, gradients 0.08-0.28 (cosine >= 0.96); bounds 0.01 and
#   0.5 / cosine 0.9.
_AMP_TOL = {torch.bfloat16: (0.05, 0.8, 0.75), torch.float16: (0.01, 0.5, 0.9)}


@pytest.mark.parametrize("fast", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dgcnn_under_cpu_autocast_tracks_float32(dtype, fast):
    torch.manual_seed(0)
    model = DGCNN(k=32, fast=fast)
    _randomise_bn(model)
    model32 = DGCNN(k=32, fast=fast)
    model32.load_state_dict(model.state_dict())
    x = _points(0, n=32, b=4)
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    f_lp, gx_lp, gp_lp = _autocast_step(model, x, w, dtype)
    f32, gx32, gp32 = _autocast_step(model32, x, w, None)
    feat_tol, grad_tol, min_cos = _AMP_TOL[dtype]
    assert f_lp["global"].dtype == dtype and gp_lp.dtype == torch.float32
    for i, (a, b) in enumerate(zip(f_lp["blocks"] + [f_lp["point"], f_lp["global"]], f32["blocks"] + [f32["point"], f32["global"]])):
        assert _rel(a, b) < feat_tol, f"feature {i}: {_rel(a, b):.3g}"
    for what, a, b in (("input", gx_lp, gx32), ("parameters", gp_lp, gp32)):
        assert torch.isfinite(a).all() and _rel(a, b) < grad_tol and _cos(a, b) > min_cos, (
            f"{what} grad: rel {_rel(a, b):.3g}, cos {_cos(a, b):.3f}")
    for (name, b32), b_lp in zip(model32.named_buffers(), model.buffers()):  # float32 running stats
        assert b_lp.dtype == b32.dtype
        if "running" in name:
            assert _rel(b_lp, b32) < feat_tol, name


def test_knn_under_autocast_is_the_float32_graph():
    """bf16 distances would change ~5 % of the neighbours; knn computes them in float32."""
    x = torch.randn(2, 64, 200, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = knn(x, 16)
    assert torch.equal(idx, knn(x, 16))


def test_synced_edgeconv_without_process_group_is_local_and_calls_no_collective(monkeypatch):
    import torch.distributed as dist

    from xmodal.models.dgcnn import edgeconv_kind, sync_edgeconv_stats

    ref, fast = _pair(torch.float64)
    assert sync_edgeconv_stats(fast) == 4 and all(m.sync_stats for m in fast.edge_convs)
    assert (edgeconv_kind(fast), edgeconv_kind(ref), edgeconv_kind(nn.Linear(1, 1))) == ("fused", "reference", None)

    def refuse(*args, **kwargs):
        raise AssertionError("a collective was called")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    x = _points(0, torch.float64)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).sum().backward()
    fast(xf).sum().backward()
    _close(xf.grad, xr.grad, 1e-10, "input grad")
    for (name, br), bf in zip(ref.named_buffers(), fast.buffers()):
        _close(bf.double(), br.double(), 1e-10, name)


def test_folded_fixed_statistics_equal_the_general_fused_path():
    """Eval-mode (frozen) BatchNorm: folding BN1 into the per-point terms changes nothing (float64)."""
    from xmodal.models.dgcnn import EdgeConv

    _, fast = _pair(torch.float64)
    fast.eval()
    x = _points(3, torch.float64)
    grads = []
    for fold in (True, False):
        for m in fast.modules():
            if isinstance(m, EdgeConv):
                m.fold_fixed_bn = fold
        xi = x.clone().requires_grad_()
        y = fast(xi)
        y.square().sum().backward()
        grads.append((y.detach(), xi.grad, [p.grad.clone() for p in fast.parameters()]))
        fast.zero_grad()
    (y1, gx1, gp1), (y2, gx2, gp2) = grads
    _close(y1, y2, 1e-12, "output")
    _close(gx1, gx2, 1e-12, "input grad")
    for a, b in zip(gp1, gp2):
        _close(a, b, 1e-10, "param grad")


def _block_scales(model: DGCNN) -> list[float]:
    """Mean |activation| of each EdgeConv block's output, BatchNorm at its initial statistics."""
    model.eval()
    with torch.no_grad():
        blocks = model.forward_features(_points(3, b=4, n=128))["blocks"]
    return [b.abs().mean().item() for b in blocks]


def test_kaiming_init_keeps_the_deep_blocks_at_the_first_blocks_scale():
    torch.manual_seed(0)
    default = _block_scales(DGCNN(k=K))
    torch.manual_seed(0)
    kaiming = _block_scales(DGCNN(k=K, init="kaiming"))
    # the default initialisation shrinks every block's output (with identity BatchNorm nothing
    # rescales it): the last block is orders of magnitude below the first
    assert default[-1] < default[0] / 50
    # He initialisation keeps each layer at its input's scale
    assert kaiming[-1] > kaiming[0] / 4


def test_init_changes_only_the_convolution_weights_and_is_seeded():
    torch.manual_seed(0)
    a = DGCNN(k=K, init="kaiming").state_dict()
    torch.manual_seed(0)
    b = DGCNN(k=K, init="kaiming").state_dict()
    torch.manual_seed(0)
    d = DGCNN(k=K).state_dict()
    assert list(a) == list(d)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
        if ".conv" in key or key.startswith("conv"):
            assert not torch.equal(a[key], d[key]), key
        else:
            torch.testing.assert_close(a[key], d[key])


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init must be one of"):
        DGCNN(k=K, init="xavier")
