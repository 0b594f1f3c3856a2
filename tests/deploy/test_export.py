"""Exported ResNets load with strict=True into torchvision (and selfsight) and give the same features
as the run's own evaluation backbone on real Fashion-MNIST images; metadata round-trips; ONNX.
(ViTs and timm: test_export_vit.py.)"""
import json

import pytest
import torch
import torchvision
from helpers import normalized, tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_file

from selfsight import api
from selfsight.data import ArrayDataset
from selfsight.deploy import export, load_backbone, read_metadata, torchvision_model
from selfsight.engine.trainer import pretrain
from selfsight.resolve import load_config
from selfsight.runs import load_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_small):
    """One-step runs: the tests' resnet10 (width 8, s2 stem, gray) and a stock torchvision resnet18
    (width 64, ImageNet stem) on the same real images as 3-channel input."""
    root = tmp_path_factory.mktemp("runs")
    rgb = ArrayDataset(fmnist_small.images[:256].repeat(1, 3, 1, 1).clone(), fmnist_small.labels[:256].clone())
    for name, extra, data in (("resnet", {}, fmnist_small),
                              ("resnet18", {"backbone.name": "resnet18", "backbone.width": 64,
                                            "backbone.small_stem": "none"}, rgb)):
        pretrain(load_config(None, tiny_overrides(**{"train.steps": 1, "data.batch_size": 16, **extra})), root / name,
                 dataset=data)
    return root


def inputs(fmnist_test, channels=1, n=64):
    x = normalized(ArrayDataset(fmnist_test.images[:n].clone()))         # real test images, B×1×28×28
    return x.repeat(1, channels, 1, 1)


def reference(run, x):
    model, _, _ = load_run(run)
    with torch.no_grad():
        return model.backbone.forward_features(x).cls


def test_torchvision_stock_resnet18_loads_strict(runs, tmp_path, fmnist_test):
    out = tmp_path / "r18.safetensors"
    meta = export(runs / "resnet18", out, "torchvision")
    assert meta["torchvision"]["stock"]
    assert meta["torchvision"]["build"] == "torchvision.models.resnet18(num_classes=512)"
    net = torchvision.models.resnet18(num_classes=512).eval()          # the stock constructor, fc = D×D identity
    net.load_state_dict(load_file(out), strict=True)
    x = inputs(fmnist_test, 3)
    with torch.no_grad():
        got = net(x)
    ref = reference(runs / "resnet18", x)
    assert (got - ref).abs().max() <= 1e-5
    assert ref.std(0).mean() > 1e-3                                     # not a constant output
    # the file holds the backbone only: nothing of the projector
    assert not any(k.startswith(("projector", "student", "net.")) for k in load_file(out))


def test_torchvision_small_resnet_loads_strict_through_helper(runs, tmp_path, fmnist_test):
    out = tmp_path / "r10.safetensors"
    meta = export(runs / "resnet", out, "torchvision")
    spec = meta["torchvision"]
    assert not spec["stock"] and "Conv2d(1, 8, 3, stride=2" in spec["build"] and "maxpool = Identity()" in spec["build"]
    net = torchvision_model(read_metadata(out)).eval()
    assert type(net) is torchvision.models.ResNet
    net.load_state_dict(load_file(out), strict=True)
    x = inputs(fmnist_test)
    with torch.no_grad():
        assert (net(x) - reference(runs / "resnet", x)).abs().max() <= 1e-5
    with pytest.raises(RuntimeError):                                   # the stock model does not fit
        torchvision.models.resnet18(num_classes=64).load_state_dict(load_file(out), strict=True)


