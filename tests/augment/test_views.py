"""View recipes: the batched (device) path draws torchvision's distribution, per sample."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_area

from selfsight.augment import BatchedViews, ViewRecipe, build_per_sample_views, resolve_recipe
from selfsight.augment.batched import gaussian_blur, resized_crop, sample_crop_boxes
from selfsight.config import ViewsConfig


def test_crop_boxes_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(20000, 28, 28, (0.2, 1.0), (3 / 4, 4 / 3), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 28).all() and (boxes[:, 3] <= 28).all()
    frac = box_area(boxes) / (28 * 28)
    assert frac.min() >= 0.2 * 0.8 and frac.max() <= 1.0          # rounding to whole pixels
    ratio = w / h
    assert ratio.min() >= 0.6 and ratio.max() <= 1.7
    assert 0.5 < frac.mean() < 0.7                                # ≈ mean of U(0.2, 1) minus rejected draws
    assert len(torch.unique(boxes, dim=0)) > 1000                  # per sample, not per batch


def test_impossible_ratio_falls_back_to_the_central_crop():
    boxes = sample_crop_boxes(8, 10, 100, (0.9, 1.0), (1.0, 1.0))
    assert torch.equal(boxes[0], torch.tensor([45.0, 0.0, 55.0, 10.0]))


def test_full_box_crop_equals_plain_bilinear_resize(fmnist_small):
    x = fmnist_small.images[:4].float() / 255
    box = torch.tensor([[0.0, 0.0, 28.0, 28.0]]).repeat(4, 1)
    up = resized_crop(x, box, 56)
    ref = F.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ref, atol=1e-5, rtol=0)


def test_batched_views_shapes_flip_rate_and_per_sample_jitter(fmnist_small):
    r = ViewRecipe(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.5, jitter_p=1.0,
                   mean=(0.5,), std=(0.5,))
    views = BatchedViews(r, torch.Generator().manual_seed(0))(fmnist_small.images[:512])
    assert len(views) == 2 and views[0].shape == (512, 1, 32, 32)
    assert not torch.equal(views[0], views[1])
    # brightness/contrast factors differ per image: per-image means spread out
    plain = BatchedViews(ViewRecipe(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                                    mean=(0.5,), std=(0.5,)))(fmnist_small.images[:512])[0]
    assert (views[0].mean((1, 2, 3)) - plain.mean((1, 2, 3))).std() > 0.05
    r2 = ViewRecipe(size=28, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.5, jitter_p=0.0,
                    mean=(0.0,), std=(1.0,))
    x = fmnist_small.images[:2000]
    v = BatchedViews(r2, torch.Generator().manual_seed(1)).one_view(x)
    flipped = (v - x.float().flip(-1) / 255).abs().amax((1, 2, 3)) < 1e-5
    same = (v - x.float() / 255).abs().amax((1, 2, 3)) < 1e-5
    assert (flipped | same).all() and 0.45 < flipped.float().mean() < 0.55


def test_rgb_jitter_grayscale_solarize_and_blur_on_real_cifar_like_data():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    r = ViewRecipe(size=32, gray_p=1.0, jitter_p=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                   mean=(0, 0, 0), std=(1, 1, 1))
    v = BatchedViews(r, g).one_view(x)
    assert torch.allclose(v[:, 0], v[:, 1]) and torch.allclose(v[:, 1], v[:, 2])        # all gray
    r = ViewRecipe(size=32, gray_p=0.0, jitter_p=0.0, solarize_p=1.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                   flip_p=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    v = BatchedViews(r, g).one_view(x)
    assert v.max() < 0.5 + 1e-6                                                           # solarized above 0.5
    hue = BatchedViews(ViewRecipe(size=32, jitter_strength=1.0, jitter_p=1.0, mean=(0, 0, 0), std=(1, 1, 1)), g)
    assert torch.isfinite(hue.one_view(x)).all() and hue.one_view(x).min() >= 0 and hue.one_view(x).max() <= 1
    img = torch.zeros(2, 1, 15, 15)
    img[:, :, 7, 7] = 1
    out = gaussian_blur(img, torch.tensor([0.5, 2.0]), 9)
    assert out[0].sum() == pytest.approx(1.0, abs=1e-4) and out[0, 0, 7, 7] > out[1, 0, 7, 7]


def test_batched_and_per_sample_paths_agree_in_distribution(fmnist_small):
    r = ViewRecipe(size=28, crop_scale=(0.3, 1.0), mean=(0.5,), std=(0.5,))
    x = fmnist_small.images[:1024]
    batched = torch.cat(BatchedViews(r, torch.Generator().manual_seed(0))(x))
    torch.manual_seed(0)
    per = build_per_sample_views(r, channels=1)
    single = torch.stack([v for img in x for v in per(img)])
    for stat in (lambda t: t.mean(), lambda t: t.std(), lambda t: (t > 0).float().mean()):
        assert stat(batched).item() == pytest.approx(stat(single).item(), abs=0.03)


def test_presets_resolve_from_the_data():
    small = resolve_recipe(ViewsConfig(), 28, 1)
    assert small.size == 32 and small.blur_p == 0.0 and small.mean == (0.5,)
    big = resolve_recipe(ViewsConfig(), 500, 3)
    assert big.size == 224 and big.blur_p == 0.5 and big.blur_kernel % 2 == 1
    with pytest.raises(ValueError, match="preset"):
        resolve_recipe(ViewsConfig(preset="huge"), 28, 1)
    assert math.isclose(small.jitter[0], 0.8)


def test_per_view_blur_and_solarize_and_explicit_jitter_resolve():
    cfg = ViewsConfig(n_views=3, jitter=(0.4, 0.4, 0.2, 0.1), view_blur_p=(1.0, 0.1), view_solarize_p=(0.0, 0.2))
    big = resolve_recipe(cfg, 500, 3)
    assert big.jitter == (0.4, 0.4, 0.2, 0.1)
    assert [(big.for_view(i).blur_p, big.for_view(i).solarize_p) for i in range(3)] == \
        [(1.0, 0.0), (0.1, 0.2), (1.0, 0.0)]                     # entries cycle over more views
    small = resolve_recipe(cfg, 28, 1)                           # small images: no blur, solarize kept
    assert [(small.for_view(i).blur_p, small.for_view(i).solarize_p) for i in range(2)] == [(0.0, 0.0), (0.0, 0.2)]
    with pytest.raises(ValueError, match="brightness"):
        resolve_recipe(ViewsConfig(jitter=(0.4, 0.4)), 28, 1)


@pytest.mark.parametrize("batched", [True, False])
def test_views_differ_as_the_recipe_says(fmnist_small, batched):
    """View 1 never solarized, view 2 always; no other randomness (full crops, no flip/jitter)."""
    recipe = ViewRecipe(size=28, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                        gray_p=0.0, mean=(0.0,), std=(1.0,), view_solarize_p=(0.0, 1.0))
    images = fmnist_small.images[:8]
    if batched:
        v1, v2 = BatchedViews(recipe, torch.Generator().manual_seed(0))(images)
    else:
        make = build_per_sample_views(recipe, channels=1)
        pairs = [make(img) for img in images]
        v1, v2 = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    x = images.float() / 255
    torch.testing.assert_close(v1, x, atol=1e-6, rtol=0)
    sol = torch.where(images >= 128, 255 - images, images).float() / 255
    torch.testing.assert_close(v2, sol, atol=1.5 / 255, rtol=0)


@pytest.mark.parametrize("batched", [True, False])
def test_multi_crop_gives_global_then_local_views(fmnist_small, batched):
    recipe = resolve_recipe(ViewsConfig(size=28, local_crops=3, local_size=12), 28, 1)
    assert recipe.total_views == 5 and recipe.for_view(3).crop_scale == (0.05, 0.4)
    assert recipe.for_view(4).solarize_p == 0.0 and recipe.for_view(0).size == 28
    images = fmnist_small.images[:6]
    if batched:
        views = BatchedViews(recipe, torch.Generator().manual_seed(0))(images)
    else:
        make = build_per_sample_views(recipe, channels=1)
        per_image = [make(img) for img in images]
        views = [torch.stack([p[i] for p in per_image]) for i in range(5)]
    assert [tuple(v.shape) for v in views] == [(6, 1, 28, 28)] * 2 + [(6, 1, 12, 12)] * 3
    big = resolve_recipe(ViewsConfig(local_crops=2), 500, 3)
    assert big.local_size == 96 and big.for_view(2).blur_p == 0.5 and big.for_view(2).blur_kernel == 11
