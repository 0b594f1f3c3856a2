"""A folder of images with segmentation masks, the common layout (VOC, ADE20k, mmseg's custom
sets): ``ROOT/images/NAME.jpg`` and ``ROOT/masks/NAME.png`` with the same stem, each mask a grey or
palette PNG holding one class id per pixel (255 = not scored), and optionally ``ROOT/classes.txt``
naming the ids in order (id 0 first).

Pairs that cannot be used are skipped with one line each and counted: an image without a mask, a
mask whose size differs from its image's, a colour (RGB) mask, an unreadable file, a mask with an id
``classes.txt`` does not name. Masks without an image are named too.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfsight.data.images import BrokenImageError, is_image_file, load_image
from selfsight.data.scenes import IGNORE, DenseArrays, resize_images, resize_masks
from selfsight.progress import Progress

log = logging.getLogger("selfsight.data")

MASK_MODES = {"L", "P", "I", "I;16", "I;16L", "I;16B", "1"}


def is_mask_folder(path: Path) -> bool:
    """A folder with ``images/`` and ``masks/`` sub-folders."""
    return (path / "images").is_dir() and (path / "masks").is_dir()


class MaskFolder:
    """The image/mask pairs of a folder (module docstring); ``load(size)`` reads them into a
    ``DenseArrays`` at ``size``×``size`` pixels (images bilinear with antialiasing, masks nearest)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not is_mask_folder(self.root):
            raise FileNotFoundError(f"{self.root} needs images/ and masks/ sub-folders (a mask PNG per image, "
                                    "same file name stem)")
        images = sorted(p for p in (self.root / "images").iterdir() if p.is_file() and is_image_file(p.name))
        masks = {p.stem: p for p in sorted((self.root / "masks").iterdir()) if p.is_file() and is_image_file(p.name)}
        self.pairs: list[tuple[Path, Path]] = []
        self.problems: list[str] = []
        for image in images:
            if image.stem in masks:
                self.pairs.append((image, masks[image.stem]))
            else:
                self.problems.append(f"{image.relative_to(self.root)}: no mask (looked for masks/{image.stem}.png)")
        stems = {p.stem for p in images}
        for stem, mask in masks.items():
            if stem not in stems:
                log.warning("%s: a mask without an image (not used)", mask.relative_to(self.root))
        names = self.root / "classes.txt"
        self.classes = [line.strip() for line in names.read_text().splitlines() if line.strip()] if names.is_file() \
            else []
        if not self.pairs:
            raise ValueError(f"{self.root}: no image in images/ has a mask in masks/ with the same stem "
                             f"({len(images)} images, {len(masks)} masks)")

    def image_sizes(self, n: int = 64) -> list[tuple[int, int]]:
        """(width, height) of up to ``n`` images, from their headers."""
        sizes = []
        for image, _ in self.pairs[:n]:
            try:
                with Image.open(image) as im:
                    sizes.append(im.size)
            except OSError:
                continue
        return sizes

    def load(self, size: int) -> DenseArrays:
        images, masks = [], []
        problems = list(self.problems)
        with Progress(len(self.pairs), f"reading {self.root.name}/images and masks") as bar:
            for image_path, mask_path in self.pairs:
                try:
                    image, mask = self._pair(image_path, mask_path)
                except BrokenImageError as e:
                    problems.append(f"{image_path.relative_to(self.root)}: {e.reason}")
                except (OSError, ValueError) as e:
                    problems.append(f"{image_path.relative_to(self.root)}: {e}")
                else:
                    images.append(resize_images(image[None], size)[0])
                    masks.append(resize_masks(mask[None], size)[0])
                bar.update(1)
        for line in problems:
            log.warning("skipped %s", line)
        total = len(self.pairs) + len(self.problems)
        if problems:
            log.warning("%s: %d of %d images skipped (lines above)", self.root, len(problems), total)
        if not images:
            raise ValueError(f"{self.root}: none of the {total} images has a usable mask (lines above)")
        stacked = torch.stack(masks)
        classes = self.classes or _default_classes(stacked)
        return DenseArrays(torch.stack(images), stacked, name=str(self.root), classes=classes, skipped=len(problems))

    def _pair(self, image_path: Path, mask_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 3×H×W image, uint8 H×W mask) or a ValueError that says what is wrong."""
        image = load_image(image_path)
        with Image.open(mask_path) as m:
            if m.mode not in MASK_MODES:
                raise ValueError(f"masks/{mask_path.name} is a {m.mode} image: a mask holds one class id per "
                                 "pixel (a grey or palette PNG)")
            if m.size != image.size:
                raise ValueError(f"masks/{mask_path.name} is {m.size[0]}x{m.size[1]} but the image is "
                                 f"{image.size[0]}x{image.size[1]}")
            ids = np.asarray(m, dtype=np.int64)
        if ids.max() > IGNORE:
            raise ValueError(f"masks/{mask_path.name} holds id {ids.max()} (ids go up to 254; 255 = not scored)")
        if self.classes:
            named = ids[ids != IGNORE]
            if named.size and named.max() >= len(self.classes):
                raise ValueError(f"masks/{mask_path.name} holds id {named.max()} but classes.txt names "
                                 f"{len(self.classes)} classes")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels, torch.from_numpy(ids.astype(np.uint8))


def _default_classes(masks: torch.Tensor) -> list[str]:
    named = masks[masks != IGNORE]
    top = int(named.max()) if named.numel() else 0
    return [f"class {i}" for i in range(top + 1)]
