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


def native_bf16(device: torch.device) -> bool:
    """bf16 runs natively: a GPU of compute capability 8.0 or newer (Ampere, Hopper, ...; T4, V100
    and P100 emulate it slowly), or a CPU with avx512_bf16/AMX."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_supports_bf16()


def pick_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """None = fp32; else the autocast dtype. ``auto``: bf16 where the device runs it natively, fp16
    (with a gradient scaler, ``grad_scaler``) on an older GPU, fp32 on a CPU without bf16."""
    if choice == "fp32":
        return None
    if choice not in ("auto", "bf16", "fp16"):
        raise ValueError(f"train.precision must be auto, bf16, fp16 or fp32, got {choice!r}")
    if choice == "fp16":
        if device.type == "cpu":
            log.warning("fp16 on a CPU is emulated and slow: bf16 or fp32 are the CPU's precisions")
        return torch.float16
    ok = native_bf16(device)
    if choice == "bf16":
        if not ok:
            log.warning("bf16 requested but %s has no native bf16: it will be slow", device)
        return torch.bfloat16
    if ok:
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None


def grad_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> "torch.amp.GradScaler | None":
    """fp16's dynamic loss scaling (Micikevicius et al. 2018): the loss multiplied by a scale that
    halves on an overflow (the step is skipped) and doubles after 2000 clean steps. None otherwise:
    bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(torch.device(device).type) if amp_dtype == torch.float16 else None


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32``: how logs and results name a precision."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")


def eval_precision(device: torch.device | str) -> torch.dtype | None:
    """The evaluations' autocast dtype: bf16 on a GPU that runs it natively, else fp32 (None)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a disabled one for ``dtype=None``
    (fp32): the context every forward of the trainer and the evaluations runs in."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)
