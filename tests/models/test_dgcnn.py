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
