"""Helpers shared by the losses."""
from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 unchanged (losses compute in at least fp32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
