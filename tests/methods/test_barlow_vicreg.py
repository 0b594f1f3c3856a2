"""Barlow Twins and VICReg on real Fashion-MNIST images: heads and learning."""
import pytest
import torch
import torch.nn as nn
from helpers import tiny_overrides

from selfsight.backbones.resnet import ResNetBackbone
from selfsight.engine.trainer import pretrain
from selfsight.methods.barlow_twins import BarlowTwins, BarlowTwinsParams
from selfsight.methods.vicreg import VICReg, VICRegParams
from selfsight.resolve import load_config


def resnet():
    torch.manual_seed(0)
    return ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=8)


def test_heads_follow_the_official_code():
    bt = BarlowTwins(BarlowTwinsParams(proj_dim=32), resnet())
    assert [type(x).__name__ for x in bt.projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert all(x.bias is None for x in bt.projector if isinstance(x, nn.Linear)) and not bt.projector[-1].affine
    vc = VICReg(VICRegParams(proj_dim=32), resnet())
    assert [type(x).__name__ for x in vc.projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert vc.projector[0].bias is not None and vc.projector[-1].bias is None
    for m in ("barlow_twins", "vicreg"):
        cfg = load_config(overrides=[f"method.name={m}"])
        assert (cfg.optim.name, cfg.optim.lr, cfg.method.proj_dim) == ("lars", 0.2, 8192)
        assert tuple(cfg.views.view_blur_p) == (1.0, 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["barlow_twins", "vicreg"])
def test_learns_features_on_real_images(tmp_path, fmnist_small, fmnist_test, method):
    """300 steps of batch 32 on 28 px Fashion-MNIST, projector 64 wide. VICReg's kNN gain over the
    same network at random init: +0.079, +0.040, +0.009 over seeds 0-2. Barlow Twins' kNN gain at
    this scale is within seed noise (-0.028 to +0.048 over 6 runs; random-init features of this
    net are strong, 0.62-0.68), so its learning is shown by its objective: the cross-correlation
    loss falls below half its start (42 -> 13, 45 -> 16 over two seeds) while the features stay
    as good as random ones (a collapse would drop kNN far below); its features are measured at
    scale in docs/methods.md (linear probe 0.8804 after 10 minutes)."""
    import json

    from helpers import small_knn
    cfg = load_config(overrides=tiny_overrides(**{"method.name": method, "method.proj_dim": 64, "train.steps": 300,
                                                  "optim.name": "lars", "optim.lr": 0.3, "optim.base_batch": 256,
                                                  "optim.weight_decay": 1e-4, "train.log_every": 20}))
    pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    acc = small_knn(tmp_path / "run", fmnist_small, fmnist_test)
    if method == "vicreg":
        assert acc["trained"] > acc["random"] + 0.025, acc
    else:
        losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
        assert acc["trained"] > acc["random"] - 0.04, acc
