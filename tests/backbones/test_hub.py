"""timm and torchvision models behind the backbone contract (issue 23): which tokens are patch
tokens, the pooled feature, input channels, names, settings that do not apply, sizes a model
cannot take, library weights offline, and modules given from Python."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from helpers import tiny_overrides

from selfsight.api import load_backbone, pretrain
from selfsight.backbones import build_backbone
from selfsight.backbones.features import backbone_features
from selfsight.backbones.hub import TorchvisionBackbone, adapt_first_conv, build_timm, total_stride
from selfsight.config import ConfigError
from selfsight.data import ArrayDataset
from selfsight.resolve import load_config
from selfsight.runs import custom_backbone, load_run


def hub_config(name: str, **extra):
    base = tiny_overrides(**{"backbone.name": name, "views.size": 32, "data.batch_size": 8, "train.steps": 1,
                             **extra})
    return load_config(overrides=[o for o in base if not o.startswith(("backbone.width", "backbone.small_stem"))])


@pytest.fixture(scope="module")
def gray(fmnist):
    """Real gray images, normalized, at 28 px."""
    return (fmnist.images[:4].float() / 255 - 0.5) / 0.5


@pytest.fixture(scope="module")
def data(fmnist):
    return ArrayDataset(fmnist.images[:64].clone(), fmnist.labels[:64].clone(), name="fmnist-64")


def test_register_tokens_are_never_patch_tokens(gray):
    net = build_timm("vit_small_patch14_reg4_dinov2", 1, 28).eval()
    with torch.no_grad():
        f = net.forward_features(gray)
        tokens = net.net.forward_features(gray)                   # timm's own: class, 4 registers, 2×2 patches
        pooled = net.net.forward_head(tokens, pre_logits=True)
    assert net.net.num_prefix_tokens == 5 and f.patch.shape == (4, 4, 384)
    torch.testing.assert_close(f.patch, tokens[:, 5:], atol=1e-5, rtol=0)
    torch.testing.assert_close(f.cls, pooled, atol=1e-5, rtol=0)


def test_average_pooled_vit_without_class_token(gray):
    net = build_timm("vit_dwee_patch16_reg1_gap_256", 1, 32).eval()
    x = torch.nn.functional.interpolate(gray, size=32, mode="bilinear")
    with torch.no_grad():
        f = net.forward_features(x)
        theirs = net.net(x)                                       # timm: the mean of the patch tokens
    assert net.net.cls_token is None and f.patch.shape == (4, 4, 256)
    torch.testing.assert_close(f.cls, theirs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="has no class token"):
        backbone_features(net, "last4")


@pytest.mark.parametrize("name,grid", [("convnext_atto", 1), ("swin_tiny_patch4_window7_224", 1),
                                       ("resnet18d", 2)])
def test_hierarchical_models_give_their_last_map_as_tokens(name, grid, gray):
    """NCHW maps (ConvNeXt, ResNet) and NHWC ones (Swin) alike: B×(h·w)×C tokens."""
    size = 64 if grid == 2 else 32
    net = build_timm(name, 1, size).eval()
    x = torch.nn.functional.interpolate(gray, size=size, mode="bilinear")
    with torch.no_grad():
        f = net.forward_features(x)
        theirs = net.net(x)
    assert f.patch.shape == (4, grid * grid, net.embed_dim)
    torch.testing.assert_close(f.cls, theirs, atol=1e-5, rtol=0)
    if name == "resnet18d":                                       # plain average pooling of that map
        torch.testing.assert_close(f.patch.mean(1), f.cls, atol=1e-5, rtol=0)


def test_torchvision_model_without_its_classifier(gray):
    net = TorchvisionBackbone("resnet18", in_chans=1, image_size=64).eval()
    x = torch.nn.functional.interpolate(gray, size=64, mode="bilinear")
    with torch.no_grad():
        f = net.forward_features(x)
    assert net.head_name == "fc" and f.cls.shape == (4, 512) and f.patch.shape == (4, 4, 512)
    torch.testing.assert_close(f.patch.mean(1), f.cls, atol=1e-5, rtol=0)
    assert total_stride(net, 64, 1) == 32 and total_stride(build_timm("resnet18d", 1, 64), 64, 1) == 32


def test_gray_stem_of_a_torchvision_model_sums_the_rgb_one(gray):
    """A 3-channel first convolution rebuilt for 1 channel (timm's adapt_input_conv): a gray image
    gives what the RGB model gives that image on all three channels."""
    torch.manual_seed(0)
    rgb = torchvision.models.mobilenet_v3_small().eval()
    one = torchvision.models.mobilenet_v3_small().eval()
    one.load_state_dict(rgb.state_dict())
    adapt_first_conv(one, 1)
    assert one.features[0][0].in_channels == 1
    with torch.no_grad():
        torch.testing.assert_close(one(gray), rgb(gray.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,hint", [("timm:resnet18x", "timm:resnet18"),
                                       ("torchvision:mobilenet_v3_smal", "torchvision:mobilenet_v3_small")])
def test_unknown_model_names_suggest(name, hint):
    with pytest.raises(ConfigError, match=f"did you mean {hint}") as e:
        hub_config(name)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("extra,words", [
    ({"backbone.patch_size": 8}, "backbone.patch_size' applies to selfsight's own"),
    ({"backbone.width": 32}, "backbone.width' applies to selfsight's own"),
    ({"backbone.name": "torchvision:resnet18", "backbone.drop_path": 0.1}, "and timm models"),
    ({"backbone.name": "torchvision:resnet18", "backbone.pretrained_file": "w.pth"}, "backbone.weights=FILE"),
    ({"backbone.name": "resnet18", "backbone.pretrained": True}, "has no library weights"),
    ({"method.name": "mae", "backbone.name": "timm:convnext_atto"}, "timm VisionTransformer"),
])
def test_settings_that_do_not_apply_are_refused(extra, words):
    overrides = [f"{k}={v}" for k, v in {"backbone.name": "timm:vit_tiny_patch16_224", **extra}.items()]
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_config(overrides=overrides)


def test_the_method_recipe_keys_do_not_count_as_the_users():
    """MAE's recipe sets the built-in ViT's sin-cos table; a timm ViT keeps its own and is not refused."""
    assert load_config(overrides=["method.name=mae", "backbone.name=timm:vit_tiny_patch16_224"]).method.name == "mae"


def test_view_sizes_a_model_cannot_take_are_refused_before_training(data, tmp_path):
    cfg = hub_config("timm:convnext_atto", **{"method.name": "dino", "method.out_dim": 64, "method.hidden_dim": 32,
                                              "method.bottleneck_dim": 16, "views.local_crops": 2,
                                              "views.local_size": 16})
    with pytest.raises(ValueError, match=r"cannot take 16 px views \(views.local_size=16\).*views.local_crops=0"):
        pretrain(cfg, tmp_path / "r", dataset=data)
    cfg = hub_config("timm:vit_small_patch14_reg4_dinov2", **{"method.name": "mae"})
    with pytest.raises(ValueError, match="not divisible into 14-pixel patches"):
        pretrain(cfg, tmp_path / "r", dataset=data)
    assert not (tmp_path / "r").exists()


def test_a_small_view_for_the_stride_warns_once(data, tmp_path, caplog):
    pretrain(hub_config("timm:resnet18d"), tmp_path / "r", dataset=data)
    lines = [r.message for r in caplog.records if "total stride" in r.message]
    assert len(lines) == 1 and "32 px views are less than twice the total stride 32" in lines[0]


def test_library_weights_offline_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained") or kwargs.get("weights"):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(*args, **kwargs)
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ValueError) as e:
        build_backbone(hub_config("timm:resnet18d").backbone, 3, 32, pretrained=True)
    assert "\n" not in str(e.value) and "backbone.weights=FILE" in str(e.value)
    monkeypatch.setattr(torchvision.models, "get_model", lambda *a, **k: (_ for _ in ()).throw(
        OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")))
    with pytest.raises(ValueError, match="could not download the weights of resnet18.*resnet18-f37072fd.pth.*weights"):
        build_backbone(hub_config("torchvision:resnet18").backbone, 3, 32, pretrained=True)


def test_timm_local_file_route(tmp_path):
    """backbone.pretrained_file: timm's own loading of a local file (pretrained_cfg_overlay)."""
    torch.manual_seed(1)
    source = timm.create_model("resnet18d", num_classes=0)
    torch.save(source.state_dict(), tmp_path / "resnet18d.pth")
    cfg = hub_config("timm:resnet18d", **{"backbone.pretrained_file": str(tmp_path / "resnet18d.pth")})
    net = build_backbone(cfg.backbone, 3, 32, pretrained=True)
    torch.testing.assert_close(net.net.layer3[0].conv1.weight, source.layer3[0].conv1.weight)


MODULE = '''
import torch.nn as nn


class TinyNet(nn.Module):
    def __init__(self, in_chans=1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())

    def forward(self, x):
        return self.body(x)                     # B×16×h×w: pooled by selfsight


def make(in_chans, image_size):
    return TinyNet(in_chans)
'''


def test_modules_from_python(data, tmp_path, monkeypatch):
    """A module given to pretrain() is recorded as custom:...; the CLI refuses to rebuild it in one
    line naming the API call, which loads it. A factory (python:module:factory) is rebuilt by the CLI."""
    (tmp_path / "tinynets.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tinynets
    cfg = hub_config("resnet18")
    pretrain(cfg, tmp_path / "custom", dataset=data, backbone=tinynets.TinyNet())
    assert "name: custom:tinynets.TinyNet" in (tmp_path / "custom" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"load_backbone\(RUN, backbone=MyNet\(\)\)") as e:
        load_backbone(tmp_path / "custom")
    assert "\n" not in str(e.value)
    net, pre = load_backbone(tmp_path / "custom", backbone=tinynets.TinyNet())
    assert net(pre(data.images[:2])).shape == (2, 16)
    with custom_backbone(tinynets.TinyNet()):           # what selfsight.evaluate(RUN, backbone=...) uses
        model, _, _ = load_run(tmp_path / "custom")
    torch.testing.assert_close(model.backbone.state_dict(), net.state_dict())

    pretrain(hub_config("python:tinynets:make"), tmp_path / "factory", dataset=data)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "selfsight", "export", str(tmp_path / "factory"), "--out",
                        str(tmp_path / "f.safetensors")], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "selfsight", "export", str(tmp_path / "custom"), "--out",
                        str(tmp_path / "c.safetensors")], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "python:package.module:factory" in p.stderr
