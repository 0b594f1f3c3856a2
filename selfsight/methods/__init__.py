"""Methods: one short file each, composing backbones, heads and losses.

Each registers a ``MethodSpec``: its parameter dataclass (the ``method:`` config section),
a builder ``build(params, backbone) -> nn.Module`` and the recipe defaults it needs from the
other sections (optimizer, learning-rate scaling rule, ...), which recipes may override.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from selfsight.registry import Registry


@dataclass
class MethodSpec:
    params: type
    build: Callable
    defaults: dict = field(default_factory=dict)   # config tree merged under the user's recipe
    summary: str = ""


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, params: type, defaults: dict | None = None, summary: str = ""):
    def deco(build: Callable) -> Callable:
        METHODS.register(name)(MethodSpec(params, build, defaults or {}, summary))
        return build
    return deco


from selfsight.methods import barlow_twins, byol, dino, mim, moco, mocov3, simclr, simsiam, vicreg  # noqa: E402,F401  (registers)

__all__ = ["METHODS", "MethodSpec", "register_method"]
