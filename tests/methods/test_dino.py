"""DINO on real Fashion-MNIST images: multi-crop forward grouped by resolution, the teacher
(global crops only, no drop-path, EMA after the step, used for evaluation), the center, the
teacher temperature warm-up, the frozen last layer, the collapse monitor, and learning."""
import math

import pytest
import torch
from helpers import tiny_overrides

from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.backbones.resnet import ResNetBackbone
from selfsight.backbones.vit import ViTBackbone
from selfsight.engine.monitor import collapse_warning
from selfsight.engine.trainer import pretrain
from selfsight.losses.dino import dino_loss, teacher_probs
from selfsight.methods.dino import DINO, DINOParams
from selfsight.resolve import load_config

SMALL = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def resnet():
    torch.manual_seed(0)
    return ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=8)


def multicrop(images, n_local=4, size=28, local=12):
    recipe = ViewRecipe(size=size, crop_scale=(0.4, 1.0), local_crops=n_local, local_size=local,
                        local_crop_scale=(0.1, 0.4), mean=(0.5,), std=(0.5,))
    return BatchedViews(recipe, torch.Generator().manual_seed(0))(images)


def test_one_backbone_forward_per_resolution_and_the_teacher_sees_only_global_crops(fmnist_small):
    m = DINO(DINOParams(**SMALL), resnet())
    views = multicrop(fmnist_small.images[:8])
    assert [tuple(v.shape) for v in views] == [(8, 1, 28, 28)] * 2 + [(8, 1, 12, 12)] * 4
    seen = {"student": [], "teacher": []}
    m.student.register_forward_hook(lambda mod, i, o: seen["student"].append(tuple(i[0].shape)))
    m.teacher.register_forward_hook(lambda mod, i, o: seen["teacher"].append(tuple(i[0].shape)))
    out = m({"views": views}, {"epoch": 0.0})
    assert seen == {"student": [(16, 1, 28, 28), (32, 1, 12, 12)], "teacher": [(16, 1, 28, 28)]}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_loss_uses_the_center_before_its_update_and_the_center_follows_the_teacher(fmnist_small):
    m = DINO(DINOParams(**SMALL), resnet())
    views = multicrop(fmnist_small.images[:8], n_local=2)
    with torch.no_grad():
        m.center.normal_()
    c0 = m.center.clone()
    torch.manual_seed(5)
    out = m({"views": views}, {"epoch": 0.0})
    with torch.no_grad():   # the same step by hand (same BN batches: one per resolution), networks unchanged
        t = m.teacher_head(m.teacher(torch.cat(views[:2])))
        s = list(m.head(torch.cat([m.student(torch.cat(views[:2])), m.student(torch.cat(views[2:]))])).chunk(4))
        expect = dino_loss(s, list(teacher_probs(t, c0, 0.04).chunk(2)), 0.1)
    assert out["loss"].item() == pytest.approx(expect.item(), rel=1e-5)
    torch.testing.assert_close(m.center, 0.9 * c0 + 0.1 * t.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)
    assert "center" in m.state_dict()


def test_teacher_temperature_warms_up_linearly_then_stays():
    m = DINO(DINOParams(**SMALL, teacher_temp_warmup_epochs=30), resnet())
    assert m.teacher_temperature(0) == pytest.approx(0.04)
    assert m.teacher_temperature(15) == pytest.approx(0.055)
    assert m.teacher_temperature(30) == m.teacher_temperature(100) == pytest.approx(0.07)


def test_vit_teacher_has_no_drop_path_and_local_crops_interpolate_positions(fmnist_small):
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, drop_path=0.1)
    m = DINO(DINOParams(**SMALL), vit)
    student_dp = [mod.drop_prob for mod in m.student.modules() if hasattr(mod, "drop_prob")]
    teacher_dp = [mod.drop_prob for mod in m.teacher.modules() if hasattr(mod, "drop_prob")]
    assert student_dp and max(student_dp) == pytest.approx(0.1) and set(teacher_dp) == {0.0}
    views = multicrop(fmnist_small.images[:4], n_local=2, local=12)
    out = m({"views": views}, {"epoch": 0.0})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.student.net.pos_embed.grad is not None
    assert m.backbone is m.teacher and m.finetune_network() is m.teacher