def test_safetensors_metadata_round_trips_and_load_backbone(runs, tmp_path, fmnist_test, run="resnet"):
    out = tmp_path / f"{run}.safetensors"
    meta = export(runs / run, out, "safetensors")
    with safe_open(str(out), "pt") as f:
        raw = f.metadata()
    assert all(isinstance(v, str) for v in raw.values())                # string -> string header
    assert raw["method"] == "simclr" and json.loads(raw["mean"]) == [0.5] and json.loads(raw["image_size"]) == 28
    back = read_metadata(out)
    assert back == json.loads(json.dumps(meta))
    _, cfg, pre = load_run(runs / run)
    assert back["config"]["backbone"]["name"] == cfg.backbone.name and back["channels"] == pre["channels"]
    assert back["selfsight"] == __import__("selfsight").__version__
    # load_backbone: exported file and run folder agree, and preprocess turns real PIL images into the input
    x = inputs(fmnist_test, n=16)
    ref = reference(runs / run, x)
    for src in (out, runs / run, runs / run / "checkpoint.pt"):
        net, preprocess = load_backbone(src)
        assert not net.training
        from PIL import Image
        pil = [Image.fromarray(im[0].numpy()) for im in fmnist_test.images[:16]]
        xp = torch.stack([preprocess(im) for im in pil])
        assert torch.equal(xp, x)
        with torch.no_grad():
            assert (net(xp) - ref).abs().max() <= 1e-5


def test_preprocess_resizes_like_evaluation_and_matches_channels(runs, fmnist_test):
    from selfsight.nn.images import eval_resize as _resize
    _, pre = load_backbone(runs / "resnet")
    img = fmnist_test.images[:4]                                        # uint8 B×1×28×28
    big = torch.nn.functional.interpolate(img.float(), size=(96, 80), mode="nearest").to(torch.uint8)
    want = (_resize(big.float() / 255, 28) - 0.5) / 0.5
    assert torch.equal(pre(big), want) and pre(big[0]).shape == (1, 28, 28)
    assert torch.equal(pre(big.repeat(1, 3, 1, 1)), want)               # equal RGB channels -> the same gray
    _, pre3 = load_backbone(runs / "resnet18")
    assert pre3(img).shape == (4, 3, 28, 28)


def test_refusals(runs, tmp_path):
    with pytest.raises(ValueError, match="use --format torchvision"):
        export(runs / "resnet", tmp_path / "a.safetensors", "timm")
    with pytest.raises(ValueError, match="--format must be one of"):
        export(runs / "resnet", tmp_path / "a.safetensors", "pickle")
    assert not (tmp_path / "a.safetensors").exists()
    # a safetensors file not written by selfsight is refused with one line
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="without selfsight metadata"):
        load_backbone(tmp_path / "other.safetensors")


def test_cli_export(runs, tmp_path, capsys):
    from selfsight.cli import main
    assert main(["export", str(runs / "resnet"), "--out", str(tmp_path / "c.safetensors"), "--format",
                 "torchvision", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["feature_dim"] == 64 and res["format"] == "torchvision" and "config" not in res
    assert main(["export", str(runs / "resnet"), "--out", str(tmp_path / "d.safetensors"), "--format", "timm"]) == 2
    assert "selfsight: error: --format timm holds timm models" in capsys.readouterr().err
    assert api.export is not None and callable(__import__("selfsight").export)


def test_onnx_matches_torch(runs, tmp_path, fmnist_test):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "r.onnx"
    meta = export(runs / "resnet", out, "onnx")
    assert read_metadata(out) == json.loads(json.dumps(meta))             # the sidecar
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = inputs(fmnist_test, n=7)
    ref = reference(runs / "resnet", x)
    for n in (7, 3):                                                    # dynamic batch
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x[:n].numpy()})[0])
        assert got.shape == (n, 64) and (got - ref[:n]).abs().max() <= 1e-4


def test_hub_folder_of_a_resnet(runs, tmp_path, fmnist_test):
    """--format hf of a built-in ResNet: the hub layout with torchvision's state, read by load_backbone."""
    out = tmp_path / "hub"
    export(runs / "resnet", out, "hf")
    assert json.loads((out / "config.json").read_text())["library"] == "torchvision"
    net, pre = load_backbone(out)
    x = inputs(fmnist_test)
    with torch.no_grad():
        assert (net(pre(fmnist_test.images[:64])) - reference(runs / "resnet", x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="writes a folder"):
        export(runs / "resnet", tmp_path / "hub.safetensors", "hf")
