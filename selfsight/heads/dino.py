"""DINO projection head (Caron et al. 2021, Sec. 3.1 and App.; ``dino:vision_transformer.py:DINOHead``;
methods.md §8, pitfalls 14-15).

    x (N×D) -> [Linear -> (BN) -> GELU] x (L-1) -> Linear -> bottleneck (N×b)
            -> L2-normalize -> weight-normalized Linear(b, K, no bias) -> logits (N×K)

The last layer uses the current parametrization API (``torch.nn.utils.parametrizations.weight_norm``;
the deprecated ``nn.utils.weight_norm`` named its tensors ``weight_g``/``weight_v``, here they
are ``last_layer.parametrizations.weight.original0``/``original1``). Its norm g starts at 1 and,
with ``norm_last_layer=True``, stays frozen, so every prototype row has unit norm and the logits
are cosines in [-1, 1]. Initialisation as the official code: truncated normal (std 0.02) and zero
bias for the MLP; the last layer keeps torch's default init before the weight norm.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError(f"the DINO head needs at least 1 layer, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(nn.Linear(a, b))
            if i < layers - 1:
                mods += ([nn.BatchNorm1d(b)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0                  # K×1
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float32 else 1e-4)  # N×b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))                             # N×K


def freeze_last_layer(head: DINOHead, epoch: float, freeze_epochs: float) -> None:
    """Between backward and the optimizer step: the last layer keeps its initial weights while
    ``epoch < freeze_epochs`` (official ``cancel_gradients_last_layer``; DINO and iBOT)."""
    if epoch < freeze_epochs:
        for p in head.last_layer.parameters():
            p.grad = None
