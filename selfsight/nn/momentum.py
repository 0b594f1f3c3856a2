"""Momentum (EMA) encoders: theta_k <- m·theta_k + (1 - m)·theta_q over parameters only
(methods.md §0.3, pitfall 24): BN running statistics stay the momentum encoder's own."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` to be updated by EMA (no gradients, not seen by optimizers)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def without_drop_path(module: nn.Module) -> nn.Module:
    """``module`` with stochastic depth off (teachers see no drop-path: DINO, iBOT, data2vec)."""
    for m in module.modules():                 # timm DropPath (and stochastic-depth layers like it)
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return module


def _params(modules) -> list[torch.Tensor]:
    modules = [modules] if isinstance(modules, nn.Module) else modules
    return [p for m in modules for p in m.parameters()]


@torch.no_grad()
def momentum_update(target, online, m: float, enabled: torch.Tensor | None = None) -> None:
    """EMA step over a module (or a list of modules) and its online twin(s), parameters zipped
    in order (the two sides have the same structure). ``enabled``: a 0-d bool tensor (the
    engine's ``sched["finite"]``); false leaves the target as it was, decided on the device."""
    t_params, o_params = _params(target), _params(online)
    if len(t_params) != len(o_params):
        raise ValueError(f"momentum encoder has {len(t_params)} parameters, online encoder {len(o_params)}")
    o_params = [p.detach() for p in o_params]
    if enabled is None or not t_params:
        # lerp: t + (1 - m)(o - t) = m·t + (1 - m)·o, fused over all tensors
        torch._foreach_lerp_(t_params, o_params, 1.0 - m)
        return
    # on a skipped step the weight is 0: t + 0·(o - t) = t. The flag is a device tensor; one weight
    # given as a tensor would be read back as a Python number (the host waiting for the device), so
    # each tensor gets the 0-d weight of its own (torch's per-tensor path: one lerp per tensor; on the
    # CPU as fast as the fused one)
    weight = enabled.to(device=t_params[0].device, dtype=t_params[0].dtype) * (1.0 - m)
    torch._foreach_lerp_(t_params, o_params, [weight] * len(t_params))
