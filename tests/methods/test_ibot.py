"""iBOT on real Fashion-MNIST images: the masked-patch loss against the paper's formula, the
class-token term = DINO's loss, the two centers, block masks on the global crops only, the
teacher (intact global crops, no drop-path, EMA, used for evaluation), the temperature
warm-ups, the recipes, and a short training run that resumes exactly."""
import dataclasses
import json
import math
import signal

import pytest
import torch

from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.backbones.resnet import ResNetBackbone
from selfsight.backbones.vit import ViTBackbone
from selfsight.engine.trainer import Trainer, pretrain
from selfsight.losses.dino import dino_loss, teacher_probs
from selfsight.losses.ibot import ibot_patch_loss
from selfsight.methods.ibot import IBOT, IBOTParams
from selfsight.resolve import load_config
from selfsight.runs import load_run

SMALL = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def vit(depth=1, drop_path=0.0):
    torch.manual_seed(0)
    return ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=depth, drop_path=drop_path)


def multicrop(images, n_local=2, local=12):
    recipe = ViewRecipe(size=28, crop_scale=(0.4, 1.0), local_crops=n_local, local_size=local,
                        local_crop_scale=(0.1, 0.4), mean=(0.5,), std=(0.5,))
    return BatchedViews(recipe, torch.Generator().manual_seed(0))(images)


def reference_patch_loss(student, teacher_p, masks, tau):
    """The paper's L_MIM written out: per global view q and image b, the cross-entropy of the
    teacher's patch distribution (view q, intact) and the student's (view q, masked), summed over
    the masked patches, divided by their number (at least 1); mean over images, then views."""
    per_view = []
    for s, t, m in zip(student, teacher_p, masks):
        per_image = []
        for b in range(s.shape[0]):
            total, count = s.new_zeros(()), 0
            for p in range(s.shape[1]):
                if bool(m[b, p]):
                    log_q = s[b, p] / tau - torch.logsumexp(s[b, p] / tau, 0)
                    total = total - (t[b, p] * log_q).sum()
                    count += 1
            per_image.append(total / max(count, 1))
        per_view.append(sum(per_image) / len(per_image))
    return sum(per_view) / len(per_view)


def test_patch_loss_is_the_papers_formula_over_masked_patches_only():
    g = torch.Generator().manual_seed(0)
    for trial in range(25):
        n_views = 1 + trial % 3
        b, n, k = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 6), (1, 12), (2, 9)))
        tau = float(torch.rand(1, generator=g)) * 0.5 + 0.05
        s = [torch.randn(b, n, k, generator=g, dtype=torch.float64) * 3 for _ in range(n_views)]
        t = [torch.softmax(torch.randn(b, n, k, generator=g, dtype=torch.float64) * 3, -1) for _ in range(n_views)]
        masks = [torch.rand(b, n, generator=g) < 0.4 for _ in range(n_views)]
        masks[0][0] = False                                            # one image without any masked patch
        got = ibot_patch_loss(s, t, masks, tau)
        torch.testing.assert_close(got, reference_patch_loss(s, t, masks, tau), rtol=1e-10, atol=1e-12)
    # unmasked positions neither count nor receive gradient
    s = [x.clone().requires_grad_() for x in s]
    moved = [torch.where(m[..., None], x, x + 100 * torch.randn_like(x)) for x, m in zip(s, masks)]
    torch.testing.assert_close(ibot_patch_loss(moved, t, masks, tau), ibot_patch_loss(s, t, masks, tau))
    ibot_patch_loss(s, t, masks, tau).backward()
    for x, m in zip(s, masks):
        assert (x.grad[~m] == 0).all() and (x.grad[m].abs().sum(-1) > 0).all()
    # no masked patch anywhere: 0, finite, zero gradient (not NaN)
    none = [torch.zeros(b, n, dtype=torch.bool) for _ in s]
    for x in s:
        x.grad = None
    zero = ibot_patch_loss(s, t, none, tau)
    zero.backward()
    assert zero.item() == 0.0 and all(torch.equal(x.grad, torch.zeros_like(x)) for x in s)


