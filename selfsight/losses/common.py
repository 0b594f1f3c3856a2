"""Helpers shared by the losses."""
from __future__ import annotations

import functools

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 unchanged (losses compute in at least fp32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def fp32_loss(fn):
    """Run a loss with autocast off, so that its products of upcast tensors stay fp32: under fp16
    autocast a matmul is cast back to fp16 (a cross-correlation or a covariance of 2048-d features
    overflows 65504; logits / 0.1 lose digits). The first tensor argument names the device."""
    @functools.wraps(fn)
    def in_fp32(*args, **kwargs):
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        if not torch.amp.is_autocast_available(device):        # e.g. the meta device: no autocast to leave
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return in_fp32
