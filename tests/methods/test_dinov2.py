"""DINOv2 on real Fashion-MNIST images: the iBOT term on masked patches only against the paper's
per-image formula, the three terms and their weights, KoLeo on the student's class tokens per
crop, both centerings, separate heads, the DINOv2 masking statistics, register tokens, the layer-wise
learning rates of the recipe, and the recipes."""
import math

import pytest
import torch

from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.backbones.features import backbone_features
from selfsight.backbones.vit import ViTBackbone
from selfsight.engine.optim import backbone_lr_scales
from selfsight.losses.dino import dino_loss, teacher_probs
from selfsight.losses.ibot import ibot_masked_loss, masked_rows
from selfsight.losses.koleo import koleo_loss
from selfsight.losses.sinkhorn import sinkhorn_knopp
from selfsight.methods.dinov2 import DINOv2, DINOv2Params
from selfsight.resolve import load_config
from selfsight.viz.pictures import cls_attention

SMALL = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def vit(depth=1, registers=0, patch=4):
    torch.manual_seed(0)
    return ViTBackbone("vit_tiny", img_size=28, patch_size=patch, in_chans=1, depth=depth, registers=registers)


def multicrop(images, n_local=2, local=12):
    recipe = ViewRecipe(size=28, crop_scale=(0.4, 1.0), local_crops=n_local, local_size=local,
                        local_crop_scale=(0.1, 0.4), mean=(0.5,), std=(0.5,))
    return BatchedViews(recipe, torch.Generator().manual_seed(0))(images)


