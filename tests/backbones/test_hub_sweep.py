"""Bring your own model (issue 23): timm and torchvision architectures of every family behind the
backbone contract. For each: two training steps of SimCLR and DINO (and MAE where the model has
patch tokens) on real images, export in its library's format and as a hub folder, a strict reload
into that library's own model, and features equal to the run's own within 1e-5."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from helpers import cifar_samples, tiny_overrides
from safetensors.torch import load_file

from selfsight.api import load_backbone, pretrain
from selfsight.data import ArrayDataset
from selfsight.deploy import export, read_metadata
from selfsight.deploy.load import Preprocess
from selfsight.resolve import load_config
from selfsight.runs import load_run

# name, view size, images (gray: Fashion-MNIST, 1 channel; rgb: CIFAR PNGs), local crops for DINO
ARCHITECTURES = [
    ("timm:resnet18d", 32, "gray", 2),
    ("timm:convnext_atto", 32, "rgb", 0),
    ("timm:efficientnet_b0", 32, "gray", 0),
    ("timm:regnetx_002", 32, "rgb", 0),
    ("timm:mobilenetv3_small_050", 32, "gray", 0),
    ("timm:vit_tiny_patch16_224", 32, "rgb", 2),               # a small ViT (class token)
    ("timm:vit_small_patch14_reg4_dinov2", 28, "gray", 0),     # register tokens, 14 px patches
    ("timm:swin_tiny_patch4_window7_224", 32, "rgb", 0),       # hierarchical, NHWC maps
    ("torchvision:resnet18", 32, "rgb", 2),
    ("torchvision:mobilenet_v3_small", 32, "gray", 0),
    ("torchvision:efficientnet_b0", 32, "rgb", 0),
]
SMALL_DINO = {"method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16}


@pytest.fixture(scope="module")
def images(fmnist):
    return {"gray": ArrayDataset(fmnist.images[:64].clone(), fmnist.labels[:64].clone(), name="fmnist-64"),
            "rgb": cifar_samples()}


def hub_overrides(name: str, size: int, **extra) -> list[str]:
    """``tiny_overrides`` for a model from timm or torchvision: their own architecture, so no width
    or stem of selfsight's ResNets; batch 8, two steps."""
    base = tiny_overrides(**{"backbone.name": name, "views.size": size, "data.batch_size": 8, "train.steps": 2,
                             **extra})
    return [o for o in base if not o.startswith(("backbone.width", "backbone.small_stem"))]


def library_model(meta: dict, path) -> torch.nn.Module:
    """The exported file loaded, strict, into its library's own model of the same name."""
    if "timm" in meta:
        net = timm.create_model(meta["timm"]["name"], pretrained=False, **meta["timm"]["kwargs"])
    else:
        spec = meta["torchvision"]
        net = torchvision.models.get_model(spec["name"], weights=None, num_classes=spec["num_classes"])
        if spec["in_chans"] != 3:              # gray: the first convolution rebuilt as the metadata says
            from selfsight.deploy import torchvision_model
            net = torchvision_model(meta)
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval()


@pytest.mark.parametrize("name,size,kind,local", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_trains_exports_and_reloads(name, size, kind, local, images, tmp_path):
    data = images[kind]
    vit = name.startswith("timm:vit")
    methods = {"simclr": {}, "dino": {**SMALL_DINO, "views.local_crops": local, "views.local_size": 16}}
    if vit:
        methods["mae"] = {"optim.name": "adamw"}
    for method, extra in methods.items():
        torch.manual_seed(0)
        result = pretrain(load_config(overrides=hub_overrides(name, size, **{"method.name": method, **extra})),
                          tmp_path / method, dataset=data)
        assert result["steps"] == 2 and result["nonfinite_steps"] == 0, method
    run = tmp_path / "simclr"
    model, cfg, pre = load_run(run)
    backbone = model.backbone
    x = Preprocess(pre["size"], pre["mean"], pre["std"], pre["channels"])(data.images[:4])
    with torch.no_grad():
        own = backbone.forward_features(x)
    assert own.cls.shape == (4, backbone.embed_dim)
    assert own.patch is not None and own.patch.shape[0] == 4 and own.patch.shape[2] > 0

    fmt = "torchvision" if name.startswith("torchvision:") else "timm"
    file = tmp_path / f"{fmt}.safetensors"
    export(run, file, fmt)
    with torch.no_grad():
        theirs = library_model(read_metadata(file), file)(x)
    torch.testing.assert_close(theirs, own.cls, atol=1e-5, rtol=0)

    hub = tmp_path / "hub"
    export(run, hub, "hf")
    assert {"config.json", "model.safetensors", "selfsight.json"} <= {p.name for p in hub.iterdir()}
    net, preprocess = load_backbone(hub)
    assert (preprocess.size, preprocess.channels) == (pre["size"], pre["channels"])
    with torch.no_grad():
        torch.testing.assert_close(net(x), own.cls, atol=1e-5, rtol=0)
        if fmt == "timm":                      # timm's own hub route, no selfsight code in between
            local_dir = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
            torch.testing.assert_close(local_dir(x), own.cls, atol=1e-5, rtol=0)
