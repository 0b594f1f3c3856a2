"""Masks for a batch of views, made when the batch is assembled (collate time).

``ViewMasker`` holds one ``MaskGenerator`` and the patch size, and masks the views listed in
``views`` (the others get ``None``): each view's grid is its size // patch. Masks are drawn
from an integer seed that the loader derives from (run seed, epoch, step, rank), so a resumed
run, another worker or another process layout regenerates exactly the same masks.
"""
from __future__ import annotations

import torch

from selfsight.masking.generators import MaskGenerator
from selfsight.nn.device import to_device


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit seed unique to (run seed, epoch, step in epoch, rank)."""
    return (((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1_009 + rank) % (2 ** 63)


def patch_grid(size: tuple, patch_size: int) -> tuple[int, int]:
    """The patch grid of an H×W view, or one line saying the view size must be a multiple of the patch."""
    h, w = size
    if h % patch_size or w % patch_size:
        raise ValueError(f"a {h}×{w} view is not divisible into {patch_size}-pixel patches: choose "
                         f"views.size as a multiple of the backbone's patch size {patch_size}")
    return h // patch_size, w // patch_size


class ViewMasker:
    def __init__(self, generator: MaskGenerator, patch_size: int, views: tuple = (0,)):
        self.generator, self.patch_size, self.views = generator, patch_size, tuple(views)

    def grid(self, size: tuple) -> tuple[int, int]:
        return patch_grid(size, self.patch_size)

    def __call__(self, views: list[torch.Tensor], seed: int) -> list[torch.Tensor | None]:
        """V views B×C×H×W -> V masks B×N bool (True = masked) on the views' device, or None."""
        masks: list[torch.Tensor | None] = []
        for i, v in enumerate(views):
            if i not in self.views:
                masks.append(None)
                continue
            gh, gw = self.grid(v.shape[-2:])
            masks.append(to_device(self.generator(v.shape[0], gh, gw, seed * 31 + i), v.device))
        return masks


def build_masker(mask, patch_size: int, views: tuple, min_patches: int | None = None,
                 max_patches: int | None = None) -> ViewMasker:
    """The ``ViewMasker`` of a method's ``method.mask`` section (``MaskParams``) for ``views``;
    ``min_patches`` / ``max_patches`` override the section's (iBOT's and DINOv2's defaults depend on
    the grid). An invalid value is one line naming the config key."""
    try:
        generator = MaskGenerator(mask.kind, mask.ratio, tuple(mask.ratio_range), mask.unmasked_share,
                                  mask.min_patches if min_patches is None else min_patches,
                                  mask.max_patches if max_patches is None else max_patches,
                                  tuple(mask.aspect))
    except ValueError as e:                     # the generator names the argument: name the config key
        raise ValueError(f"method.mask.{e}") from None
    return ViewMasker(generator, patch_size, views)
