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

import logging
import traceback
from pathlib import Path

import torch
import torch.nn as nn

from selfsight.engine.checkpoint import rng_state, set_rng_state
from selfsight.heads.mim import MAEDecoder
from selfsight.nn.distributed import all_ranks, is_main

log = logging.getLogger("selfsight")


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


def compile_failed(error: Exception, run_dir: Path) -> None:
    """Warn in one line; the whole error (compiler errors run to pages) goes to RUN/compile_error.txt."""
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    where = ""
    if is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "compile_error.txt").write_text("".join(traceback.format_exception(error)))
            where = f"; the full error is in {run_dir / 'compile_error.txt'}"
        except OSError:
            pass
    log.warning("train.compile failed (%s: %s); the run continues uncompiled (eager)%s",
                type(error).__name__, reason, where)


def compile_for_training(model: nn.Module, device: torch.device, world: int, run_dir: Path) -> list[str]:
    """``train.compile``: compile the networks (``compile_model``); where that fails, warn and run
    eagerly. Several processes each compile a small function first and agree (``toolchain_check``):
    where one cannot (no compiler on one node), every rank runs eagerly; failing alone inside the
    first step, that rank would leave the others waiting in the step's collectives. A failure that
    every rank meets at the same point of the first step is recovered there (``first_step``)."""
    compiled: list[str] = []
    try:
        compiled = compile_model(model)
    except Exception as e:          # e.g. torch.compile unsupported on this Python
        compile_failed(e, run_dir)
    if world == 1:
        return compiled
    error = None
    if compiled:
        try:
            toolchain_check(device)
        except Exception as e:
            error = e
    ok = bool(all_ranks(torch.tensor(error is None and bool(compiled), device=device)))
    if not ok and compiled:
        uncompile_model(model)
        compile_failed(error or RuntimeError("train.compile failed on another process; all run eagerly"), run_dir)
        return []
    return compiled


def first_step(step, model: nn.Module, optimizer, run_dir: Path) -> bool:
    """Run ``step()``, the first step of compiled networks (compiling happens in it). If compiling
    or that step fails (no C++ compiler, an unsupported op, a dynamo error), the model's state and
    the RNG are put back as they were before the step, the networks run eagerly and the step runs
    again: the run goes on. Returns whether the networks are still compiled."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}, rng_state()
    try:
        step()
        return True
    except Exception as e:
        uncompile_model(model)
        model.load_state_dict(saved[0])
        set_rng_state(saved[1])
        optimizer.zero_grad(set_to_none=True)
        compile_failed(e, run_dir)
        step()
        return False
