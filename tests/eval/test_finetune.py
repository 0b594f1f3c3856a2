"""Fine-tuning: BEiT's layer-wise learning rates on a tiny ViT, fine-tuning beats the frozen linear
probe of a pretrained checkpoint on real Fashion-MNIST images, and the CLI's --json round trip."""
import json
import subprocess
import sys

import pytest
import torch

from selfsight.backbones.vit import ViTBackbone
from selfsight.eval.finetune import Classifier, finetune, finetune_optimizer, set_lr


def _expected_layer(name: str) -> int:
    """Layer ids of BEiT's ``get_num_layer_for_vit`` written out for a ViT of depth 2 (L + 1 = 3)."""
    if name in ("backbone.net.cls_token", "backbone.net.pos_embed", "backbone.mask_token") \
            or name.startswith("backbone.net.patch_embed."):
        return 0
    if name.startswith("backbone.net.blocks.0."):
        return 1
    if name.startswith("backbone.net.blocks.1."):
        return 2
    if name.startswith(("backbone.net.norm.", "head.", "backbone.rel_pos_bias.")):
        return 3
    raise AssertionError(f"unexpected parameter {name}")


def test_layer_wise_lr_decay_and_no_decay_groups_on_a_tiny_vit(fmnist_small):
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=7, in_chans=1, depth=2, mask_mode="token",
                      rel_pos_bias=True)
    clf = Classifier(vit, 10, in_chans=1, size=28)
    lr, decay, wd = 1e-3, 0.75, 0.05
    opt = finetune_optimizer(clf, "adamw", decay, wd)
    set_lr(opt, lr)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(group_of) == len(list(clf.parameters()))
    seen = set()
    for name, p in clf.named_parameters():
        g = group_of[id(p)]
        layer = _expected_layer(name)
        seen.add(layer)
        assert g["lr"] == pytest.approx(lr * decay ** (3 - layer), rel=1e-12), name
        no_decay = name.endswith((".bias", "cls_token", "pos_embed", "mask_token")) or ".norm" in name
        assert g["weight_decay"] == (0.0 if no_decay else wd), name
    assert seen == {0, 1, 2, 3}

    # the optimizer applies those rates: AdamW's first step moves a weight by lr·(g/|g|) + lr·wd·p
    x = (fmnist_small.images[:16].float() / 255 - 0.5) / 0.5
    clf.head.weight.data.normal_(std=0.1)                # so every layer gets a gradient
    torch.nn.functional.cross_entropy(clf(x), fmnist_small.labels[:16]).backward()
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    opt.step()
    for name in ("backbone.net.patch_embed.proj.weight", "backbone.net.blocks.0.mlp.fc1.weight",
                 "backbone.net.blocks.1.attn.qkv.weight", "head.weight"):
        p = dict(clf.named_parameters())[name]
        step_lr = lr * decay ** (3 - _expected_layer(name))
        big = p.grad.abs() > 1e-4                          # where eps = 1e-8 is negligible
        move = before[name] * (1 - step_lr * wd) - p.detach()
        torch.testing.assert_close(move[big], step_lr * p.grad[big].sign(), rtol=1e-3, atol=1e-9)