def test_masked_patch_loss_is_the_per_image_mean_over_masked_patches_then_over_images():
    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        b, n, k = 2 + trial % 4, 3 + trial, 5
        masks = torch.rand(b, n, generator=g) < 0.4
        masks[0] = False                                                     # an unmasked image adds 0
        bound = int(masks.sum()) + trial % 3                                 # padding rows beyond the masked ones
        order, weight = masked_rows(masks, bound)
        assert order.shape == (min(bound, b * n),) and int((weight > 0).sum()) == int(masks.sum())
        assert torch.equal(order[:int(masks.sum())], masks.flatten().nonzero().flatten())   # row-major, first
        s = torch.randn(len(order), k, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.softmax(torch.randn(len(order), k, generator=g, dtype=torch.float64), -1)
        want, row = 0.0, 0
        for i in range(b):
            count, total = int(masks[i].sum()), 0.0
            for _ in range(count):
                log_q = s[row] / 0.1 - torch.logsumexp(s[row] / 0.1, 0)
                total = total - (t[row] * log_q).sum()
                row += 1
            want = want + total / max(count, 1)
        got = ibot_masked_loss(s, t, weight, b, 0.1)
        torch.testing.assert_close(got, want / b)
        got.backward()
        assert s.grad[int(masks.sum()):].abs().sum() == 0                    # padding rows: no gradient


def test_step_is_dino_plus_masked_ibot_plus_koleo_and_only_the_student_learns(fmnist_small):
    m = DINOv2(DINOv2Params(**SMALL), vit())
    views = multicrop(fmnist_small.images[:16])
    masks = m.make_masker()(views, 0)
    assert masks[2:] == [None, None] and all(int((x.sum(1) == 0).sum()) == 8 for x in masks[:2])
    out = m({"views": views, "masks": masks}, {"epoch": 0.0})
    mon = out["monitor"]
    want = mon["dinov2_dino_loss"] + mon["dinov2_ibot_loss"] + 0.1 * mon["dinov2_koleo_loss"]
    torch.testing.assert_close(out["loss"].detach(), want)
    # KoLeo: the student's class tokens of each masked global crop, separately
    g = torch.cat(views[:2])
    mask = torch.cat(masks[:2])
    cls = m.student.forward_features(g, mask).cls.detach()
    torch.testing.assert_close(mon["dinov2_koleo_loss"], koleo_loss(cls[:16]) + koleo_loss(cls[16:]))
    # the DINO term against the teacher's centred, sharpened class outputs, same view skipped
    with torch.no_grad():
        t_cls = m.teacher_head(m.teacher.forward_features(g).cls)
    assert m.center.abs().sum() > 0                                       # updated after the loss
    out["loss"].backward()
    assert all(p.grad is None for p in [*m.teacher.parameters(), *m.teacher_head.parameters()])
    assert m.student.mask_token.grad.abs().sum() > 0 and m.head.mlp[0].weight.grad.abs().sum() > 0
    fresh = DINOv2(DINOv2Params(**SMALL, koleo_weight=0, ibot_weight=0), vit())
    loss = fresh({"views": views, "masks": masks}, {"epoch": 0.0})["loss"]
    s_cls = fresh.head(torch.cat([fresh.student.forward_features(g, mask).cls,
                                  *[fresh.student(v) for v in views[2:]]])).chunk(4)
    torch.testing.assert_close(loss, dino_loss(list(s_cls), list(teacher_probs(t_cls, torch.zeros(1, 64), 0.04)
                                                               .chunk(2)), 0.1), rtol=1e-5, atol=1e-6)


def test_centers_follow_the_teacher_and_sinkhorn_replaces_them(fmnist_small):
    views = multicrop(fmnist_small.images[:16], n_local=0)
    m = DINOv2(DINOv2Params(**SMALL), vit())
    masks = m.make_masker()(views, 1)
    mask = torch.cat(masks[:2])
    with torch.no_grad():
        tf = m.teacher.forward_features(torch.cat(views[:2]))
        t_cls, t_patch = m.teacher_head(tf.cls), m.teacher_head(tf.patch[mask])
    m({"views": views, "masks": masks}, {"epoch": 0.0})
    torch.testing.assert_close(m.center, 0.1 * t_cls.mean(0, keepdim=True))
    torch.testing.assert_close(m.patch_center, 0.1 * t_patch.mean(0, keepdim=True))     # the masked patches'
    sk = DINOv2(DINOv2Params(**SMALL, centering="sinkhorn", koleo_weight=0, ibot_weight=0), vit())
    out = sk({"views": views, "masks": masks}, {"epoch": 0.0})
    assert sk.center.abs().sum() == 0 and sk.patch_center.abs().sum() == 0
    s = sk.head(sk.student.forward_features(torch.cat(views[:2]), mask).cls).chunk(2)
    torch.testing.assert_close(out["loss"], dino_loss(list(s), list(sinkhorn_knopp(t_cls, 0.04, 3).chunk(2)), 0.1),
                               rtol=1e-5, atol=1e-6)


def test_separate_heads_each_get_their_own_tokens(fmnist_small):
    m = DINOv2(DINOv2Params(**SMALL, separate_head=True, ibot_out_dim=48, ibot_hidden_dim=24), vit())
    assert m.ibot_head.last_layer.weight.shape == (48, 16) and m.patch_center.shape == (1, 48)
    views = multicrop(fmnist_small.images[:16], n_local=0)
    masks = m.make_masker()(views, 0)
    only_ibot = DINOv2(DINOv2Params(**SMALL, separate_head=True, dino_weight=0, koleo_weight=0), vit())
    only_ibot({"views": views, "masks": masks}, {"epoch": 0.0})["loss"].backward()
    assert only_ibot.head.mlp[0].weight.grad is None or only_ibot.head.mlp[0].weight.grad.abs().sum() == 0
    assert only_ibot.ibot_head.mlp[0].weight.grad.abs().sum() > 0
    out = m({"views": views, "masks": masks}, {"epoch": 0.0})
    out["loss"].backward()
    assert m.head.mlp[0].weight.grad.abs().sum() > 0 and m.ibot_head.mlp[0].weight.grad.abs().sum() > 0
    # the last layers of both heads stay frozen during the first epoch; the EMA covers both teachers
    m.before_optimizer_step({"epoch": 0.5})
    assert all(p.grad is None for h in (m.head, m.ibot_head) for p in h.last_layer.parameters())
    before = m.teacher_ibot_head.mlp[0].weight.clone()
    with torch.no_grad():
        m.ibot_head.mlp[0].weight.add_(1.0)
    m.after_step({"momentum": 0.5})
    torch.testing.assert_close(m.teacher_ibot_head.mlp[0].weight, 0.5 * before + 0.5 * m.ibot_head.mlp[0].weight)


def test_masks_have_dinov2s_statistics():
    """On a 14×14 grid (ViT-S/16 at 224 px): half of each crop's images masked, each masked image's
    ratio spread over [0.1, 0.5] (mean 0.3), blocks of at least 4 and at most half the grid."""
    m = DINOv2(DINOv2Params(**SMALL), ViTBackbone("vit_tiny", img_size=56, patch_size=4, in_chans=1, depth=1))
    gen = m.masker.generator
    assert (gen.kind, gen.ratio_range, gen.unmasked_share, gen.min_patches, gen.max_patches) == \
        ("block", (0.1, 0.5), 0.5, 4, 98)
    views = [torch.zeros(64, 1, 56, 56)] * 2
    ratios = []
    for seed in range(8):
        drawn = m.masker(views, seed)
        assert sum(int(x.sum()) for x in drawn) <= m._masked_bound(64, 196)    # the iBOT rows hold them all
        for x in drawn:
            per_image = x.float().mean(1)
            assert int((per_image == 0).sum()) == 32
            ratios += per_image[per_image > 0].tolist()
    ratios = torch.tensor(ratios)
    assert 0.07 <= ratios.min() < 0.15 and 0.45 < ratios.max() <= 0.51
    assert abs(ratios.mean().item() - 0.3) < 0.03 and abs(ratios.std().item() - 0.4 / math.sqrt(12)) < 0.03


def test_register_tokens_are_never_patch_tokens(fmnist_small):
    reg = vit(depth=2, registers=4)
    assert reg.net.num_prefix_tokens == 5
    x = (fmnist_small.images[:4].float() / 255)
    f = reg.forward_features(x)
    assert f.patch.shape == (4, 49, 192)
    tokens = reg.net.norm(reg.net.blocks(reg._embed(x)))                 # B×(1+4+49)×D
    torch.testing.assert_close(f.cls, tokens[:, 0])
    torch.testing.assert_close(f.patch, tokens[:, 5:])
    torch.testing.assert_close(backbone_features(reg, "mean")(x), tokens[:, 5:].mean(1))
    last = backbone_features(reg, "last2+mean")(x)                      # 2 class tokens + the mean patch token
    torch.testing.assert_close(last[:, -192:], tokens[:, 5:].mean(1))
    assert cls_attention(reg, x).shape == (4, 3, 7, 7)                 # pictures: the patches' attention only
    m = DINOv2(DINOv2Params(**SMALL), reg)                               # trains with them
    views = multicrop(fmnist_small.images[:8], n_local=0)
    m({"views": views}, {"epoch": 0.0})["loss"].backward()
    assert m.student.net.reg_token.grad.abs().sum() > 0
    sincos = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=1, registers=2, pos_embed="sincos")
    assert sincos.net.pos_embed[0, :3].abs().sum() == 0 and sincos.net.pos_embed[0, 3:].abs().sum() > 0


