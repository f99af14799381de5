"""Tests of our ResNet18 (xmodal.models.resnet)."""

import pytest
import torch

from xmodal.models.resnet import BasicBlock, resnet18


def test_param_count_matches_torchvision_resnet18_without_fc():
    model = resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_176_512
    assert model.out_dim == 512


def test_output_shape_and_stage_maps():
    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    feat, maps = model.forward_features(x, return_stages=True)
    assert feat.shape == (2, 512)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    # global average pool of the last stage map
    torch.testing.assert_close(feat, maps[-1].mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), feat)


def test_grayscale_input_is_repeated_to_three_channels():
    torch.manual_seed(0)
    model = resnet18().eval()
    g = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model(g), model(g.repeat(1, 3, 1, 1)))


def test_in_channels_one_and_bad_channels():
    model = resnet18(in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="input channels"):
        resnet18()(torch.randn(1, 2, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        resnet18()(torch.randn(3, 32, 32))


def test_init_like_torchvision_and_zero_init_residual():
    torch.manual_seed(0)
    model = resnet18()
    bns = [m.bn2 for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(bns) == 8 and all(torch.all(b.weight == 1) for b in bns)
    # Kaiming normal, fan_out, relu: std = sqrt(2 / (out_ch * k * k))
    w = model.layer4[0].conv2.weight
    assert abs(w.std().item() - (2.0 / (512 * 9)) ** 0.5) < 0.05 * (2.0 / (512 * 9)) ** 0.5
    z = resnet18(zero_init_residual=True)
    assert all(torch.all(m.bn2.weight == 0) for m in z.modules() if isinstance(m, BasicBlock))


def test_state_dict_keys_follow_torchvision_names():
    keys = set(resnet18().state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
              "layer2.0.downsample.1.weight", "layer4.1.bn2.num_batches_tracked"):
        assert k in keys
    assert not any(k.startswith("fc.") for k in keys)


def test_backward_reaches_stem():
    model = resnet18()
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
