"""The method contract: everything the engine, evaluation, pictures and export may call on a method.

A method is an ``nn.Module`` (``Method`` below) with ``training_step`` and a ``backbone`` property,
and any of the optional hooks in ``HOOKS``. ``hooks_of(method)`` checks a built method against
the contract once (a missing ``training_step``, a hook with the wrong number of arguments, a
name one letter away from a hook, a ``forward`` that was not defined: one ``MethodContractError``
line) and returns its ``Hooks``: the one place through which the rest of selfsight calls a
method. Nothing else probes a method with ``hasattr``.

What ``training_step(batch, sched)`` returns: ``{"loss": 0-d tensor, "embedding"?: B×D (the
collapse monitor's input, read at log steps), "monitor"?: {name: 0-d tensor or float}}``.
"""
from __future__ import annotations

import difflib
import inspect
import weakref
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch.nn as nn


class MethodContractError(TypeError):
    """A built method does not fit the contract; the message names what is malformed."""


@runtime_checkable
class Method(Protocol):
    """The required part. ``forward(batch, sched)`` calls ``training_step`` (so DDP can wrap it)."""

    def training_step(self, batch: dict, sched: dict) -> dict: ...

    @property
    def backbone(self) -> nn.Module: ...


# optional hook -> (arguments after self, what the engine does with it)
HOOKS: dict[str, tuple[int, str]] = {
    "after_step": (1, "after_step(sched): after the optimizer step (EMA teachers, queues); sched['finite'] is the "
                      "step's 0-d finiteness flag, false on a skipped step"),
    "before_optimizer_step": (1, "before_optimizer_step(sched): between backward and the optimizer step (DINO's "
                                 "frozen last layer)"),
    "schedules": (0, "schedules() -> {name: (start, end)}: values the engine ramps per step into sched"),
    "make_masker": (0, "make_masker() -> callable(views, seed) -> per-view masks, drawn by the loader"),
    "pictures": (1, "pictures(batch) -> {name: 3×H×W image in [0, 1]}, written as RUN/pictures/NAME.png"),
    "write_artifacts": (1, "write_artifacts(run_dir): files beside the checkpoint (a tokenizer's tokenizer.pt)"),
    "finetune_network": (0, "finetune_network() -> the network fine-tuning trains (default: the backbone)"),
    "fixed_lr_parameters": (0, "fixed_lr_parameters() -> parameters the engine keeps at the base lr"),
    "set_views": (1, "set_views(recipe): the run's resolved view recipe, given once before training (distill: "
                     "the teacher's input normalisation and its feature cache)"),
}


@dataclass(frozen=True)
class Hooks:
    """A checked method and its optional hooks (None where it has none)."""
    method: nn.Module
    after_step: Callable | None = None
    before_optimizer_step: Callable | None = None
    schedules: Callable | None = None
    make_masker: Callable | None = None
    pictures: Callable | None = None
    write_artifacts: Callable | None = None
    finetune_network: Callable | None = None
    fixed_lr_parameters: Callable | None = None
    set_views: Callable | None = None

    def scheduled(self) -> dict:
        """``{name: (start, end)}`` of the values the method wants ramped per step."""
        return self.schedules() if self.schedules is not None else {}

    def network_to_finetune(self) -> nn.Module:
        return self.finetune_network() if self.finetune_network is not None else self.method.backbone

    def fixed_lr(self) -> list:
        return list(self.fixed_lr_parameters()) if self.fixed_lr_parameters is not None else []


_CHECKED: "weakref.WeakKeyDictionary[nn.Module, Hooks]" = weakref.WeakKeyDictionary()


def _arguments(fn: Callable) -> int | None:
    """Positional parameters of a bound callable without defaults (None: *args takes any)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)


def _check(method: nn.Module) -> Hooks:
    name = type(method).__name__
    step = getattr(type(method), "training_step", None)
    if not callable(step):
        raise MethodContractError(f"method {name} has no training_step(batch, sched)")
    if _arguments(method.training_step) not in (None, 2):
        raise MethodContractError(f"method {name}: training_step must take (batch, sched)")
    if type(method).forward is nn.Module.forward:
        raise MethodContractError(f"method {name} must define forward(batch, sched) calling training_step "
                                  "(DDP calls forward)")
    if not isinstance(inspect.getattr_static(type(method), "backbone", None), property):
        raise MethodContractError(f"method {name} must have a backbone property (the network evaluation and "
                                  "export use)")
    own = {n for klass in type(method).__mro__ if klass not in (nn.Module, object)
           for n in vars(klass) if not n.startswith("_")}
    for attr in sorted(own - set(HOOKS) - {"training_step", "forward", "backbone"}):
        close = difflib.get_close_matches(attr, list(HOOKS), n=1, cutoff=0.85)
        if close and callable(getattr(type(method), attr, None)):
            raise MethodContractError(f"method {name} defines {attr}(), which is no hook: did you mean {close[0]}?")
    found = {}
    for hook, (n_args, what) in HOOKS.items():
        if hook not in own:
            continue
        fn = getattr(method, hook)
        if not callable(fn) or _arguments(fn) not in (None, n_args):
            raise MethodContractError(f"method {name}: {hook} is malformed, the contract is {what}")
        found[hook] = fn
    return Hooks(method, **found)


def hooks_of(method: nn.Module) -> Hooks:
    """The method's hooks, checked against the contract the first time (module docstring)."""
    hooks = _CHECKED.get(method)
    if hooks is None:
        hooks = _CHECKED[method] = _check(method)
    return hooks