def test_step_is_dino_on_class_tokens_plus_patch_term_and_centers_follow_the_teacher(fmnist_small):
    m = IBOT(IBOTParams(**SMALL, lambda1=0.5, lambda2=2.0), vit())
    views = multicrop(fmnist_small.images[:8])
    masks = m.make_masker()(views, 3)
    assert all(x.any() for x in masks[:2])
    with torch.no_grad():
        m.center.normal_()
        m.patch_center.normal_()
    c1, c2 = m.center.clone(), m.patch_center.clone()
    out = m({"views": views, "masks": masks}, {"epoch": 0.0})
    mon = out["monitor"]
    with torch.no_grad():       # the same step by hand, networks unchanged (no drop-path, no BN)
        g, gm = torch.cat(views[:2]), torch.cat(masks[:2])
        f = m.student.forward_features(g, gm)
        s_cls = m.head(torch.cat([f.cls, m.student(torch.cat(views[2:]))])).chunk(4)
        s_patch = m.head(f.patch).chunk(2)                                        # 2 × B×N×K
        tf = m.teacher.forward_features(g)
        t_cls, t_patch = m.teacher_head(tf.cls), m.teacher_head(tf.patch)        # (2B)×K, (2B)×N×K
        cls = dino_loss(list(s_cls), list(teacher_probs(t_cls, c1, 0.04).chunk(2)), 0.1)
        patch = reference_patch_loss(s_patch, teacher_probs(t_patch, c2, 0.04).chunk(2), masks[:2], 0.1)
    assert mon["ibot_cls_loss"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert mon["ibot_patch_loss"].item() == pytest.approx(patch.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * cls.item() + 2.0 * patch.item(), rel=1e-5)
    torch.testing.assert_close(m.center, 0.9 * c1 + 0.1 * t_cls.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.patch_center, 0.9 * c2 + 0.1 * t_patch.mean((0, 1))[None], rtol=1e-5, atol=1e-6)
    assert {"center", "patch_center"} <= set(m.state_dict())
    assert mon["mask_ratio"].item() == pytest.approx(gm.float().mean().item())
    assert {"dino_entropy_ratio", "dino_batch_entropy_ratio", "dino_kl", "ibot_patch_entropy_ratio"} <= set(mon)


def test_block_masks_on_global_crops_only_and_the_teacher_sees_them_intact(fmnist_small):
    m = IBOT(IBOTParams(**SMALL), vit())
    gen = m.masker.generator
    assert (gen.kind, gen.ratio_range, gen.unmasked_share, gen.min_patches) == ("block", (0.1, 0.5), 0.5, 4)  # (7//3)²
    views = multicrop(fmnist_small.images[:16])
    masks = m.make_masker()(views, 0)
    assert masks[2:] == [None, None]
    for x in masks[:2]:
        per_image = x.sum(1)
        assert x.shape == (16, 49) and (per_image == 0).sum() == 8              # half the images unmasked
        assert ((per_image[per_image > 0] >= 1) & (per_image[per_image > 0] <= round(0.5 * 49))).all()
    seen = {"student": [], "teacher": []}
    for name in seen:
        net = getattr(m, name)
        orig = net.forward_features
        net.forward_features = lambda x, mask=None, _o=orig, _n=name: (
            seen[_n].append((tuple(x.shape), None if mask is None else int(mask.sum()))) or _o(x, mask))
    out = m({"views": views, "masks": masks}, {"epoch": 0.0})
    n_masked = int(masks[0].sum() + masks[1].sum())
    assert seen == {"student": [((32, 1, 28, 28), n_masked), ((32, 1, 12, 12), None)],
                    "teacher": [((32, 1, 28, 28), None)]}
    assert torch.isfinite(out["loss"])
    # before pred_start_epoch nothing is masked and the patch term is 0
    late = IBOT(IBOTParams(**SMALL, pred_start_epoch=1.0), vit())
    early = late({"views": views, "masks": masks}, {"epoch": 0.5})["monitor"]
    assert early["mask_ratio"].item() == 0.0 and early["ibot_patch_loss"].item() == 0.0


def test_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match="ViT backbone.*backbone.name='resnet10'"):
        IBOT(IBOTParams(**SMALL), ResNetBackbone("resnet10", in_chans=1, width=8))
    p = IBOTParams(**SMALL)
    p.mask.views = (2,)
    with pytest.raises(ValueError, match="method.mask.views"):
        IBOT(p, vit())
    p = IBOTParams(**SMALL)
    p.mask.ratio_range = (0.5, 0.1)
    with pytest.raises(ValueError, match="method.mask.ratio_range"):
        IBOT(p, vit())


def test_teacher_temperatures_warm_up_then_stay():
    m = IBOT(IBOTParams(**SMALL, teacher_temp_warmup_epochs=30, teacher_patch_temp=0.06), vit())
    assert m.teacher_temperatures(0) == pytest.approx((0.04, 0.04))
    assert m.teacher_temperatures(15) == pytest.approx((0.055, 0.05))
    assert m.teacher_temperatures(30) == m.teacher_temperatures(100) == pytest.approx((0.07, 0.06))
    late = IBOT(IBOTParams(**SMALL, pred_start_epoch=10), vit())           # the patch warm-up starts with MIM
    assert late.teacher_temperatures(5) == pytest.approx((0.045, 0.04))
    assert late.teacher_temperatures(25) == pytest.approx((0.065, 0.055))