@pytest.mark.slow
def test_finetuning_beats_the_frozen_linear_probe_of_a_pretrained_run(tmp_path, fmnist, fmnist_test, fmnist_small):
    from helpers import tiny_overrides

    from selfsight.backbones.features import backbone_features
    from selfsight.data import ArrayDataset
    from selfsight.engine.trainer import pretrain
    from selfsight.eval.features import extract
    from selfsight.eval.linear import linear_probe
    from selfsight.resolve import load_config
    from selfsight.runs import load_run
    out = tmp_path / "run"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 30})), out, dataset=fmnist_small)
    train = ArrayDataset(fmnist.images[:3000].clone(), fmnist.labels[:3000].clone(), name="fmnist-3k")
    test = ArrayDataset(fmnist_test.images[:2000].clone(), fmnist_test.labels[:2000].clone(), name="test-2k")

    model, _, pre = load_run(out)
    fn = backbone_features(model.backbone)
    train_f, train_y = extract(fn, train, pre)
    test_f, test_y = extract(fn, test, pre)
    linear = linear_probe(train_f, train_y, test_f, test_y, epochs=30)

    ft = finetune(out, train, test, epochs=5, batch_size=64, lr=0.4)
    assert ft["optimizer"] == "sgd" and ft["layer_decay"] is None and ft["steps"] == 5 * (3000 // 64)
    assert ft["train_loss"][-1] < ft["train_loss"][0]
    assert ft["top1"] > linear["top1"] + 0.02, (ft["top1"], linear["top1"])
    # the checkpoint itself is untouched
    again, _, _ = load_run(out)
    for a, b in zip(again.backbone.parameters(), model.backbone.parameters()):
        assert torch.equal(a, b)


def _folder(root, dataset, n):
    """The first ``n`` images of an array set as PNG files in root/c<label>/ (a labeled folder)."""
    from PIL import Image
    for i in range(n):
        d = root / f"c{int(dataset.labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(dataset.images[i, 0].numpy()).save(d / f"{i}.png")
    return root


def test_cli_finetune_json_round_trip_on_a_vit_run_and_folders(tmp_path, fmnist_small, fmnist_test):
    from helpers import tiny_overrides

    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    out = tmp_path / "vit"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 2, "backbone.name": "vit_tiny", "backbone.depth": 2,
                                                 "backbone.patch_size": 7, "optim.name": "adamw",
                                                 "optim.lr": 1e-3})), out, dataset=fmnist_small)
    train, test = _folder(tmp_path / "train", fmnist_small, 400), _folder(tmp_path / "test", fmnist_test, 300)
    base = [sys.executable, "-m", "selfsight", "eval", "finetune", str(out), "--train", str(train), "--test", str(test)]
    cmd = base + ["--epochs", "1", "--batch-size", "64", "--images", "256", "--layer-decay", "0.5",
                  "--label-smoothing", "0.2", "--lr", "1e-3", "--features", "mean", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert (res["backbone"], res["optimizer"], res["layer_decay"], res["label_smoothing"]) == \
        ("vit_tiny", "adamw", 0.5, 0.2)
    assert (res["train_images"], res["steps"], res["features"], res["lr"]) == (256, 4, "mean", 1e-3 * 64 / 256)
    assert 0.0 <= res["top1"] <= res["top5"] <= 1.0 and len(res["train_loss"]) == 1
    bad = subprocess.run(base + ["--baseline", "pixels"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("selfsight: error:") and "random" in bad.stderr


def test_head_norm_standardises_what_the_head_sees(fmnist_small):
    """--head-norm bn: features of any scale reach the head with unit variance (batch statistics)."""
    from selfsight.backbones.resnet import ResNetBackbone
    torch.manual_seed(0)
    net = ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=8)
    x = (fmnist_small.images[:64].float() / 255 - 0.5) / 0.5
    seen = {}
    for norm in ("none", "bn"):
        clf = Classifier(net, 10, in_chans=1, size=28, head_norm=norm).train()
        clf.head.register_forward_hook(lambda m, i, o, norm=norm: seen.__setitem__(norm, i[0].detach()))
        with torch.no_grad():
            clf.features = (lambda f: (lambda t: 1000 * f(t)))(clf.features)      # a method that left large features
            clf(x)
    assert seen["none"].std(0).mean() > 10
    live = seen["none"].std(0) > 0                                  # dimensions that vary over the batch
    assert live.sum() > 0.9 * live.numel()
    std = seen["bn"].std(0, unbiased=False)[live]
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="head_norm"):
        Classifier(net, 10, in_chans=1, size=28, head_norm="ln")



def test_simclr_v2_fine_tunes_the_encoder_with_its_first_projector_layer(tmp_path, fmnist_small, fmnist_test):
    """SimCLR v2's ``finetune_head_layers=1`` (``finetune_network`` hook, ``ft_proj_selector``): the
    network fine-tuned is the encoder followed by the projector's first layer."""
    import torch.nn as nn
    from helpers import tiny_overrides
    from selfsight.data import ArrayDataset
    from selfsight.engine.trainer import pretrain
    from selfsight.eval.finetune import FinetuneSettings, finetune, prepare
    from selfsight.resolve import load_config
    run = tmp_path / "v2"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 2, "method.version": 2,
                                                 "method.finetune_head_layers": 1})), run, dataset=fmnist_small)
    train = ArrayDataset(fmnist_small.images[:256].clone(), fmnist_small.labels[:256].clone())
    test = ArrayDataset(fmnist_test.images[:128].clone(), fmnist_test.labels[:128].clone())
    job = prepare(str(run), train, test, FinetuneSettings(epochs=1, batch_size=64, device="cpu", workers=0))
    net = job.clf.backbone
    assert isinstance(net, nn.Sequential) and isinstance(net[1], nn.Linear) and net[1].out_features == 64
    trained = {id(p) for g in job.opt.param_groups for p in g["params"]}
    assert id(net[1].weight) in trained
    assert job.clf.head.in_features == 64                    # the projector layer's width, not the encoder's
    res = finetune(str(run), train, test, epochs=1, batch_size=64, device="cpu", workers=0)
    assert 0 <= res["top1"] <= 1
    with pytest.raises(ValueError, match="use --features cls"):
        prepare(str(run), train, test, FinetuneSettings(epochs=1, batch_size=64, features="mean", device="cpu"))
