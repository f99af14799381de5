"""Tests of the heads (PairClassifier) and the encoder registry."""

import pytest
import torch

from xmodal.models.dgcnn import DGCNN
from xmodal.models.heads import PairClassifier
from xmodal.models.registry import (
    IMAGE_ENCODERS,
    POINT_ENCODERS,
    create_image_encoder,
    create_point_encoder,
    list_image_encoders,
)
from xmodal.models.resnet import ResNet


def test_pair_classifier_shapes_and_layers():
    torch.manual_seed(0)
    ff = PairClassifier()
    assert ff.fc1.in_features == 1024 and ff.fc1.out_features == 256 and ff.fc2.out_features == 2
    logits = ff(torch.randn(5, 512), torch.randn(5, 512))
    assert logits.shape == (5, 2)
    # the image feature matters (it is concatenated, not ignored)
    assert not torch.allclose(ff(torch.zeros(1, 512), torch.ones(1, 512)), ff(torch.ones(1, 512), torch.ones(1, 512)))


def test_pair_classifier_rejects_bad_shapes():
    ff = PairClassifier(img_dim=8, pts_dim=4, hidden=3)
    assert ff(torch.randn(2, 8), torch.randn(2, 4)).shape == (2, 2)
    with pytest.raises(ValueError, match="f_img"):
        ff(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="batch sizes"):
        ff(torch.randn(2, 8), torch.randn(3, 4))


def test_registry_builds_encoders_with_out_dim():
    assert "resnet18" in list_image_encoders() and set(POINT_ENCODERS) >= {"dgcnn", "dgcnn_reference"}
    img = create_image_encoder()
    assert isinstance(img, ResNet) and img.out_dim == 512
    assert IMAGE_ENCODERS["resnet18"] is not None
    pts = create_point_encoder("dgcnn", k=4)
    ref = create_point_encoder("dgcnn_reference", k=4)
    assert isinstance(pts, DGCNN) and pts.fast and not ref.fast and pts.out_dim == ref.out_dim == 512
    ref.load_state_dict(pts.state_dict())
    assert pts(torch.randn(2, 16, 3)).shape == (2, 512)


def test_unknown_names_list_the_available_ones():
    with pytest.raises(ValueError, match="resnet18"):
        create_image_encoder("resnet1000")
    with pytest.raises(ValueError, match="dgcnn"):
        create_point_encoder("pointnet")


def _usable(mod):
    try:
        __import__(mod)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("name,module", [("torchvision:resnet18", "torchvision"), ("timm:resnet18", "timm")])
def test_plugin_path_names_the_extra_when_unusable(name, module):
    if _usable(module):
        enc = create_image_encoder(name)
        assert enc(torch.randn(2, 1, 64, 64)).shape == (2, enc.out_dim)
    else:
        with pytest.raises(ImportError, match=r"xmodal\[vision\]"):
            create_image_encoder(name)
