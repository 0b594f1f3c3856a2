"""The worker half of the hybrid path: a decoded image -> one uint8 RandomResizedCrop per view.

DataLoader workers decode and crop (the only steps that need the full-size image); the rest of
the recipe (flip, colour, blur, solarize, normalize) runs batched on the training device
(``BatchedViews.finish``). Crop boxes are drawn as torchvision's RandomResizedCrop draws them
(``sample_crop_boxes``) from a generator seeded per sample, so a view depends only on
(run seed, epoch, sample) and not on the worker that made it: runs are reproducible for any
number of workers and resume exactly mid-epoch.
"""
from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from selfsight.augment.batched import sample_crop_boxes
from selfsight.augment.views import ViewRecipe

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, key: int) -> int:
    """The crop seed of sample ``key`` (its index, or its position in a shard stream) in an epoch."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + key) & _MASK


class WorkerCrops:
    """PIL image -> ``total_views`` uint8 tensors (``n_views`` of C×S×S, then the local crops at
    their own size): the crop box of each view (its scale and ratio) resized with PIL's bilinear
    filter, as ``T.RandomResizedCrop(antialias=True)`` does to a PIL image."""

    def __init__(self, recipe: ViewRecipe, channels: int = 3):
        self.views = [recipe.for_view(i) for i in range(recipe.total_views)]
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, image: Image.Image, seed: int) -> list[torch.Tensor]:
        if image.mode != self.mode:
            image = image.convert(self.mode)
        g = torch.Generator().manual_seed(seed)
        w, h = image.size
        out = []
        for r in self.views:
            x0, y0, x1, y1 = sample_crop_boxes(1, h, w, r.crop_scale, r.crop_ratio, g)[0].tolist()
            crop = image.resize((r.size, r.size), Image.BILINEAR, box=(x0, y0, x1, y1))
            out.append(TF.pil_to_tensor(crop))                  # uint8 C×S×S
        return out
