"""Pixel targets (MAE, He et al. 2022, ``models_mae.py:patchify``) and the target
normalizations N of the unified MIM view (methods.md §14)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORMS = ("none", "patch", "layernorm", "l2")


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """B×C×H×W -> B×N×(p·p·C), row-major patches, channel-last inside a patch (MAE's
    'nchpwq->nhwpqc')."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}×{w} is not divisible into {patch}-pixel patches")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(t: torch.Tensor, patch: int, grid: tuple, channels: int) -> torch.Tensor:
    """Inverse of ``patchify``: B×N×(p·p·C) -> B×C×H×W."""
    b = t.shape[0]
    gh, gw = grid
    x = t.reshape(b, gh, gw, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, gh * patch, gw * patch)


def normalize_target(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token normalization of a B×N×C target (float32 out).

    * ``patch``: (t - mean) / sqrt(var + 1e-6), unbiased variance (MAE's norm_pix_loss);
    * ``layernorm``: LayerNorm without affine parameters, eps 1e-6 (MaskDistill);
    * ``l2``: unit L2 norm per token;
    * ``none``: unchanged (HOG is already L2-normalized per cell inside).
    """
    t = t.float()
    if kind == "none":
        return t
    if kind == "patch":
        return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
    if kind == "layernorm":
        return F.layer_norm(t, t.shape[-1:], eps=1e-6)
    if kind == "l2":
        return F.normalize(t, dim=-1)
    raise ValueError(f"method.target.norm must be one of {', '.join(NORMS)}, got {kind!r}")
