"""The training loop on real Fashion-MNIST images: it learns, logs, budgets, survives NaN."""
import json
import math

import pytest
import torch
from helpers import tiny_overrides

from selfsight.engine.optim import LARS, param_groups
from selfsight.engine.trainer import Trainer, TrainingError, pretrain
from selfsight.resolve import load_config
from selfsight.schedules import cosine, scaled_lr


def test_simclr_learns_on_real_images(tmp_path, fmnist_small):
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 120, "train.log_every": 10,
                                                  "optim.lr": 0.3, "train.tensorboard": "true"}))
    res = pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res["steps"] == 120 and rows[-1]["step"] == 120
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    # NT-Xent of 2B=64 views starts near 2·ln(63) = 8.3 and stays there without learning; 120 steps
    # bring it down by 0.9-1.1 (3 seeds), so a drop of 0.6 separates learning from noise
    assert first > 7.0 and last < first - 0.6, (first, last)
    for key in ("lr", "weight_decay", "images_per_s", "data_wait", "augment_share", "skipped_files"):
        assert key in rows[-1]
    assert rows[-1]["lr"] < rows[0]["lr"]                        # cosine decay
    assert (tmp_path / "run" / "config.yaml").exists() and any((tmp_path / "run" / "tb").iterdir())


def test_epoch_and_time_budgets(tmp_path, fmnist_small):
    cfg = load_config(overrides=tiny_overrides(**{"train.epochs": 0.5}))
    assert pretrain(cfg, tmp_path / "a", dataset=fmnist_small)["steps"] == 32   # 2048 images / 32 / 2
    cfg = load_config(overrides=tiny_overrides(**{"train.minutes": 0.05}))
    res = pretrain(cfg, tmp_path / "b", dataset=fmnist_small)
    assert res["minutes"] == pytest.approx(0.05, abs=0.03) and res["steps"] > 10


def test_no_budget_is_an_error(tmp_path, fmnist_small):
    with pytest.raises(ValueError, match="budget"):
        Trainer(load_config(overrides=tiny_overrides()), tmp_path, dataset=fmnist_small)


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, fmnist_small, monkeypatch):
    import selfsight.methods.simclr as simclr
    real = simclr.nt_xent
    calls = {"n": 0}

    def flaky(z1, z2, t):
        calls["n"] += 1
        loss = real(z1, z2, t)
        return loss * float("nan") if calls["n"] in (3, 4) or calls["n"] > 12 else loss
    monkeypatch.setattr(simclr, "nt_xent", flaky)
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 50, "train.log_every": 1, "train.checkpoint_every": 5}))
    tr = Trainer(cfg, tmp_path / "run", dataset=fmnist_small)
    with pytest.raises(TrainingError, match="not finite for 10 steps"):
        tr.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # one step a row: a row whose step was skipped has no loss to show (NaN, never a made-up 0)
    assert sum(r["nonfinite_steps"] for r in rows) >= 2
    assert all(math.isnan(r["loss"]) == (r["nonfinite_steps"] == 1) for r in rows)
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())       # skipped steps changed nothing
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 10


def test_cosine_schedule_with_warmup():
    assert cosine(0, 100, 1.0, 0.0, warmup=10) == 0.0
    assert cosine(5, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
    assert cosine(10, 100, 1.0, 0.0, warmup=10) == pytest.approx(1.0)
    assert cosine(55, 100, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
    assert cosine(100, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.1)
    assert scaled_lr(0.3, 4096, 256, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075 * 16, 4096, 256, "sqrt") == pytest.approx(0.075 * 64)


def test_param_groups_and_lars_update_follow_the_formula():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    groups = param_groups(net)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([3, 4])]
    assert len(groups[1]["params"]) == 3 and groups[1]["weight_decay"] == 0.0
    opt = LARS(groups, lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=1e-3)
    w0 = net[0].weight.detach().clone()
    b0 = net[0].bias.detach().clone()
    net(torch.randn(8, 4)).pow(2).sum().backward()
    g, gb = net[0].weight.grad.clone(), net[0].bias.grad.clone()
    opt.step()
    dp = g + 0.1 * w0
    expected = w0 - 0.5 * (1e-3 * w0.norm() / dp.norm()) * dp
    torch.testing.assert_close(net[0].weight.detach(), expected)
    torch.testing.assert_close(net[0].bias.detach(), b0 - 0.5 * gb)          # excluded: plain SGD, no decay


def test_any_module_as_backbone_and_method_declared_schedules(tmp_path, fmnist_small, monkeypatch):
    import selfsight.methods.simclr as simclr
    seen = []
    monkeypatch.setattr(simclr.SimCLR, "schedules", lambda self: {"teacher_momentum": (0.9, 1.0)}, raising=False)
    real = simclr.SimCLR.training_step

    def spy(self, batch, sched):
        seen.append(sched["teacher_momentum"])
        return real(self, batch, sched)
    monkeypatch.setattr(simclr.SimCLR, "training_step", spy)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, 2), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 11, "train.log_every": 5}))
    res = pretrain(cfg, tmp_path / "run", dataset=fmnist_small, backbone=net)
    assert res["steps"] == 11 and net[0].weight.grad is not None
    assert seen[0] == pytest.approx(0.9) and seen[-1] > 0.99 and seen == sorted(seen)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "teacher_momentum" in rows[0]


def test_per_sample_augmentation_in_workers_for_in_memory_sets(tmp_path, fmnist_small):
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 3, "data.device_augment": "off", "data.workers": 1}))
    assert pretrain(cfg, tmp_path / "run", dataset=fmnist_small)["steps"] == 3


def test_simclr_trains_a_vit(tmp_path, fmnist_small):
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 3, "backbone.name": "vit_tiny",
                                                  "backbone.patch_size": 7, "optim.name": "adamw",
                                                  "optim.lr": 1e-3}))
    res = pretrain(cfg, tmp_path / "vit", dataset=fmnist_small)
    ck = torch.load(tmp_path / "vit" / "checkpoint.pt", weights_only=True)
    assert res["steps"] == 3 and any(k.startswith("student.net.blocks.") for k in ck["model"])


def test_finite_loss_with_nonfinite_gradients_is_skipped(tmp_path, fmnist_small):
    """A finite loss whose backward gives NaN (as CPU bf16 convolutions on 1x1 maps once did) must
    not reach the optimizer: the step is skipped and counted, the weights stay finite."""
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 6, "train.log_every": 1,
                                                  "train.checkpoint_every": 0}))
    tr = Trainer(cfg, tmp_path / "run", dataset=fmnist_small)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] in (2, 3) else grad
    weight = next(p for n, p in tr.model.named_parameters() if p.ndim == 4)
    weight.register_hook(poison)
    tr.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["nonfinite_steps"] for r in rows) == 2
    assert all(math.isnan(r["loss"]) == (r["nonfinite_steps"] == 1) for r in rows)    # skipped: NaN, not 0
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
