"""State a forward pass moves before the engine knows whether the step is taken: MoCo's queue,
DINO's and iBOT's centers. The forward keeps the old values (``StepUndo.keep``) and the method's
``after_step`` settles them (``StepUndo.settle(sched["finite"])``): a step the engine skips (a
non-finite loss, or an fp16 overflow the gradient scaler found in the gradients, which the
forward cannot see) puts them back, decided on the device without a host read."""
from __future__ import annotations

import torch


class StepUndo:
    def __init__(self):
        self._kept: list[tuple[torch.Tensor, slice, torch.Tensor]] = []

    @torch.no_grad()
    def keep(self, buffer: torch.Tensor, rows: slice = slice(None)) -> None:
        """Remember ``buffer[rows]`` as it is now (before the forward changes it in place)."""
        self._kept.append((buffer, rows, buffer[rows].clone()))

    @torch.no_grad()
    def settle(self, taken: torch.Tensor | bool | None) -> None:
        """Keep the new values where the step was taken (``taken``: a 0-d bool tensor; ``None``:
        a caller outside the engine, taken), else put the old ones back; forget them either way."""
        if taken is False:
            for buffer, rows, old in self._kept:
                buffer[rows] = old
        elif torch.is_tensor(taken):
            for buffer, rows, old in self._kept:
                buffer[rows] = torch.where(taken, buffer[rows], old)
        self._kept.clear()