def test_layer_decay_and_patch_embedding_learning_rates():
    v = vit(depth=2)
    scales = {n: s for n, p in v.named_parameters() for i, s in backbone_lr_scales(v, 1.0, 0.9, 0.2).items()
              if i == id(p)}
    assert scales["net.blocks.1.attn.qkv.weight"] == pytest.approx(0.9)
    assert scales["net.blocks.0.mlp.fc1.weight"] == pytest.approx(0.81)
    assert scales["net.cls_token"] == pytest.approx(0.729) and scales["net.pos_embed"] == pytest.approx(0.729)
    assert scales["net.patch_embed.proj.weight"] == pytest.approx(0.729 * 0.2)
    assert scales["net.norm.weight"] == 1.0
    assert backbone_lr_scales(v) == {}
    doubled = backbone_lr_scales(v, 2.0, 0.9)
    assert max(doubled.values()) == 2.0
    from selfsight.backbones.resnet import ResNetBackbone
    with pytest.raises(ValueError, match="need a ViT backbone"):
        backbone_lr_scales(ResNetBackbone("resnet10", in_chans=1, width=8), 1.0, 0.9)


def test_refuses_what_it_cannot_train():
    from selfsight.backbones.resnet import ResNetBackbone
    with pytest.raises(ValueError, match="ViT backbone"):
        DINOv2(DINOv2Params(**SMALL), ResNetBackbone("resnet10", in_chans=1, width=8))
    with pytest.raises(ValueError, match="global crops only"):
        p = DINOv2Params(**SMALL)
        p.mask.views = (2,)
        DINOv2(p, vit())
    m = DINOv2(DINOv2Params(**SMALL), vit())
    with pytest.raises(ValueError, match="at least two views"):
        m({"views": [torch.zeros(2, 1, 28, 28)]}, {"epoch": 0.0})


def test_config_defaults_and_recipes():
    cfg = load_config(None, ["method.name=dinov2"])
    p = cfg.method
    assert (p.out_dim, p.koleo_weight, p.centering, p.momentum, p.teacher_temp, p.separate_head,
            p.mask.ratio_range, p.mask.unmasked_share, p.mask.min_patches) == \
        (65536, 0.1, "center", 0.992, 0.07, False, (0.1, 0.5), 0.5, 4)
    assert (cfg.optim.lr, cfg.optim.lr_scaling, cfg.optim.base_batch, cfg.optim.layer_decay,
            cfg.optim.patch_embed_lr_scale, cfg.optim.clip_grad) == (4e-3, "sqrt", 1024, 0.9, 0.2, 3.0)
    assert (cfg.backbone.layer_scale, cfg.backbone.drop_path, cfg.views.local_crops) == (1e-5, 0.3, 8)
    small = load_config(["dinov2_fashion_mnist"])
    assert small.backbone.name == "vit_tiny" and 28 % small.backbone.patch_size == 0
    recipes = (("dinov2_vits16_imagenet", "vit_small", False), ("dinov2_vitb16_imagenet", "vit_base", False),
               ("dinov2_vitl14_imagenet", "vit_large", True))
    for name, arch, heads in recipes:
        big = load_config([name])
        assert (big.backbone.name, big.method.separate_head, big.train.fsdp) == (arch, heads, arch == "vit_large")
        assert big.method.centering == ("sinkhorn" if heads else "center")
