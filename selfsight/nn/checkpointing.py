"""Gradient (activation) checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear
Memory Cost"): a segment keeps only its input for backward and runs its forward again there.
``torch.utils.checkpoint`` with ``use_reentrant=False``; BatchNorm running statistics are left
alone during the recomputation, so they move once per step as without checkpointing."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module):
    """BN momentum 0 while ``module`` is recomputed (running = 1·running + 0·batch, unchanged) and
    ``num_batches_tracked`` put back: the running statistics move once per step. (Turning the
    statistics off instead would save fewer tensors and fail the checkpoint's consistency check.)"""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
           and m.track_running_stats and m.momentum is not None]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def checkpointed(module: nn.Module, fn, *args):
    """``fn(*args)`` (which runs ``module``) with its activations recomputed in backward; plain
    ``fn(*args)`` when no gradient is being recorded."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _frozen_bn_stats(module)))
