"""Starting weights (``backbone.weights``, issue 23): any source (a selfsight export, a run folder,
a hub folder, a plain state dict under the usual wrappers) starts a new run from exactly its
weights; a file that does not fit is one line naming the first mismatching key; a 3-channel file
starts a gray model as timm adapts a stem; frozen stages and the lr multiplier."""
from __future__ import annotations

import pytest
import timm
import torch
from helpers import tiny_overrides
from safetensors.torch import save_file

from selfsight.api import pretrain
from selfsight.backbones import build_backbone
from selfsight.backbones.weights import freeze, load_starting_weights, match_keys, read_state, sha256, state_sha256
from selfsight.config import ConfigError
from selfsight.data import ArrayDataset
from selfsight.deploy import export
from selfsight.files import safe_load
from selfsight.resolve import load_config
from selfsight.runs import load_run, starting_state

NAME = "timm:resnet18d"


def overrides(**extra) -> list[str]:
    base = tiny_overrides(**{"backbone.name": NAME, "views.size": 32, "data.batch_size": 16, "train.steps": 2,
                             **extra})
    return [o for o in base if not o.startswith(("backbone.width", "backbone.small_stem"))]


@pytest.fixture(scope="module")
def data(fmnist):
    return ArrayDataset(fmnist.images[:128].clone(), fmnist.labels[:128].clone(), name="fmnist-128")


@pytest.fixture(scope="module")
def source(tmp_path_factory, data):
    """A 2-step SimCLR run of timm's resnet18d on gray images, and its exports."""
    d = tmp_path_factory.mktemp("source")
    pretrain(load_config(overrides=overrides()), d / "run", dataset=data)
    export(d / "run", d / "own.safetensors", "safetensors")
    export(d / "run", d / "timm.safetensors", "timm")
    export(d / "run", d / "hub", "hf")
    return d


def features(net, images) -> torch.Tensor:
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        return net.eval().forward_features(torch.nn.functional.interpolate(x, size=32, mode="bilinear")).cls


@pytest.mark.parametrize("kind", ["run", "own.safetensors", "timm.safetensors", "hub", "wrapped.pth"])
def test_every_source_gives_the_source_weights(kind, source, data):
    """The source's evaluation backbone, bit for bit: the state's hash and the features (1e-6)."""
    model, cfg, _ = load_run(source / "run")
    if kind == "wrapped.pth":                 # a DDP-wrapped training checkpoint of another library
        torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in model.backbone.net.state_dict().items()}},
                   source / kind)
    state, origin = starting_state(source / kind)
    net = build_backbone(cfg.backbone, 1, 32)
    report = load_starting_weights(net, state)
    assert report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == []
    assert state_sha256(net.state_dict()) == state_sha256(model.backbone.state_dict())
    torch.testing.assert_close(features(net, data.images[:8]), features(model.backbone, data.images[:8]),
                               atol=1e-6, rtol=0)
    assert len(origin["sha256"]) == 64


def test_a_new_run_starts_from_the_file_and_records_it(source, data, tmp_path):
    file = source / "timm.safetensors"
    pretrain(load_config(overrides=overrides(**{"backbone.weights": str(file), "train.steps": 1})), tmp_path / "r",
             dataset=data)
    meta = safe_load(tmp_path / "r" / "checkpoint.pt")["meta"]["starting_weights"]
    model, _, _ = load_run(source / "run")
    assert meta["source"] == str(file.resolve()) and meta["sha256"] == sha256(file)
    assert meta["weights_sha256"] == state_sha256(model.backbone.state_dict())     # step 0 = the source
    assert meta["report"]["loaded"] == meta["report"]["of"]


