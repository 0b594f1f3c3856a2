"""Backbones behind one contract, on real images."""
import pytest
import torch
import torchvision

from selfsight.backbones import Features, build_backbone, wrap
from selfsight.backbones.resnet import ResNetBackbone
from selfsight.backbones.vit import ViTBackbone
from selfsight.config import BackboneConfig


@pytest.mark.parametrize("name,stem,width,dim", [("resnet18", "none", 64, 512), ("resnet18", "cifar", 64, 512),
                                                 ("resnet10", "s2", 16, 128), ("resnet50", "none", 64, 2048)])
def test_resnets_give_pooled_and_patch_features(name, stem, width, dim, fmnist_small):
    net = build_backbone(BackboneConfig(name=name, small_stem=stem, width=width), in_chans=1, image_size=32)
    x = fmnist_small.images[:2].float() / 255
    f = net.forward_features(torch.nn.functional.interpolate(x, size=32))
    assert isinstance(f, Features) and net.embed_dim == dim and f.cls.shape == (2, dim)
    assert f.patch.shape[0] == 2 and f.patch.shape[2] == dim
    torch.testing.assert_close(f.patch.mean(1), f.cls)
    with pytest.raises(ValueError, match="mask"):
        net.forward_features(x, mask=torch.zeros(2, 4, dtype=torch.bool))


def test_width_64_resnet_is_torchvision_resnet():
    ours = ResNetBackbone("resnet18", in_chans=3).net
    ref = torchvision.models.resnet18()
    ref.fc = torch.nn.Identity()
    assert ref.load_state_dict(ours.state_dict(), strict=True)


def test_vit_masks_token_and_drop():
    x = torch.randn(2, 1, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::2] = True
    dense = ViTBackbone("vit_tiny", 32, 4, 1, mask_mode="token")
    f = dense.forward_features(x, mask)
    assert f.cls.shape == (2, 192) and f.patch.shape == (2, 64, 192)
    assert not torch.allclose(f.patch, dense.forward_features(x).patch)
    sparse = ViTBackbone("vit_tiny", 32, 4, 1, mask_mode="drop")
    assert sparse.forward_features(x, mask).patch.shape == (2, 32, 192)
    bad = mask.clone()
    bad[0, 1] = True
    with pytest.raises(ValueError, match="same number"):
        sparse.forward_features(x, bad)
    with pytest.raises(ValueError, match="mask_mode"):
        ViTBackbone("vit_tiny", 32, 4, 1).forward_features(x, mask)
    assert ViTBackbone("vit_tiny", 32, 4, 1).forward_features(torch.randn(1, 1, 48, 48)).patch.shape == (1, 144, 192)


def test_any_module_can_be_wrapped():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 7, 3), torch.nn.ReLU())
    w = wrap(conv)
    assert w.embed_dim == 7 and w.forward_features(torch.randn(2, 3, 16, 16)).patch.shape == (2, 196, 7)
    flat = wrap(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)), in_chans=3, probe_size=8)
    assert flat.forward_features(torch.randn(2, 3, 8, 8)).cls.shape == (2, 5)
    r = ResNetBackbone("resnet10", 1, "s2")
    assert wrap(r) is r
