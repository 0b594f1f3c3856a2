"""I-JEPA: the loss against a reference written from the paper over the target blocks only, the
student seeing the context patches alone, no gradient into the target encoder, the EMA after the
step, the mean-token features, the recipe and the pictures, on real Fashion-MNIST images."""
import pytest
import torch
import torch.nn.functional as F
from helpers import normalized

from selfsight.backbones.vit import ViTBackbone
from selfsight.methods.ijepa import IJEPA, IJEPAParams


def make(**kw) -> IJEPA:
    torch.manual_seed(0)
    p = IJEPAParams(predictor_dim=32, predictor_depth=1, predictor_heads=2, **kw)
    return IJEPA(p, ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=2, class_token=False))


@pytest.fixture(scope="module")
def images(fmnist):
    return normalized(fmnist)[:16]


def test_loss_is_the_mean_over_blocks_of_each_blocks_mean_squared_error(images):
    model = make()
    x = images
    context, targets = model.masker([x], seed=3)[0]
    out = model.training_step({"views": [x], "masks": [(context, targets)]}, {})
    with torch.no_grad():
        pred, _, _ = model.predict(x, context, targets)                                  # B×M×Kt×D
        tokens = model.teacher.forward_features(x).patch                                 # B×N×D, whole image
        s = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
    b, m, kt = targets.shape
    # Eq. 1: (1/M) Σ_i Σ_{j ∈ B_i} ||ŝ_j − s_j||², here each block's mean over its patches and dimensions,
    # averaged over blocks and images, written as loops over the blocks' patch indices
    per_block = torch.zeros(b, m)
    for i in range(b):
        for k in range(m):
            errs = [(pred[i, k, j] - s[i, int(targets[i, k, j])]).pow(2).mean() for j in range(kt)]
            per_block[i, k] = torch.stack(errs).mean()
    assert out["loss"].item() == pytest.approx(per_block.mean().item(), rel=1e-5)
    smooth = make(loss="smooth_l1").training_step({"views": [x], "masks": [(context, targets)]}, {})["loss"]
    assert smooth.item() < out["loss"].item()                                            # |e| < 1: smooth-l1 < l2


def test_the_student_sees_the_context_patches_only(images):
    model = make().eval()
    x = images[:4]
    context, targets = model.masker([x], seed=5)[0]
    outside = torch.ones(4, 49, dtype=torch.bool).scatter_(1, context, False)          # B×N, True off context
    noise = torch.randn_like(x) * outside.view(4, 1, 7, 7).repeat_interleave(4, 2).repeat_interleave(4, 3)
    with torch.no_grad():
        a, _, _ = model.predict(x, context, targets)
        b, _, _ = model.predict(x + noise, context, targets)
        c, _, _ = model.predict(x + noise.roll(1, 0).abs() + 1, context, targets)
    torch.testing.assert_close(a, b)                                                    # other patches: no effect
    assert not torch.allclose(a, c)


def test_only_the_student_and_predictor_learn_and_the_ema_follows_the_step(images):
    model = make()
    out = model.training_step({"views": [images]}, {})
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert model.student.net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.predictor.mask_token.grad.abs().sum() > 0
    before = {k: v.clone() for k, v in model.teacher.named_parameters()}
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.1)                                                                 # as an optimizer step would
    model.after_step({"momentum": 0.9})
    student = dict(model.student.named_parameters())
    for k, t in model.teacher.named_parameters():                                       # θ̄ <- m·θ̄ + (1 − m)·θ
        torch.testing.assert_close(t, 0.9 * before[k] + 0.1 * student[k], msg=k)
    assert len(before) > 20
    assert model.schedules() == {"momentum": (0.996, 1.0)}


def test_features_are_the_mean_of_the_targets_final_tokens_and_the_backbone_is_the_teacher(images):
    model = make()
    assert model.backbone is model.teacher
    with torch.no_grad():
        f = model.backbone.forward_features(images[:4])
    torch.testing.assert_close(f.cls, f.patch.mean(1))
    assert model.backbone.net.cls_token is None


def test_recipe_pictures_and_refusals(images):
    from selfsight.methods import build_method
    from selfsight.resolve import load_config
    cfg = load_config(["ijepa_fashion_mnist"], [])
    assert (cfg.backbone.class_token, cfg.views.flip_p, cfg.views.n_views) == (False, 0.0, 1)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.method.momentum) == (0.04, 0.4, 0.996)
    assert tuple(cfg.method.mask.target_scale) == (0.15, 0.2) and cfg.method.mask.targets == 4
    pics = make().pictures({"views": [images]}, n=4)
    assert tuple(pics["ijepa_blocks"].shape[:1]) == (3,)
    with pytest.raises(Exception, match="ViT"):
        build_method(load_config(None, ["method.name=ijepa", "backbone.name=resnet18"]), 1, 28)
    with pytest.raises(ValueError, match="method.mask.target_scale"):
        make(mask=type(IJEPAParams().mask)(target_scale=(0.3, 0.1)))