def test_a_file_of_other_shapes_is_one_line_naming_the_key(source, tmp_path, data):
    state = read_state(source / "timm.safetensors")
    state["layer2.0.conv1.weight"] = torch.zeros(7, 7, 3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    cfg = load_config(overrides=overrides(**{"backbone.weights": str(tmp_path / "bad.safetensors")}))
    with pytest.raises(ValueError) as e:
        pretrain(cfg, tmp_path / "r", dataset=data)
    msg = str(e.value)
    assert "\n" not in msg and "net.layer2.0.conv1.weight (7, 7, 3, 3) vs (128, 64, 3, 3)" in msg
    assert "backbone.weights_strict=false" in msg and not (tmp_path / "r").exists()
    # not strict: everything else loaded, the odd tensor left at its initialisation
    net = build_backbone(cfg.backbone, 1, 32)
    report = load_starting_weights(net, state, strict=False)
    assert report["loaded"] == report["of"] - 1 and len(report["mismatched"]) == 1


def test_another_architecture_fits_nothing(source):
    net = build_backbone(load_config(overrides=overrides(**{"backbone.name": "timm:regnetx_002"})).backbone, 1, 32)
    with pytest.raises(ValueError, match="no key of the file fits this backbone"):
        load_starting_weights(net, read_state(source / "timm.safetensors"))


def test_gray_model_from_a_3_channel_file(tmp_path, data):
    """timm's stem adaptation: the 1-channel stem is the sum of the RGB one, so a gray image gives
    the features the RGB model gives the same image repeated on its three channels."""
    torch.manual_seed(0)
    rgb = timm.create_model("resnet18d", num_classes=0).eval()
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    net = build_backbone(load_config(overrides=overrides()).backbone, 1, 32)
    report = load_starting_weights(net, read_state(tmp_path / "rgb.pth"))
    assert report["adapted"] == ["net.conv1.0.weight"]
    x = (data.images[:8].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_vit_position_table_is_resampled(tmp_path):
    torch.manual_seed(0)
    big = timm.create_model("vit_tiny_patch16_224", num_classes=0)                 # 14×14 patches
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, tmp_path / "vit.safetensors")
    cfg = load_config(overrides=overrides(**{"backbone.name": "timm:vit_tiny_patch16_224"}))
    net = build_backbone(cfg.backbone, 3, 64)                                      # 4×4 patches
    report = load_starting_weights(net, read_state(tmp_path / "vit.safetensors"))
    assert report["adapted"] == ["net.pos_embed"] and net.net.pos_embed.shape == (1, 17, 192)
    torch.testing.assert_close(net.net.blocks[3].mlp.fc1.weight, big.blocks[3].mlp.fc1.weight)


def test_key_prefixes_are_matched():
    target = {"net.conv1.weight", "net.layer1.0.bn1.bias"}
    for prefix in ("", "module.", "backbone.", "model.encoder.", "module.backbone.net."):
        mapped = match_keys({f"{prefix}conv1.weight": 1, f"{prefix}layer1.0.bn1.bias": 2}, target)
        assert set(mapped) == target, prefix


def test_freeze_and_lr_scale(source, data, tmp_path):
    """backbone.freeze=2: the stem and the first two stages keep the starting weights (their
    BatchNorm statistics too); the rest trains, at a tenth of the head's learning rate."""
    file = source / "timm.safetensors"
    cfg = load_config(overrides=overrides(**{"backbone.weights": str(file), "backbone.freeze": "2",
                                             "backbone.lr_scale": 0.1}))
    pretrain(cfg, tmp_path / "r", dataset=data)
    start = read_state(file)
    trained = load_run(tmp_path / "r")[0].backbone.net.state_dict()
    frozen = [k for k in start if k.startswith(("conv1.", "bn1.", "layer1.", "layer2."))]
    assert len(frozen) > 40 and all(torch.equal(trained[k], start[k]) for k in frozen if "num_batches" not in k)
    for stage in ("layer3.", "layer4."):
        assert any(not torch.equal(trained[k], v) for k, v in start.items() if k.startswith(stage)), stage
    ck = safe_load(tmp_path / "r" / "checkpoint.pt")
    lrs = {g.get("lr_scale", 1.0): g["lr"] for g in ck["optimizer"]["param_groups"]}
    assert set(lrs) == {0.1, 1.0} and lrs[0.1] == pytest.approx(0.1 * lrs[1.0])
    with pytest.raises(ValueError, match="stem and 4 stages"):
        freeze(build_backbone(cfg.backbone, 1, 32), "5")
    with pytest.raises(ConfigError, match="backbone.freeze"):
        load_config(overrides=overrides(**{"backbone.freeze": "first"}))


def test_frozen_batchnorm_stays_frozen_when_made_global():
    """Under DDP every BatchNorm becomes a global one (SimCLR's global BN): a frozen stage's keeps
    its running statistics."""
    from selfsight.nn.sync_bn import GlobalBatchNorm, convert_sync_batchnorm
    net = build_backbone(load_config(overrides=overrides(**{"backbone.freeze": "stem"})).backbone, 1, 32)
    freeze(net, "stem")
    net = convert_sync_batchnorm(net, "cpu").train()
    stem_bn, later_bn = net.net.conv1[1], net.net.layer1[0].bn1
    assert isinstance(stem_bn, GlobalBatchNorm) and stem_bn.keeps_running_stats
    before = stem_bn.running_mean.clone(), later_bn.running_mean.clone()
    net(torch.randn(4, 1, 32, 32))
    assert torch.equal(stem_bn.running_mean, before[0]) and not torch.equal(later_bn.running_mean, before[1])
