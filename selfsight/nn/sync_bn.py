"""Batch normalization with statistics over the GLOBAL batch, on any device.

``torch.nn.SyncBatchNorm`` only runs on GPUs; SimCLR needs global BN (methods.md §1,
pitfall 2) and selfsight also trains with DDP on CPUs (gloo). ``GlobalBatchNorm`` all-reduces
[sum, sum of squares, count] with autograd (``all_reduce_sum_with_grad``, whose backward
sums the gradients over ranks), so forward and backward equal one process
holding the whole batch. ``convert_sync_batchnorm`` picks torch's kernel on GPUs and this
one elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from selfsight.nn.distributed import all_reduce_sum_with_grad, world_size
from selfsight.nn.shuffle_bn import SplitBatchNorm


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x        # statistics in >= fp32
        count = torch.full((1,), xf.numel() / xf.shape[1], device=x.device, dtype=xf.dtype)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])                  # 2C+1
        stats = all_reduce_sum_with_grad(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)                           # biased, as BN
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
                self.num_batches_tracked.add_(1)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm*d -> torch's SyncBatchNorm (GPUs) or GlobalBatchNorm (CPUs).

    A module holding MoCo's SplitBatchNorm (shuffle-BN) is returned unchanged: its per-process
    statistics are the point, and global statistics would let queries and keys "cheat". A frozen
    stage's BatchNorm (``keep_running_stats``) keeps its running statistics once converted."""
    if any(isinstance(m, SplitBatchNorm) for m in module.modules()):
        return module
    kept = {name for name, m in module.named_modules() if getattr(m, "keeps_running_stats", False)}
    out = nn.SyncBatchNorm.convert_sync_batchnorm(module) if device_type == "cuda" else _to_global_bn(module)
    for name, m in out.named_modules():
        if name in kept and not getattr(m, "keeps_running_stats", False):
            keep_running_stats(m)              # a frozen stage's BatchNorm stays frozen once converted
    return out


def keep_running_stats(bn: nn.Module) -> None:
    """``bn`` normalizes with its running statistics and leaves them unchanged, whatever
    ``model.train()`` sets (a frozen stage: detectron2's FrozenBatchNorm, the state dict unchanged)."""
    bn.register_forward_pre_hook(_use_running_stats)
    bn.keeps_running_stats = True


def _use_running_stats(module: nn.Module, args) -> None:
    module.training = False


def _to_global_bn(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        ref = module.weight if module.affine else module.running_mean
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats,
                              device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global_bn(child))
    return out
