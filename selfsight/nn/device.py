"""Moving small host tensors to the training device without making the host wait.

A plain ``t.to(device)`` (or ``torch.tensor(..., device=...)``) of host memory copies and then
synchronises the stream: the host stops until every queued kernel has run (the previous step's
backward included), so it cannot prepare the next batch while the device computes. ``to_device``
copies asynchronously; ``device_constant`` uploads a small constant once per device and dtype.
"""
from __future__ import annotations

import functools

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``, copied asynchronously (through pinned memory on CUDA). On Apple's
    MPS an asynchronous copy of pageable memory can read the source after it is freed (pytorch
    issue 189690), so the copy there is a plain one."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=device.type != "mps")


@functools.lru_cache(maxsize=None)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant (grey weights, normalisation mean and std) on ``device``, uploaded once per
    device and dtype, not once per batch. Callers never write into it."""
    return to_device(torch.tensor(values, dtype=dtype), device)
