"""docs/dense.md's routes into a detector, run as the guide writes them (``examples/detection.py``):
a torchvision export as the body of a Faster R-CNN with an FPN, whose loss falls on the scenes'
boxes; a timm ViT export's ``forward_intermediates`` map equal to selfsight's own token grid; a timm
ConvNet export read by ``features_only``."""
import importlib.util
from pathlib import Path

import pytest
import torch

from selfsight.data.builtin import FASHION_CLASSES
from selfsight.data.scenes import make_scenes

EXAMPLE = Path(__file__).parents[2] / "examples" / "detection.py"


@pytest.fixture(scope="module")
def guide():
    spec = importlib.util.spec_from_file_location("detection_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_run(tmp_path, fmnist_small, **extra):
    from helpers import tiny_overrides

    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    out = tmp_path / "run"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 2, **extra})), out, dataset=fmnist_small)
    return out


@pytest.mark.slow
def test_faster_rcnn_from_a_torchvision_export_learns_the_scenes_boxes(tmp_path, fmnist_small, guide):
    import selfsight
    run = tiny_run(tmp_path, fmnist_small, **{"backbone.width": 16})
    file = tmp_path / "tv.safetensors"
    selfsight.export(run, file, format="torchvision")
    scenes = make_scenes(fmnist_small.images, fmnist_small.labels, 200, seed=0, class_names=FASHION_CLASSES)
    torch.manual_seed(0)
    model = guide.resnet_fpn_detector(str(file), len(scenes.classes), scenes.image_size)
    assert sum(p.numel() for p in model.backbone.body.parameters()) > 0
    assert not hasattr(model.backbone.body, "fc") and not hasattr(model.backbone.body, "avgpool")
    losses = guide.train(model, scenes, steps=20, batch_size=4)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses


def test_a_timm_vit_export_gives_selfsight_s_token_grid(tmp_path, fmnist_small, guide):
    import selfsight
    from selfsight.eval.dense import token_map
    from selfsight.runs import load_run
    run = tiny_run(tmp_path, fmnist_small, **{"backbone.name": "vit_tiny", "backbone.patch_size": 4,
                                              "backbone.depth": 1})
    file = tmp_path / "vit.safetensors"
    selfsight.export(run, file, format="timm")
    pyramid = guide.vit_pyramid(str(file)).eval()
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        (tokens,) = pyramid.vit.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        ours = token_map(load_run(run)[0].backbone)(x)
        maps = pyramid(x)
    assert torch.allclose(tokens.permute(0, 2, 3, 1), ours, atol=1e-5)
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(28, 28), (14, 14), (7, 7)]


def test_a_timm_convnet_export_reads_as_features_only(tmp_path, fmnist_small):
    import timm
    from safetensors.torch import load_file

    import selfsight
    from selfsight.deploy import read_metadata
    run = tiny_run(tmp_path, fmnist_small, **{"backbone.name": "timm:resnet10t", "backbone.small_stem": "auto",
                                              "backbone.width": 64})
    file = tmp_path / "cnn.safetensors"
    selfsight.export(run, file, format="timm")
    meta = read_metadata(file)
    net = timm.create_model(meta["timm"]["name"], features_only=True, out_indices=(1, 2, 3), pretrained=True,
                            pretrained_cfg_overlay={"file": str(file)}, **meta["timm"]["kwargs"])
    maps = net(torch.randn(2, 1, 64, 64))
    assert [m.shape[1] for m in maps] == net.feature_info.channels()
    assert [m.shape[-1] for m in maps] == [16, 8, 4]
    full = timm.create_model(meta["timm"]["name"], pretrained=False, **meta["timm"]["kwargs"])
    full.load_state_dict(load_file(file), strict=True)
    assert torch.equal(net.layer1[0].conv1.weight, full.layer1[0].conv1.weight)