def test_ema_after_the_step_covers_backbone_and_head():
    m = DINO(DINOParams(**SMALL), resnet())
    with torch.no_grad():
        for p in list(m.student.parameters()) + list(m.head.parameters()):
            p.add_(0.5)
    t0 = [p.clone() for p in list(m.teacher.parameters()) + list(m.teacher_head.parameters())]
    o = [p.clone() for p in list(m.student.parameters()) + list(m.head.parameters())]
    m.after_step({"momentum": 0.9})
    for t, a, b in zip(list(m.teacher.parameters()) + list(m.teacher_head.parameters()), t0, o):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * b)
    assert m.schedules() == {"momentum": (0.996, 1.0)}


def test_last_layer_is_frozen_during_the_first_epoch_only(tmp_path, fmnist_small):
    def last_and_first(run):
        sd = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
        return sd["head.last_layer.parametrizations.weight.original1"], sd["head.mlp.0.weight"]
    # fmnist_small at batch 32: 64 steps per epoch; freeze for 0.1 epoch (6.4 steps)
    common = {"method.name": "dino", "method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16,
              "views.local_crops": 2, "views.local_size": 12, "optim.clip_grad": 3.0, "optim.clip_mode": "per_param"}
    torch.manual_seed(0)
    init = DINO(DINOParams(**SMALL), ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=8))
    for steps, frozen in ((6, True), (12, False)):
        cfg = load_config(overrides=tiny_overrides(**common, **{"train.steps": steps, "method.freeze_last_layer": 0.1}))
        pretrain(cfg, tmp_path / f"run{steps}", dataset=fmnist_small)
        last, first = last_and_first(tmp_path / f"run{steps}")
        v0 = init.head.last_layer.parametrizations.weight.original1
        assert torch.equal(last, v0) == frozen, steps
        assert not torch.equal(first, init.head.mlp[0].weight)


def test_monitor_reports_uniform_and_one_hot_collapse_and_stays_quiet_when_healthy():
    from selfsight.losses.dino import dino_monitor
    m = DINO(DINOParams(**SMALL), resnet())
    b, k = 32, SMALL["out_dim"]
    uniform = torch.full((2 * b, k), 1.0 / k)
    one_hot = torch.zeros(2 * b, k)
    one_hot[:, 3] = 1.0
    healthy = torch.softmax(torch.randn(2 * b, k, generator=torch.Generator().manual_seed(0)) * 5, -1)
    rows = {}
    for name, t_p in (("uniform", uniform), ("one_hot", one_hot), ("healthy", healthy)):
        student = tuple((t_p.clamp_min(1e-9).log() * 0.1).chunk(2))          # a student that agrees
        rows[name] = {k_: float(v) for k_, v in dino_monitor(t_p, student, m.params.student_temp).items()}
    assert rows["uniform"]["dino_entropy_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert rows["one_hot"]["dino_batch_entropy_ratio"] == pytest.approx(0.0, abs=1e-4)
    assert "uniform" in collapse_warning(rows["uniform"])
    assert "one prototype" in collapse_warning(rows["one_hot"])
    assert collapse_warning(rows["healthy"]) is None
    # early in training the teacher is near uniform but the student still differs: no alarm
    assert collapse_warning({**rows["uniform"], "dino_kl": 0.2}) is None
    assert rows["healthy"]["dino_teacher_entropy"] == pytest.approx(
        float(-(healthy * healthy.log()).sum(1).mean()), rel=1e-5)
    assert math.isfinite(rows["healthy"]["dino_kl"])


@pytest.mark.slow
def test_dino_learns_features_on_real_images(tmp_path, fmnist_small, fmnist_test):
    from helpers import small_knn
    cfg = load_config(overrides=tiny_overrides(**{
        "method.name": "dino", "method.out_dim": 1024, "method.hidden_dim": 256, "method.bottleneck_dim": 64,
        "method.momentum": 0.99, "method.teacher_temp_warmup_epochs": 1, "method.freeze_last_layer": 0.2,
        "method.use_bn_in_head": "true", "method.warmup_teacher_temp": 0.02, "method.teacher_temp": 0.04,
        "views.local_crops": 2, "views.local_size": 12, "optim.lr": 0.1, "train.steps": 500,
        "optim.weight_decay_end": -1, "optim.clip_grad": 3.0, "optim.clip_mode": "per_param",
        "train.log_every": 50}))
    pretrain(cfg, tmp_path / "run", dataset=fmnist_small)
    acc = small_knn(tmp_path / "run", fmnist_small, fmnist_test)
    assert acc["trained"] > acc["random"] + 0.025, acc
    import json
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "dino_kl" in r]
    assert logged and all(collapse_warning(r) is None for r in logged[1:])
