"""HOG regression target of MaskFeat.

Wei et al., *Masked Feature Prediction for Self-Supervised Visual Pre-Training*, CVPR 2022.
Official code: ``facebookresearch/SlowFast`` (``slowfast/models/operators.py:HOGLayerC``,
``slowfast/models/masked.py:_get_hog_label_2d``), reproduced here:

* per channel Sobel gradients on the reflect-padded image, the cross-correlation (as ``conv2d``)
  with gx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]] and gy = gx^T. Deviation: computed as
  [1, 2, 1]ᵀ⊗[1, 0, -1] by slicing instead of SlowFast's grouped conv: the same sums, but equal
  pixels give exactly 0 (a conv leaves ~1e-7 residues on a flat region, which the L2 norm turns
  into a unit histogram of noise) and no cuDNN Winograd/FFT rounding;
* magnitude sqrt(gx^2 + gy^2); bin = floor(atan2(gx, gy) / pi * nbins) mod nbins, i.e. ``nbins``
  *unsigned* orientation bins of pi/nbins each, hard assignment (no interpolation, no Gaussian
  window);
* magnitudes summed per bin over non-overlapping ``cell``x``cell`` cells, then L2-normalised over
  the bins of each cell and channel (no block normalisation); a flat cell stays all zero.

Pitfall 21: the histograms are computed on the mean/std-NORMALIZED, unmasked view, the very
tensor the student sees (detached), as in SlowFast; not on another crop/flip, the masked input or a
re-read of the file. The per-channel affine normalization itself scales gx and gy of a channel by
1/std, which keeps the phases and cancels in the per-channel L2 norm: it changes the target only by
rounding (and through the eps of near-flat cells).

Everything runs in float32 with autocast disabled, with batched tensor ops only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class HOG(nn.Module):
    """MaskFeat HOG target. No parameters and no buffers (empty state_dict); device-agnostic.

    ``histograms(x)``: B×C×H×W → B×C×nbins×(H/cell)×(W/cell).
    ``forward(x, patch_size)``: B×C×H×W → B×N×(C·nbins·k·k) with k = patch_size // cell and
    N = (H/patch_size)·(W/patch_size) in row-major patch order. Inside a patch vector the index is
    ``((c·nbins + bin)·k + cy)·k + cx`` (channel, then bin, then cell row, then cell column inside
    the patch; fastest last), the order of SlowFast's ``_get_hog_label_2d``.
    """

    def __init__(self, nbins: int = 9, cell: int = 8, channels: int = 3):
        super().__init__()
        if nbins < 1 or cell < 1 or channels < 1:
            raise ValueError(f"HOG: nbins, cell and channels must be positive, got {nbins}, {cell}, {channels}")
        self.nbins, self.cell, self.channels = nbins, cell, channels

    def extra_repr(self) -> str:
        return f"nbins={self.nbins}, cell={self.cell}, channels={self.channels}"

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"HOG: expected a B×C×H×W batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"HOG: expected {self.channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        if h % self.cell or w % self.cell:
            raise ValueError(f"HOG: image size {h}×{w} is not divisible by the cell size {self.cell}")

    @torch.no_grad()
    def histograms(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×C×H×W normalized images → B×C×nbins×(H/cell)×(W/cell), unit L2 norm over nbins."""
        self._check(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.detach().float()
            b, c, hh, ww = x.shape
            xp = F.pad(x, (1, 1, 1, 1), mode="reflect")                              # B×C×(H+2)×(W+2)
            # Sobel = cross-correlation with [[1,0,-1],[2,0,-2],[1,0,-1]] (gx) and its transpose
            # (gy), factorized [1,2,1]ᵀ⊗[1,0,-1]; equal pixels give exactly 0 (module docstring)
            dx = xp[..., :, :-2] - xp[..., :, 2:]                                    # B×C×(H+2)×W
            dy = xp[..., :-2, :] - xp[..., 2:, :]                                    # B×C×H×(W+2)
            gx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]             # B×C×H×W
            gy = dy[..., :, :-2] + 2 * dy[..., :, 1:-1] + dy[..., :, 2:]             # B×C×H×W
            mag = torch.sqrt(gx * gx + gy * gy)                                      # B×C×H×W
            phase = torch.atan2(gx, gy) / torch.pi * self.nbins                      # in [-nbins, nbins]
            bins = torch.remainder(torch.floor(phase).long(), self.nbins)            # B×C×H×W in [0, nbins)
            # one-hot weighting instead of scatter_add_ (no atomics: deterministic on CUDA)
            ar = torch.arange(self.nbins, device=x.device).view(1, 1, -1, 1, 1)
            hist = torch.where(bins.unsqueeze(2) == ar, mag.unsqueeze(2), mag.new_zeros(()))  # B×C×nbins×H×W
            h, w, k = hh // self.cell, ww // self.cell, self.cell
            hist = hist.view(b, c, self.nbins, h, k, w, k).sum(dim=(4, 6))           # B×C×nbins×h×w
            return F.normalize(hist, p=2, dim=2)

    def forward(self, x: torch.Tensor, patch_size: int) -> torch.Tensor:
        """x: B×C×H×W normalized images → B×N×(C·nbins·k²) per-patch targets, k = patch_size // cell."""
        if x.dim() != 4:
            raise ValueError(f"HOG: expected a B×C×H×W batch, got shape {tuple(x.shape)}")
        if patch_size < 1 or patch_size % self.cell:
            raise ValueError(f"HOG: patch size {patch_size} is not a multiple of the cell size {self.cell}")
        h, w = x.shape[-2:]
        if h % patch_size or w % patch_size:
            raise ValueError(f"HOG: image size {h}×{w} is not divisible by the patch size {patch_size}")
        hist = self.histograms(x)                                                    # B×C×nbins×h×w
        b, c, nb, hc, wc = hist.shape
        k = patch_size // self.cell
        hist = hist.view(b, c, nb, hc // k, k, wc // k, k)                           # B×C×nb×ph×cy×pw×cx
        hist = hist.permute(0, 3, 5, 1, 2, 4, 6)                                     # B×ph×pw×C×nb×cy×cx
        return hist.reshape(b, (hc // k) * (wc // k), c * nb * k * k)                # B×N×(C·nb·k²)
