"""Per-step schedule shapes, pure arithmetic used by the engine and by methods (``dino:utils.cosine_scheduler``,
methods.md §0.2). The engine owns the schedules: it evaluates these per step and passes the values in ``sched``."""
from __future__ import annotations

import math


def cosine(step: int, total: int, base: float, final: float, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup`` steps, then cosine to ``final``."""
    if step < warmup:
        return warmup_start + (base - warmup_start) * step / max(1, warmup)
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


def linear_warmup(x: float, start: float, end: float, length: float) -> float:
    """``start`` -> ``end`` linearly for ``x`` in [0, length), then ``end`` (DINO / iBOT teacher
    temperature, indexed by the epoch)."""
    if x >= length:
        return end
    return start + (end - start) * x / length


def scaled_lr(base_lr: float, batch: int, base_batch: int, rule: str) -> float:
    """The method's learning-rate scaling rule with the GLOBAL batch (pitfall 23)."""
    if rule == "linear":
        return base_lr * batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(batch / base_batch)
    if rule == "none":
        return base_lr
    raise ValueError(f"optim.lr_scaling must be linear, sqrt or none, got {rule!r}")
