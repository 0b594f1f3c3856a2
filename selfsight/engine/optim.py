"""Optimizers with the usual parameter groups: no weight decay (and no LARS adaptation) on
biases and normalization parameters (every parameter with ndim <= 1)."""
from __future__ import annotations

import torch
import torch.nn as nn


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017), FAIR flavour (``moco-v3:moco/optimizer.py``, ``mae:util/lars.py``).

    For groups with ``lars=True``: dp = g + wd·p; dp *= eta·||p||/||dp|| (when both norms > 0);
    mu = m·mu + dp; p -= lr·mu. Other groups get plain momentum SGD without decay. We pick
    this flavour over SimCLR's TF one (lr inside the momentum buffer, methods.md §0.2): both
    are the same up to how a changing lr enters the momentum.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 1e-3):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        """``self.found_inf`` (a float tensor, set by ``step_unless_nonfinite`` as torch's fused
        optimizers take it): nonzero leaves every parameter and momentum buffer as it was, on the
        device, without a host read.

        The arithmetic runs as ``torch._foreach_*`` ops over each group's tensors: on a GPU a few
        multi-tensor kernels plus the trust scaling and the masked select per parameter (~3 kernels
        each, by count of the code) instead of ~12 kernels per parameter (ResNet-50's 161 parameters
        took ~20 ms of GPU time per step one by one on an H200, benchmarks/profile_step.py; the foreach
        version is not yet timed there). On a CPU foreach ops loop over the tensors, so nothing is
        gained there. The trust ratios of a group are one vector."""
        loss = closure() if closure is not None else None
        found_inf = getattr(self, "found_inf", None)
        ok = None if found_inf is None else found_inf == 0
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if g["lars"]:
                dps = torch._foreach_add(grads, params, alpha=g["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(params))
                d_norm = torch.stack(torch._foreach_norm(dps))
                trust = torch.where((p_norm > 0) & (d_norm > 0), g["trust_coefficient"] * p_norm / d_norm,
                                    torch.ones_like(p_norm))
                torch._foreach_mul_(dps, list(trust.to(dps[0].dtype).unbind()))
            else:
                dps = grads
            mus = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mus.append(state["mu"])
            if ok is None:
                torch._foreach_mul_(mus, g["momentum"])
                torch._foreach_add_(mus, dps)
                torch._foreach_add_(params, mus, alpha=-g["lr"])
            else:                               # masked update: a skipped step moves nothing (NaN-safe select)
                new_mu = torch._foreach_mul(mus, g["momentum"])
                torch._foreach_add_(new_mu, dps)
                new_p = torch._foreach_add(params, new_mu, alpha=-g["lr"])
                for mu, p, m1, p1 in zip(mus, params, new_mu, new_p):
                    torch.where(ok, m1, mu, out=mu)
                    torch.where(ok, p1, p, out=p)
        return loss


def skips_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, normalization parameters (ndim <= 1) and the ViT tokens get no weight decay."""
    return p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token"))


def vit_layer_id(name: str, depth: int) -> int:
    """BEiT's ``get_num_layer_for_vit`` (DINOv2's ``get_vit_lr_decay_rate``) on the parameter names of a
    ``ViTBackbone`` or of a ``Classifier`` around one:
    0 for the embeddings and tokens, b + 1 for block b, depth + 1 for everything above (norm, head)."""
    name = name.removeprefix("backbone.").removeprefix("net.")
    if name in ("cls_token", "pos_embed", "mask_token", "reg_token", "register_tokens") or \
            name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def backbone_lr_scales(backbone: nn.Module, lr_scale: float = 1.0, layer_decay: float = 1.0,
                       patch_embed_lr_scale: float = 1.0) -> dict:
    """{id(parameter): factor on the scheduled lr} for the backbone's parameters (``param_groups``'
    ``lr_scales``); empty when every factor is 1. ``lr_scale``: all of them (continued pretraining).
    ViTs only: ``layer_decay`` d gives block b the factor d^(depth − b) and the embeddings d^(depth + 1)
    (BEiT's layer-wise decay, used in pretraining by DINOv2: 0.9), ``patch_embed_lr_scale`` the
    patch embedding a further factor (DINOv2's ``patch_embed_lr_mult`` 0.2)."""
    blocks = getattr(getattr(backbone, "net", None), "blocks", None)
    if (layer_decay != 1 or patch_embed_lr_scale != 1) and blocks is None:
        raise ValueError("optim.layer_decay and optim.patch_embed_lr_scale need a ViT backbone")
    if lr_scale == 1 and layer_decay == 1 and patch_embed_lr_scale == 1:
        return {}
    depth = len(blocks) if blocks is not None else 0
    out = {}
    for name, p in backbone.named_parameters():
        scale = lr_scale
        if blocks is not None:
            scale *= layer_decay ** (depth + 1 - vit_layer_id(name, depth))
            if name.removeprefix("net.").startswith("patch_embed"):
                scale *= patch_embed_lr_scale
        out[id(p)] = scale
    return out


def param_groups(model: nn.Module, decay_all: bool = False, fixed_lr: list | tuple = (),
                 lr_scales: dict | None = None) -> list[dict]:
    """Two groups: ``decay`` (weights, ndim > 1) and ``no_decay`` (biases, norm params, tokens).
    ``decay_all``: weight decay on the second group too (MoCo v3's AdamW decays every parameter);
    LARS still leaves it unadapted. Frozen parameters (momentum encoders, frozen stages) are left
    out. The parameters in ``fixed_lr`` (a method's ``fixed_lr_parameters()`` hook) get groups of
    their own flagged ``fixed_lr``; those in ``lr_scales`` ({id: scale}, ``backbone.lr_scale``) groups
    with their ``lr_scale``, a factor on the scheduled learning rate."""
    fixed, scales = {id(p) for p in fixed_lr}, lr_scales or {}
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = skips_weight_decay(name, p)
        groups.setdefault((skip, id(p) in fixed, scales.get(id(p), 1.0)), []).append(p)
    rest = {"apply_wd": True, "lars": False} if decay_all else {"apply_wd": False, "lars": False, "weight_decay": 0.0}
    out = []
    for (skip, fixed_lr, scale), params in sorted(groups.items()):
        g = {"params": params, **(rest if skip else {"apply_wd": True, "lars": True})}
        if fixed_lr:            # kept at the base lr by the engine (SimSiam's --fix-pred-lr)
            g["fixed_lr"] = True
        if scale != 1.0:
            g["lr_scale"] = scale
        out.append(g)
    return out


CLIP_MODES = ("global", "per_param")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def gradients_finite(parameters) -> torch.Tensor:
    """A 0-d bool tensor: every gradient is finite (one fused norm over all of them, no host sync).
    Sharded (FSDP) gradients are checked shard by shard: this process's part of the answer, which
    the caller reduces over the processes."""
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())


@torch.no_grad()
def clip_gradients(parameters, max_norm: float, mode: str = "global") -> None:
    """``global``: one norm over all gradients (``clip_grad_norm_``). ``per_param``: each tensor's
    gradient scaled to norm <= max_norm on its own (DINO's ``utils.clip_gradients``:
    g *= min(1, max_norm / (||g|| + 1e-6))), fused over tensors and without a host sync."""
    params = [p for p in parameters if p.grad is not None]
    if mode == "global":
        nn.utils.clip_grad_norm_(params, max_norm)
    elif mode == "per_param":
        grads = [p.grad for p in params]
        if grads:
            coefs = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in torch._foreach_norm(grads)]
            torch._foreach_mul_(grads, coefs)
    else:
        raise ValueError(f"optim.clip_mode must be one of {CLIP_MODES}, got {mode!r}")


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` takes ``found_inf`` (torch's fused Adam/AdamW/SGD, our LARS)."""
    if isinstance(optimizer, LARS):
        return True
    fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD))
    return fused and all(g.get("fused") for g in optimizer.param_groups)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()`` when the 0-d bool tensor ``ok`` is true, else nothing changes.

    Fused optimizers and LARS skip on the device through ``found_inf`` (as ``torch.amp.GradScaler``
    drives them), so the step needs no host read; any other optimizer (e.g. non-fused SGD/AdamW on
    a device without fused kernels) reads ``ok`` on the host, one sync per step."""
    if not skips_on_device(optimizer):
        if bool(ok):
            optimizer.step()
        return
    optimizer.grad_scale = None
    optimizer.found_inf = (~ok).to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def build_optimizer(model: nn.Module, cfg, device_type: str = "cpu", groups: list[dict] | None = None,
                    sharded: bool = False, fixed_lr: list | tuple = (), lr_scales: dict | None = None
                    ) -> torch.optim.Optimizer:
    """``cfg``: an ``OptimConfig``; ``groups``: parameter groups to use instead of ``param_groups``
    (e.g. fine-tuning's layer-wise learning-rate groups); ``fixed_lr``: parameters kept at the
    base lr. ``sharded``: the parameters are FSDP DTensors, which the fused kernels do not take
    (torch 2.14): the foreach ones are used."""
    if sharded:
        device_type = "sharded"
    if cfg.clip_mode not in CLIP_MODES:
        raise ValueError(f"optim.clip_mode must be one of {CLIP_MODES}, got {cfg.clip_mode!r}")
    groups = param_groups(model, cfg.decay_all, fixed_lr, lr_scales) if groups is None else groups
    if cfg.name == "sgd":
        fused = device_type in ("cuda", "cpu")
        opt = torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              fused=fused or None)
        if fused and cfg.momentum:
            # zero momentum buffers equal the first step's copy of the gradient (dampening 0), and a
            # first step skipped on the device (found_inf) then leaves no uninitialised buffer behind
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return opt
    if cfg.name == "adamw":
        # the fused kernel exists for CUDA and the CPU (torch >= 2.4); on the CPU it is 5-10x faster than
        # the per-tensor loop PyTorch picks by default (150 ms vs 1.4 s a step for ViT-L's 303 M parameters)
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                 fused=fused or None)
    if cfg.name == "lars":
        return LARS(groups, lr=0.0, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                    trust_coefficient=cfg.trust_coefficient)
    raise ValueError(f"optim.name must be sgd, adamw or lars, got {cfg.name!r}")


class NonfiniteCounts:
    """Steps whose loss or gradients were not finite, counted on the device (no host read per step):
    the current streak, the longest streak since the last read, and the total. ``read`` (at log and
    checkpoint steps) brings them to the host."""

    def __init__(self, device: torch.device):
        self.run, self.worst, self.total = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
        self.in_row = 0                 # as last read: the current streak
        self.seen = 0                   # as last read: the session's total

    def add(self, ok: torch.Tensor, streak_ok: torch.Tensor | None = None) -> None:
        """``ok``: the step was taken; ``streak_ok`` (default ``ok``): the step does not extend the
        streak (an fp16 overflow the gradient scaler skipped is counted but is no streak)."""
        self.run.copy_(torch.where(ok if streak_ok is None else streak_ok, 0, self.run + 1))
        torch.maximum(self.worst, self.run, out=self.worst)
        self.total += ~ok

    def read(self) -> int:
        """Read the counters; returns the longest streak since the last read."""
        run, worst, total = torch.stack([self.run, self.worst, self.total]).tolist()
        self.worst.copy_(self.run)
        self.in_row, self.seen = run, total
        return worst