def test_teacher_has_no_drop_path_follows_by_ema_and_is_the_backbone(fmnist_small):
    m = IBOT(IBOTParams(**SMALL), vit(depth=2, drop_path=0.1))
    assert max(mod.drop_prob for mod in m.student.modules() if hasattr(mod, "drop_prob")) == pytest.approx(0.1)
    assert {mod.drop_prob for mod in m.teacher.modules() if hasattr(mod, "drop_prob")} == {0.0}
    out = m({"views": multicrop(fmnist_small.images[:4])}, {"epoch": 0.0})     # masks drawn by the method
    out["loss"].backward()
    assert m.student.mask_token.grad is not None and all(p.grad is None for p in m.teacher.parameters())
    online = list(m.student.parameters()) + list(m.head.parameters())
    target = list(m.teacher.parameters()) + list(m.teacher_head.parameters())
    with torch.no_grad():
        for p in online:
            p.add_(0.5)
    t0, o = [p.clone() for p in target], [p.clone() for p in online]
    m.after_step({"momentum": 0.9})
    for t, a, b in zip(target, t0, o):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * b)
    assert m.schedules() == {"momentum": (0.996, 1.0)}
    assert m.backbone is m.teacher and m.finetune_network() is m.teacher


def test_config_defaults_and_recipes():
    cfg = load_config(None, ["method.name=ibot", "method.mask.ratio_range=[0.2, 0.4]"])
    p = cfg.method
    assert (p.mask.kind, p.mask.ratio_range, p.mask.unmasked_share) == ("block", (0.2, 0.4), 0.5)
    assert (p.out_dim, p.student_temp, p.teacher_temp, p.teacher_patch_temp, p.lambda1, p.lambda2) == \
        (8192, 0.1, 0.07, 0.07, 1.0, 1.0)
    assert (cfg.optim.name, cfg.optim.clip_mode, cfg.optim.weight_decay_end, cfg.backbone.name) == \
        ("adamw", "per_param", 0.4, "vit_small")
    assert (cfg.views.local_crops, cfg.views.crop_scale, cfg.views.local_crop_scale) == (10, (0.25, 1.0), (0.05, 0.25))
    big = load_config(["ibot_imagenet"])
    assert (big.method.out_dim, big.method.norm_last_layer, big.method.teacher_temp_warmup_epochs,
            big.backbone.name, big.backbone.patch_size, big.data.batch_size, big.train.epochs,
            big.views.local_crops) == (8192, False, 30, "vit_small", 16, 1024, 800, 10)
    small = load_config(["ibot_fashion_mnist"])
    assert small.backbone.name == "vit_tiny" and 28 % small.backbone.patch_size == 0 and small.views.size == 28


def test_short_training_on_real_images_resumes_exactly(tmp_path, fmnist_small):
    overrides = [f"{k}={v}" for k, v in {
        "method.name": "ibot", "method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16,
        "method.freeze_last_layer": 0.02, "backbone.name": "vit_tiny", "backbone.patch_size": 4,
        "backbone.depth": 1, "views.size": 28, "views.local_crops": 2, "views.local_size": 12,
        "data.batch_size": 16, "optim.warmup_epochs": 0, "optim.base_batch": 16, "train.steps": 4,
        "train.precision": "fp32", "train.progress": "false", "train.tensorboard": "false",
        "train.log_every": 1, "train.deterministic": "true", "train.checkpoint_every": 0}.items()]
    cfg = load_config(None, overrides)
    pretrain(cfg, tmp_path / "ref", dataset=fmnist_small)
    trainer = Trainer(cfg, tmp_path / "run", dataset=fmnist_small)        # stopped after 2 steps, as by SIGTERM
    step = trainer.hooks.after_step

    def stop_after_two(sched):
        step(sched)
        if sched["step"] == 1:
            trainer._stop_signal = signal.SIGTERM
    trainer.hooks = dataclasses.replace(trainer.hooks, after_step=stop_after_two)    # the engine calls its hooks
    assert trainer.fit()["steps"] == 2
    pretrain(cfg, tmp_path / "run", resume=True, dataset=fmnist_small)

    def rows(run):
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    ref, run = rows(tmp_path / "ref"), rows(tmp_path / "run")
    assert sorted(ref) == sorted(run) == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["ibot_patch_loss"]) for r in ref.values())
    assert all(run[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6) for s in (3, 4))
    wa = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and bool(wa["patch_center"].abs().sum() > 0)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7, msg=f"final weight {k}")
    model, _, _ = load_run(tmp_path / "run")                  # evaluation and export get the teacher
    assert model.backbone is model.teacher
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, wb[f"teacher.{k}"])
