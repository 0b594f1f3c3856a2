"""``train.compile``: ``torch.compile`` of the networks a method runs every step, in place.

What is compiled: every backbone (the modules with ``forward_features``: students, EMA teachers,
MoCo's key encoder, frozen teacher networks of feature targets) and MAE's decoder; projector and
prediction heads are a few matrix products and stay eager. A backbone's ``forward_features`` is
replaced on the instance by its compiled version (``forward`` calls it, so ``module(x)`` and the
``forward_features(x, mask)`` of masked image modeling both run compiled); other modules use
``nn.Module.compile()``. No wrapper module is added: state-dict keys, checkpoints, resume,
export and evaluation are unchanged. ``dynamic=False``: one static graph per input shape, so
DINO's two crop sizes give two graphs, compiled in the first step and reused after that.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from selfsight.heads.mim import MAEDecoder


def compile_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the networks worth compiling, outermost first, none inside another."""
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in out):
            continue
        if name and (callable(getattr(m, "forward_features", None)) or isinstance(m, MAEDecoder)):
            out.append((name, m))
    return out


def compile_model(model: nn.Module) -> list[str]:
    """Compile the networks of ``model`` in place; returns their names (lazy: the work happens
    at the first call, so a failure shows up in the first training step)."""
    names = []
    for name, m in compile_targets(model):
        if callable(getattr(m, "forward_features", None)):
            m.forward_features = torch.compile(m.forward_features, dynamic=False)
        else:
            m.compile(dynamic=False)
        names.append(name)
    return names


def toolchain_check(device: torch.device) -> None:
    """Compile and run a two-op function on ``device``; raises where this process cannot compile
    (no C++ compiler for the CPU backend, no Triton for CUDA). Several processes run it before the
    first step and agree (``Trainer``): a rank that cannot compile must not leave the others waiting."""
    x = torch.linspace(-1, 1, 16, device=device)
    got = torch.compile(lambda t: torch.sin(t) * 2 + 1, dynamic=False)(x)
    torch.testing.assert_close(got, torch.sin(x) * 2 + 1)


def uncompile_model(model: nn.Module) -> None:
    """Undo ``compile_model``: every module runs eagerly again (same parameters and buffers)."""
    for _, m in compile_targets(model):
        m.__dict__.pop("forward_features", None)
        m._compiled_call_impl = None
