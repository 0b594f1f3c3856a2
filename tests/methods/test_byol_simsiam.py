"""BYOL and SimSiam on real Fashion-MNIST images: heads, EMA, fixed predictor lr, learning."""
import pytest
import torch
import torch.nn as nn
from helpers import tiny_overrides

from selfsight.backbones.resnet import ResNetBackbone
from selfsight.engine.trainer import pretrain
from selfsight.methods.byol import BYOL, BYOLParams
from selfsight.methods.simsiam import SimSiam, SimSiamParams
from selfsight.resolve import load_config


def resnet():
    torch.manual_seed(0)
    return ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=8)


def test_simsiam_heads_follow_the_official_builder():
    m = SimSiam(SimSiamParams(dim=128, pred_hidden_dim=32), resnet())
    kinds = [type(x).__name__ for x in m.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert not m.projector[-1].affine and all(x.bias is None for x in m.projector if isinstance(x, nn.Linear))
    assert [type(x).__name__ for x in m.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert m.predictor[0].bias is None and m.predictor[-1].bias is not None      # no BN at the output
    assert m.predictor[0].out_features == 32 and m.projector[0].out_features == m.student.embed_dim
    assert {id(p) for p in m.fixed_lr_parameters()} == {id(p) for p in m.predictor.parameters()}
    cfg = load_config(overrides=["method.name=simsiam"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.backbone.zero_init_residual) == \
        ("sgd", 0.05, 1e-4, True)


def test_byol_heads_and_ema_after_the_step_follow_the_formula():
    m = BYOL(BYOLParams(hidden_dim=64, dim=32), resnet())
    for mlp in (m.projector, m.predictor):
        assert [type(x).__name__ for x in mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
        assert mlp[0].bias is not None and mlp[-1].bias is None
    assert not any(p.requires_grad for p in m.target_student.parameters())
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.5)
    t0 = [p.clone() for p in m.target_student.parameters()]
    o = [p.clone() for p in m.student.parameters()]
    m.after_step({"momentum": 0.9})
    for t, a, b in zip(m.target_student.parameters(), t0, o):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * b)
    assert m.schedules() == {"momentum": (0.996, 1.0)}


def test_byol_target_follows_the_cosine_schedule_after_each_step(tmp_path, fmnist_small, monkeypatch):
    calls = []
    real = BYOL.after_step
    order = []
    monkeypatch.setattr(BYOL, "after_step", lambda self, sched: (calls.append(sched["momentum"]), order.append("ema"),
                                                                 real(self, sched)))
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        order.append("opt")
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    cfg = load_config(overrides=tiny_overrides(**{"method.name": "byol", "method.hidden_dim": 64, "method.dim": 32,
                                                  "train.steps": 6}))
    pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    tau = [1 - (1 - 0.996) * (torch.cos(torch.tensor(torch.pi * k / 6)).item() + 1) / 2 for k in range(6)]
    assert calls == pytest.approx(tau) and order[:4] == ["opt", "ema", "opt", "ema"]


def test_simsiam_predictor_keeps_the_base_lr(tmp_path, fmnist_small):
    cfg = load_config(overrides=tiny_overrides(**{"method.name": "simsiam", "method.dim": 64,
                                                  "method.pred_hidden_dim": 16, "train.steps": 5}))
    pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    groups = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    fixed = [g["lr"] for g in groups if g.get("fixed_lr")]
    other = [g["lr"] for g in groups if not g.get("fixed_lr")]
    base = 0.06 * 32 / 128                                    # tiny_overrides: lr 0.06 at B 128, batch 32
    assert fixed and all(lr == pytest.approx(base) for lr in fixed)
    assert all(lr < base for lr in other)                      # cosine-decayed


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("simsiam", {"method.dim": 256, "method.pred_hidden_dim": 64, "optim.lr": 0.1}),
    ("byol", {"method.hidden_dim": 256, "method.dim": 64, "method.momentum": 0.99, "optim.lr": 0.3}),
])
def test_learns_features_on_real_images(tmp_path, fmnist_small, fmnist_test, method, extra):
    from helpers import small_knn
    cfg = load_config(overrides=tiny_overrides(**{"method.name": method, "train.steps": 300, **extra}))
    pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    acc = small_knn(tmp_path / "run", fmnist_small, fmnist_test)
    assert acc["trained"] > acc["random"] + 0.025, acc
