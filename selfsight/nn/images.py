"""Image tensors brought to what a network takes: the channel count (RGB -> luma as PIL's "L",
gray -> repeated) and the evaluation resize. One helper each, used by augmentation, evaluation,
export, feature targets and pictures."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsight.nn.device import device_constant

LUMA = (0.299, 0.587, 0.114)      # ITU-R 601-2 luma weights of R, G, B, as PIL's "L" and torchvision


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Images ``...×C×H×W`` with ``channels`` channels: RGB -> luma (uint8 images round back to
    uint8), gray -> repeated (a view); unchanged when C already fits."""
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1:
        return x.expand(*x.shape[:-3], channels, *x.shape[-2:])
    if c == 3 and channels == 1:
        if x.dtype == torch.uint8:
            w = torch.tensor(LUMA).view(3, 1, 1)
            return (x.float() * w).sum(-3, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        return (x * device_constant(LUMA, x.device, x.dtype).view(3, 1, 1)).sum(-3, keepdim=True)
    raise ValueError(f"the images have {c} channels, the model takes {channels}")


def eval_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation resize of float images B×C×H×W: small images (<= 64 px) straight to ``size``;
    large ones shorter side to size·256/224, then the central size×size crop (the usual ImageNet
    protocol)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if max(h, w) <= 64:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    short = int(round(size * 256 / 224))
    scale = short / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]
