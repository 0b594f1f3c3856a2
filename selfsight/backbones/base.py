"""The backbone contract and a wrapper that puts any ``nn.Module`` behind it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Features:
    """cls: B×D global feature (ViT class token or pooled ConvNet map); patch: B×N×D or None."""
    cls: torch.Tensor
    patch: torch.Tensor | None = None


class WrappedBackbone(nn.Module):
    """Any module whose output is B×D (used as is) or B×D×H×W (average-pooled; the map
    becomes the patch tokens). ``embed_dim`` is measured with a dry run when not given."""

    def __init__(self, module: nn.Module, embed_dim: int | None = None, in_chans: int = 3, probe_size: int = 32):
        super().__init__()
        self.module = module
        if embed_dim is None:
            was_training = module.training
            module.eval()
            with torch.no_grad():
                embed_dim = self.forward_features(torch.zeros(2, in_chans, probe_size, probe_size)).cls.shape[1]
            module.train(was_training)
        self.embed_dim = embed_dim

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Features:
        if mask is not None:
            raise ValueError("a wrapped module does not take a patch mask (only ViT backbones do)")
        out = self.module(x)
        if out.ndim == 4:                                  # B×D×H×W
            return Features(out.mean((2, 3)), out.flatten(2).transpose(1, 2))
        if out.ndim != 2:
            raise ValueError(f"wrapped module returned shape {tuple(out.shape)}; expected B×D or B×D×H×W")
        return Features(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).cls


def wrap(module: nn.Module, embed_dim: int | None = None, in_chans: int = 3, probe_size: int = 32) -> nn.Module:
    """Put ``module`` behind the backbone contract unless it already follows it
    (``probe_size``: the input side used to measure ``embed_dim`` when it is not given)."""
    if hasattr(module, "forward_features") and hasattr(module, "embed_dim") and not hasattr(module, "default_cfg"):
        return module
    return WrappedBackbone(module, embed_dim, in_chans, probe_size)
