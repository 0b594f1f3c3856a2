"""Mixed precision: which autocast dtype a device runs natively, and the one autocast idiom."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("selfsight")


def cpu_supports_bf16() -> bool:
    """A CPU with native bf16 arithmetic (avx512_bf16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """None = fp32; else the autocast dtype. ``auto``: bf16 where the device runs it natively."""
    if choice == "fp32":
        return None
    if choice not in ("auto", "bf16"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {choice!r}")
    ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    if choice == "bf16" and not ok:
        log.warning("bf16 requested but %s has no native bf16: it will be slow", device)
    return torch.bfloat16 if (ok or choice == "bf16") else None


def eval_precision(device: torch.device | str) -> torch.dtype | None:
    """The evaluations' autocast dtype: bf16 on a GPU that runs it natively, else fp32 (None)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a disabled one for ``dtype=None``
    (fp32): the context every forward of the trainer and the evaluations runs in."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)
