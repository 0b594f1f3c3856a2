"""Labeled dense data: images with a class per pixel (and boxes), held in memory.

``DenseArrays`` is an ``ArrayDataset`` (so it also pretrains, unlabeled) with ``masks`` (N×H×W
uint8 class ids, ``IGNORE`` = not scored) and ``boxes`` (per image ``k×5``: x0, y0, x1, y1 in
pixels, x1/y1 exclusive, then the class id). ``fashion_mnist_scenes`` builds the built-in
``fashion-mnist-scenes`` set from Fashion-MNIST garments; ``data/masks.py`` reads a user's
``images/`` + ``masks/`` folder into the same form.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from selfsight.data.arrays import ArrayDataset

IGNORE = 255                # the mask value that is not scored (the common convention: VOC, ADE20k, mmseg)


class DenseArrays(ArrayDataset):
    """``ArrayDataset`` plus ``masks`` (N×H×W uint8) and ``boxes`` (list of k×5 float tensors);
    ``classes`` names the mask ids (id 0 first); ``skipped`` counts the files left out."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, boxes: list[torch.Tensor] | None = None,
                 name: str = "", classes: list[str] | None = None, skipped: int = 0):
        super().__init__(images, None, name=name, classes=classes)
        if masks.dtype != torch.uint8 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"masks must be uint8 N×H×W matching the images {tuple(images.shape)}, "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        self.masks = masks.contiguous()
        self.boxes = boxes if boxes is not None else [torch.zeros(0, 5) for _ in range(len(images))]
        self.skipped = skipped


def resized(data: DenseArrays, size: int) -> DenseArrays:
    """``data`` at ``size``×``size`` px (``resize_images``, ``resize_masks``), boxes scaled."""
    scale_y, scale_x = size / data.images.shape[-2], size / data.images.shape[-1]
    scale = torch.tensor([scale_x, scale_y, scale_x, scale_y, 1.0])
    return DenseArrays(resize_images(data.images, size), resize_masks(data.masks, size),
                       [b * scale for b in data.boxes], name=data.name, classes=data.classes, skipped=data.skipped)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N×C×H×W -> N×C×size×size, bilinear with antialiasing."""
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 class ids N×H×W -> N×size×size, nearest (ids are never blended)."""
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0].to(torch.uint8)


# --------------------------------------------------------------------------------------------
# fashion-mnist-scenes

SCENE_SIZE = 56             # 2 x 28: a 14x14 grid for 4 px ViT patches, 8x8 for 7 px, 7x7 for a ResNet at stride 8
SCENE_COUNTS = {"train": 5000, "test": 1000}
SCENE_SEEDS = {"train": 0, "test": 1}
GARMENTS_PER_SCENE = (2, 4)      # inclusive
GARMENT_SIDE = (18, 32)          # px, inclusive: a Fashion-MNIST garment (28 px) shrunk or enlarged
MAX_OVERLAP = 0.25               # a new garment's box covers at most this share of any earlier box (and vice versa)
FOREGROUND = 24                  # a garment pixel brighter than this is the garment's; the background stays below
BACKGROUND_MAX = 24              # a smooth, dim background (not plain black): intensity alone must not give the class


def make_scenes(garments: torch.Tensor, garment_labels: torch.Tensor, n: int, seed: int, size: int = SCENE_SIZE,
                class_names: list[str] | None = None, name: str = "scenes") -> DenseArrays:
    """``n`` scenes of several garments on a ``size``-pixel canvas, drawn with ``seed``
    (deterministic: the same arguments give the same tensors).

    Each scene: a smooth dim background (a 7×7 noise field upsampled, below ``BACKGROUND_MAX``),
    then 2-4 garments drawn from ``garments`` (uint8 N×1×28×28), each resized to a side of 18-32
    px and placed where its box overlaps no earlier box by more than ``MAX_OVERLAP`` of either
    box (up to 20 tries, else the scene keeps fewer). Later garments are drawn over earlier ones.
    A pixel belongs to a garment where the resized garment is brighter than ``FOREGROUND``: it
    takes the garment's intensity and the label ``1 + class`` (0 = background). Boxes are the
    tight boxes of each garment's visible pixels, so an occluded garment's box is its visible part.
    """
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, size, size), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    noise = torch.from_numpy(rng.random((n, 1, 7, 7), dtype=np.float32))
    background = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    images[:] = (background * BACKGROUND_MAX).clamp(0, BACKGROUND_MAX - 1).to(torch.uint8).numpy()
    # draw every scene's layout first, then resize the garments by side (one interpolation per side)
    layouts = [_layout(rng, size, len(garments)) for _ in range(n)]
    wanted: dict[int, list[int]] = {}
    for scene in layouts:
        for g, side, _, _ in scene:
            wanted.setdefault(side, []).append(g)
    resized: dict[tuple[int, int], np.ndarray] = {}
    for side, idx in wanted.items():
        batch = F.interpolate(garments[idx].float(), size=(side, side), mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
        for g, img in zip(idx, batch):
            resized[(g, side)] = img
    labels = garment_labels.numpy()
    boxes = []
    for i, scene in enumerate(layouts):
        owner = np.full((size, size), -1, np.int64)             # which placed garment each pixel shows
        for j, (g, side, y, x) in enumerate(scene):
            patch = resized[(g, side)]
            fg = patch > FOREGROUND
            images[i, 0, y:y + side, x:x + side][fg] = patch[fg]
            masks[i, y:y + side, x:x + side][fg] = 1 + labels[g]
            owner[y:y + side, x:x + side][fg] = j
        rows = []
        for j, (g, _, _, _) in enumerate(scene):
            ys, xs = np.nonzero(owner == j)
            if len(ys):
                rows.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 1 + labels[g]])
        boxes.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 5))
    classes = ["background"] + list(class_names or [str(c) for c in range(int(labels.max()) + 1)])
    return DenseArrays(torch.from_numpy(images), torch.from_numpy(masks), boxes, name=name, classes=classes)


def _layout(rng: np.random.Generator, size: int, pool: int) -> list[tuple[int, int, int, int]]:
    """One scene's garments: (garment index, side, top, left) with the overlap rule of ``make_scenes``."""
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(rng.integers(GARMENTS_PER_SCENE[0], GARMENTS_PER_SCENE[1] + 1)):
        g = int(rng.integers(pool))
        side = int(rng.integers(GARMENT_SIDE[0], GARMENT_SIDE[1] + 1))
        for _ in range(20):
            y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if all(_overlap((y, x, side), (py, px, ps)) <= MAX_OVERLAP for _, ps, py, px in placed):
                placed.append((g, side, y, x))
                break
    return placed


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """The intersection of two square boxes (top, left, side) over the smaller one's area."""
    h = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    w = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return max(h, 0) * max(w, 0) / min(a[2], b[2]) ** 2


def fashion_mnist_scenes(split: str, garments: ArrayDataset) -> DenseArrays:
    """The built-in ``fashion-mnist-scenes`` split (train: 5,000 scenes of Fashion-MNIST training
    garments, seed 0; test: 1,000 scenes of its test garments, seed 1), made in memory on first
    use in about a second, the same on every machine."""
    return make_scenes(garments.images, garments.labels, SCENE_COUNTS[split], SCENE_SEEDS[split],
                       class_names=garments.classes, name=f"fashion-mnist-scenes:{split}")
