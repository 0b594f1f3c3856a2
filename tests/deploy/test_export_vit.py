"""Exported ViTs load with strict=True into ``timm.create_model(name, pretrained=False, **kwargs)``
and into selfsight, and give the same features as the run's own backbone on real images."""
import json

import pytest
import timm
import torch
from helpers import normalized, tiny_overrides
from safetensors.torch import load_file

from selfsight.backbones.vit import ViTBackbone
from selfsight.data import ArrayDataset
from selfsight.deploy import export, export_backbone, load_backbone, read_metadata, timm_model
from selfsight.deploy.backbone import metadata
from selfsight.engine.trainer import pretrain
from selfsight.resolve import load_config
from selfsight.runs import load_run

VIT = {"backbone.name": "vit_tiny", "backbone.depth": 2, "backbone.patch_size": 7}
PRE = {"size": 28, "mean": [0.5], "std": [0.5], "channels": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory, fmnist_small):
    """A one-step SimCLR run of a 2-block ViT-Tiny with 7-px patches on 28 px gray images."""
    out = tmp_path_factory.mktemp("runs") / "vit"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 1, "data.batch_size": 16, **VIT})), out,
             dataset=fmnist_small)
    return out


def inputs(fmnist_test, n=64):
    return normalized(ArrayDataset(fmnist_test.images[:n].clone()))    # real test images, B×1×28×28


def test_timm_vit_loads_strict(run, tmp_path, fmnist_test):
    out = tmp_path / "vit.safetensors"
    meta = export(run, out, "timm")
    spec = read_metadata(out)["timm"]
    assert spec == json.loads(json.dumps(meta["timm"]))
    assert spec["kwargs"]["num_classes"] == 0 and spec["kwargs"]["patch_size"] == 7 and spec["kwargs"]["depth"] == 2
    net = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"]).eval()
    net.load_state_dict(load_file(out), strict=True)
    x = inputs(fmnist_test)
    model, _, _ = load_run(run)
    with torch.no_grad():
        got, ref = net(x), model.backbone.forward_features(x).cls
    assert got.shape == (64, 192) and (got - ref).abs().max() <= 1e-5
    assert ref.std(0).mean() > 1e-3                                     # not a constant output
    # the native export and the run folder load through load_backbone to the same features
    export(run, tmp_path / "own.safetensors")
    for src in (tmp_path / "own.safetensors", out, run):
        net, pre = load_backbone(src)
        with torch.no_grad():
            assert (net(pre(fmnist_test.images[:64])) - ref).abs().max() <= 1e-5


def test_vit_with_mask_token_and_layer_scale(tmp_path, fmnist_test):
    """A BEiT-style ViT (mask token, LayerScale, sin-cos table): the timm file has no mask token and
    sets init_values; the safetensors export keeps the mask token and load_backbone restores it."""
    cfg = load_config(None, [f"{k}={v}" for k, v in {**VIT, "backbone.layer_scale": 0.1, "views.size": 28}.items()])
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", 28, 7, 1, depth=2, layer_scale=0.1, pos_embed="sincos", mask_mode="token").eval()
    with torch.no_grad():
        vit.net.blocks[0].ls1.gamma.mul_(3.0)                          # trained-looking gammas, not the init value
    x = inputs(fmnist_test, 8)
    with torch.no_grad():
        ref = vit.forward_features(x).cls
    meta = export_backbone(vit, metadata(vit, cfg, PRE, "timm"), tmp_path / "t.safetensors", "timm")
    assert meta["timm"]["kwargs"]["init_values"] == 0.1 and "mask_token" not in load_file(tmp_path / "t.safetensors")
    net = timm_model(meta).eval()
    net.load_state_dict(load_file(tmp_path / "t.safetensors"), strict=True)
    with torch.no_grad():
        assert (net(x) - ref).abs().max() <= 1e-5
    export_backbone(vit, metadata(vit, cfg, PRE, "safetensors"), tmp_path / "s.safetensors")
    own, _ = load_backbone(tmp_path / "s.safetensors")
    assert torch.equal(own.mask_token, vit.mask_token)
    with torch.no_grad():
        assert (own(x) - ref).abs().max() <= 1e-6


def test_vit_refusals(run, tmp_path):
    with pytest.raises(ValueError, match="use --format timm"):
        export(run, tmp_path / "a.safetensors", "torchvision")
    cfg = load_config(None, [f"{k}={v}" for k, v in VIT.items()] + ["backbone.rel_pos_bias=true"])
    vit = ViTBackbone("vit_tiny", 28, 7, 1, depth=2, rel_pos_bias=True)
    with pytest.raises(ValueError, match="relative position bias"):
        export_backbone(vit, metadata(vit, cfg, PRE, "timm"), tmp_path / "b.safetensors", "timm")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()
    # the BEiT ViT still exports natively and comes back with its relative position bias
    meta = export_backbone(vit, metadata(vit, cfg, PRE, "safetensors"), tmp_path / "c.safetensors")
    assert "timm" not in meta
    own, _ = load_backbone(tmp_path / "c.safetensors")
    assert own.rel_pos_bias is not None


def test_hub_folder_of_a_builtin_vit(run, tmp_path, fmnist_test):
    """--format hf: timm's hub layout, loaded by timm's own local-dir route and by load_backbone."""
    export(run, tmp_path / "hub", "hf")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["model_args"]["patch_size"] == 7 and config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert config["pretrained_cfg"]["tag"] == "selfsight" and "hf_hub_id" not in config["pretrained_cfg"]
    x = inputs(fmnist_test)
    model, _, _ = load_run(run)
    net = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    mine, pre = load_backbone(tmp_path / "hub")
    with torch.no_grad():
        ref = model.backbone.forward_features(x).cls
        assert (net(x) - ref).abs().max() <= 1e-5
        assert (mine(pre(fmnist_test.images[:64])) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("extra", [{"backbone.class_token": False}, {"backbone.registers": 2}])
def test_a_vit_without_class_token_or_with_registers_exports_to_timm(tmp_path, fmnist_test, extra):
    """I-JEPA's encoders (no class token: the mean of the final-normed patch tokens) and register
    tokens are part of the timm file's build: it loads strictly and gives the run's features."""
    cfg = load_config(None, [f"{k}={v}" for k, v in {**VIT, **extra, "views.size": 28}.items()])
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", 28, 7, 1, depth=2, class_token=cfg.backbone.class_token,
                      registers=cfg.backbone.registers).eval()
    x = inputs(fmnist_test, 8)
    with torch.no_grad():
        f = vit.forward_features(x)
    if not cfg.backbone.class_token:
        torch.testing.assert_close(f.cls, f.patch.mean(1))
    meta = export_backbone(vit, metadata(vit, cfg, PRE, "timm"), tmp_path / "t.safetensors", "timm")
    net = timm_model(meta).eval()
    net.load_state_dict(load_file(tmp_path / "t.safetensors"), strict=True)
    with torch.no_grad():
        assert (net(x) - f.cls).abs().max() <= 1e-5
