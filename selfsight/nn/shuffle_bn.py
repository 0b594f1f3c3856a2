"""MoCo's defences against BN "cheating" through batch statistics (He et al. 2019, §3.3;
methods.md §3, pitfall 2).

* ``SplitBatchNorm``: BN whose training statistics come from G groups of the batch (G
  contiguous chunks), as G processes with ordinary per-process BN would compute them. This is
  the single-process emulation of multi-GPU BN (the MoCo CIFAR demo's ``--bn-splits``).
* ``shuffled_forward``: the key pass with shuffle-BN. The keys' order is permuted across the
  global batch (rank 0 draws the permutation and broadcasts it), each process encodes its slice
  of the shuffled batch, and the keys are gathered and put back in order. A query and its key
  therefore never share BN statistics (with G >= 2 groups in one process, or >= 2 processes).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from selfsight.nn.distributed import broadcast_from_main, gather_no_grad, rank


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any dimension) normalizing each of ``num_splits`` contiguous batch chunks
    with its own statistics in training; the running statistics follow the chunks' average
    (as the CIFAR demo's version). Evaluation uses the running statistics as usual."""

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        n = x.shape[0]
        if n % g:
            raise ValueError(f"a batch of {n} cannot be split into {g} BN groups (method.bn_splits): "
                             f"choose a batch size divisible by {g}")
        if not self.track_running_stats:
            return torch.cat([F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps)
                              for c in x.chunk(g)])
        # each chunk updates its own copy of the running statistics; they are averaged after
        # (= (1 - m)·running + m·mean over chunks of the chunk statistics, unbiased variance)
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        means = [self.running_mean.clone() for _ in range(g)]
        variances = [self.running_var.clone() for _ in range(g)]
        out = torch.cat([F.batch_norm(c, rm, rv, self.weight, self.bias, True, m, self.eps)
                         for c, rm, rv in zip(x.chunk(g), means, variances)])
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_splits={self.num_splits}"


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Every BatchNorm*d of ``module`` -> SplitBatchNorm with ``num_splits`` groups (state kept)."""
    if num_splits < 1:
        raise ValueError(f"bn_splits must be >= 1, got {num_splits}")
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = module.weight if module.affine else module.running_mean
        out = SplitBatchNorm(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                             affine=module.affine, track_running_stats=module.track_running_stats,
                             device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        out.load_state_dict(module.state_dict())
        if module.affine:
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_split_bn(child, num_splits))
    return out


@torch.no_grad()
def shuffled_forward(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``encoder(x)`` for the local batch x (N×...), computed on a batch permuted across all
    processes and restored: row i of the result is the encoding of x[i]."""
    n = x.shape[0]
    x_all = gather_no_grad(x)                                            # (W·N)×...
    perm = broadcast_from_main(torch.randperm(x_all.shape[0], device=x.device))
    r = rank()
    y = encoder(x_all[perm[r * n:(r + 1) * n]])                          # this rank's shuffled slice
    y_all = gather_no_grad(y)                                            # (W·N)×D, in shuffled order
    return y_all[torch.argsort(perm)[r * n:(r + 1) * n]]                 # unshuffled, this rank's rows
