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
    needs_backbone: bool = True     # False: build(params, None, channels=C, image_size=S) (e.g. tokenizers)


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, params: type, defaults: dict | None = None, summary: str = "",
                    needs_backbone: bool = True):
    def deco(build: Callable) -> Callable:
        METHODS.register(name)(MethodSpec(params, build, defaults or {}, summary, needs_backbone))
        return build
    return deco


from selfsight.methods import barlow_twins, byol, dino, ibot, mim, moco, mocov3, simclr, simsiam, tokenizer, vicreg  # noqa: E402,F401  (registers)

__all__ = ["METHODS", "MethodSpec", "register_method"]
