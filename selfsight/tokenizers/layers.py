"""Parts shared by the tokenizers: the conv encoder/decoder stacks and the codebook statistics.

The stacks follow the trainable dVAE of BEiT (``beit/modeling_discrete_vae.py:DiscreteVAE``, from
lucidrains' DALLE-pytorch), itself a small version of DALL-E's (Ramesh et al. 2021):

* encoder: [Conv 4×4 stride 2 + ReLU + ResBlock] × log2(downsample) → Conv 1×1 to ``out``;
* decoder: Conv 1×1 to ``hidden`` + ReLU + ResBlock → [ConvTranspose 4×4 stride 2 + ReLU +
  ResBlock] × log2(upsample) → Conv 1×1 to ``out``.

No normalization layers: ``encode`` gives the same ids in train and eval mode.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def num_stages(factor: int) -> int:
    """log2 of a power-of-two down/upsampling factor (1 -> 0 stages)."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"downsample must be a power of two (1, 2, 4, 8, ...), got {factor}")
    return int(math.log2(factor))


class ResBlock(nn.Module):
    """x + Conv1×1(ReLU(Conv3×3(ReLU(Conv3×3(x))))) at constant width (DALLE-pytorch ResBlock)."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(width, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def conv_encoder(in_ch: int, hidden: int, out_ch: int, downsample: int) -> nn.Sequential:
    """B×in_ch×H×W -> B×out_ch×(H/downsample)×(W/downsample)."""
    layers: list[nn.Module] = []
    n = num_stages(downsample)
    if n == 0:                                                 # no downsampling: a 3×3 stem
        layers += [nn.Conv2d(in_ch, hidden, 3, padding=1), nn.ReLU(inplace=True), ResBlock(hidden)]
    for i in range(n):
        layers += [nn.Conv2d(in_ch if i == 0 else hidden, hidden, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                   ResBlock(hidden)]
    layers.append(nn.Conv2d(hidden, out_ch, 1))
    return nn.Sequential(*layers)


def conv_decoder(in_ch: int, hidden: int, out_ch: int, upsample: int) -> nn.Sequential:
    """B×in_ch×h×w -> B×out_ch×(h·upsample)×(w·upsample); upsample 1 = a conv stack at the grid."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, hidden, 1), nn.ReLU(inplace=True), ResBlock(hidden)]
    for _ in range(num_stages(upsample)):
        layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                   ResBlock(hidden)]
    layers.append(nn.Conv2d(hidden, out_ch, 1))
    return nn.Sequential(*layers)


def check_input(x: torch.Tensor, channels: int, downsample: int, who: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{who}: expected a B×{channels}×H×W batch, got shape {tuple(x.shape)}")
    if x.shape[-2] % downsample or x.shape[-1] % downsample:
        raise ValueError(f"{who}: image size {tuple(x.shape[-2:])} is not divisible by downsample={downsample}")


@torch.no_grad()
def code_stats(ids: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (any shape, long) -> (perplexity, usage) of this batch's code histogram:
    perplexity = exp(entropy of the histogram) in [1, num_codes]; usage = share of codes used."""
    counts = torch.bincount(ids.reshape(-1), minlength=num_codes).float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()
