"""SimCLR-style view recipe (Chen et al. 2020a, Appendix A; methods.md §0.6, §1).

random resized crop -> flip -> colour jitter (b, c, s = 0.8s, h = 0.2s, random order, p)
-> grayscale (p) -> Gaussian blur (p, sigma ~ U(0.1, 2), kernel ~10 % of the side)
-> solarize (p) -> normalize.

Per-view differences (BYOL / MoCo v3: blur p 1.0 / 0.1, solarize p 0 / 0.2) come from
``view_blur_p`` / ``view_solarize_p``; explicit jitter values (MoCo: (0.4, 0.4, 0.4, 0.1))
from ``jitter_values``, which replace the strength rule.

Two presets: ``small`` (28-32 px images: no blur, as the SimCLR CIFAR recipe) and
``imagenet`` (224 px, blur p 0.5). Two interchangeable implementations draw the same
distribution: ``build_per_sample_views`` (torchvision transforms v2, one image at a time,
for DataLoader workers) and ``augment.batched.BatchedViews`` (a whole uint8 batch on the
training device, per-sample random parameters).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torchvision.transforms.v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS = {
    "small": {"size": 32, "blur_p": 0.0},
    "imagenet": {"size": 224, "blur_p": 0.5},
}


# Named view recipes of the papers, as config trees that methods merge into their defaults.
# BYOL (Grill et al. 2020, utils/augmentations.py): asymmetric blur and solarize (also MoCo v3,
# Barlow Twins, VICReg). MoCo v2 "aug+" (Chen et al. 2020c; also SimSiam): blur p 0.5 at 224 px.
BYOL_VIEWS = {"crop_scale": [0.08, 1.0], "jitter": [0.4, 0.4, 0.2, 0.1], "jitter_p": 0.8,
              "view_blur_p": [1.0, 0.1], "view_solarize_p": [0.0, 0.2]}
# DINO (Caron et al. 2021, main_dino.py:DataAugmentationDINO): BYOL's two global crops at scale
# 0.4-1 plus 8 local crops (0.05-0.4, blur p 0.5).
DINO_VIEWS = {**BYOL_VIEWS, "crop_scale": [0.4, 1.0], "local_crops": 8, "local_crop_scale": [0.05, 0.4],
              "local_blur_p": 0.5}
MOCO_V2_VIEWS = {"crop_scale": [0.2, 1.0], "jitter": [0.4, 0.4, 0.4, 0.1], "jitter_p": 0.8}


@dataclass(frozen=True)
class ViewRecipe:
    """Resolved recipe parameters (no "auto" left); built from config.ViewsConfig."""
    size: int
    n_views: int = 2
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_strength: float = 1.0
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    jitter_values: tuple = ()          # explicit (brightness, contrast, saturation, hue); () = strength rule
    view_blur_p: tuple = ()            # per-view blur p (view i uses entry i mod len); () = blur_p
    view_solarize_p: tuple = ()        # per-view solarize p; () = solarize_p
    local_crops: int = 0               # multi-crop (SwAV / DINO): extra small views after the n_views
    local_size: int = 96
    local_crop_scale: tuple = (0.05, 0.4)
    local_blur_p: float = 0.5

    @property
    def total_views(self) -> int:
        return self.n_views + self.local_crops

    @property
    def jitter(self) -> tuple[float, float, float, float]:
        if self.jitter_values:
            return tuple(float(v) for v in self.jitter_values)
        s = self.jitter_strength
        return 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s

    def for_view(self, i: int) -> "ViewRecipe":
        """The recipe of view ``i`` (per-view blur and solarize resolved; views from ``n_views`` on
        are the local crops: their own size, crop scale and blur, no solarize, as DINO)."""
        if i >= self.n_views:
            return replace(self, size=self.local_size, crop_scale=tuple(self.local_crop_scale),
                           blur_p=self.local_blur_p, solarize_p=0.0, view_blur_p=(), view_solarize_p=(),
                           local_crops=0)
        blur = self.view_blur_p[i % len(self.view_blur_p)] if self.view_blur_p else self.blur_p
        sol = self.view_solarize_p[i % len(self.view_solarize_p)] if self.view_solarize_p else self.solarize_p
        return replace(self, blur_p=float(blur), solarize_p=float(sol), view_blur_p=(), view_solarize_p=())

    @property
    def blur_kernel(self) -> int:
        k = max(3, int(round(0.1 * self.size)))
        return k + 1 - k % 2          # odd


def default_normalization(channels: int) -> tuple[tuple, tuple]:
    """(mean, std) of the views: ImageNet statistics for RGB, 0.5/0.5 for other channel counts."""
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)


def auto_views(short_side: int) -> tuple[str, int]:
    """``views.preset=auto``: (preset, view size) for images of this typical short side. Small
    images (<= 64 px) take the ``small`` preset at 32 px (64 px from 49 px up); medium ones the
    ``imagenet`` preset at their own size rounded up to 16 px (STL-10's 96 px stays 96); 224 px and
    larger the ImageNet recipe at 224. Images are never trained far above their own size."""
    if short_side <= 64:
        return "small", 32 if short_side <= 48 else 64
    if short_side < 224:
        return "imagenet", -(-short_side // 16) * 16
    return "imagenet", PRESETS["imagenet"]["size"]


def resolve_recipe(views_cfg, image_size: int, channels: int) -> ViewRecipe:
    """Fill "auto" fields from the data (``image_size``: the images' typical short side, see
    ``auto_views``); an explicit ``views.size`` wins over the preset's."""
    preset, size = views_cfg.preset, 0
    if preset == "auto":
        preset, size = auto_views(image_size)
    if preset not in PRESETS:
        raise ValueError(f"unknown views preset {preset!r}; choose auto, {', '.join(PRESETS)}")
    p = PRESETS[preset]
    blur_p = p["blur_p"] if views_cfg.blur_p < 0 else views_cfg.blur_p
    if len(views_cfg.jitter) not in (0, 4):
        raise ValueError(f"views.jitter must be [brightness, contrast, saturation, hue], got {list(views_cfg.jitter)}")
    mean, std = default_normalization(channels)
    size = views_cfg.size or size or p["size"]
    local_size = views_cfg.local_size or max(8, round(size * 96 / 224))        # DINO: 96 px beside 224
    local_blur = (0.5 if blur_p > 0 else 0.0) if views_cfg.local_blur_p < 0 else views_cfg.local_blur_p
    return ViewRecipe(
        local_crops=views_cfg.local_crops, local_size=local_size, local_crop_scale=tuple(views_cfg.local_crop_scale),
        local_blur_p=local_blur,
        size=size, n_views=views_cfg.n_views, crop_scale=tuple(views_cfg.crop_scale),
        flip_p=views_cfg.flip_p, jitter_strength=views_cfg.jitter_strength, jitter_p=views_cfg.jitter_p,
        gray_p=views_cfg.gray_p, blur_p=blur_p, solarize_p=views_cfg.solarize_p, mean=mean, std=std,
        jitter_values=tuple(views_cfg.jitter),
        # per-view blur only where blurring is on (the small preset never blurs unless blur_p is set)
        view_blur_p=tuple(views_cfg.view_blur_p) if blur_p > 0 else (),
        view_solarize_p=tuple(views_cfg.view_solarize_p))


def build_per_sample_views(recipe: ViewRecipe, channels: int = 3):
    """A callable: one image (PIL or uint8 C×H×W tensor) -> list of ``total_views`` float tensors
    (``n_views`` of C×S×S, then the local crops)."""
    per_view = [_one_view_transform(recipe.for_view(i), channels) for i in range(recipe.total_views)]

    def make_views(image):
        return [t(image) for t in per_view]
    return make_views


def _one_view_transform(recipe: ViewRecipe, channels: int):
    b, c, s, h = recipe.jitter
    ops = [T.ToImage(),
           T.RandomResizedCrop(recipe.size, scale=recipe.crop_scale, ratio=recipe.crop_ratio, antialias=True),
           T.RandomHorizontalFlip(recipe.flip_p)]
    if recipe.jitter_p > 0 and any(v > 0 for v in recipe.jitter):
        ops.append(T.RandomApply([T.ColorJitter(b, c, s if channels == 3 else 0, h if channels == 3 else 0)],
                                 p=recipe.jitter_p))
    if recipe.gray_p > 0 and channels == 3:
        ops.append(T.RandomGrayscale(recipe.gray_p))
    if recipe.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(recipe.blur_kernel, sigma=(0.1, 2.0))], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=recipe.solarize_p))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(recipe.mean, recipe.std)]
    return T.Compose(ops)
