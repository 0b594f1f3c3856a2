"""Methods: one short file each, composing backbones, heads and losses.

Each registers a ``MethodSpec``: its parameter dataclass (the ``method:`` config section),
a builder ``build(params, backbone) -> nn.Module`` and the recipe defaults it needs from the
other sections (optimizer, learning-rate scaling rule, ...), which recipes may override.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from selfsight.backbones import build_backbone, wrap
from selfsight.backbones.hub import is_vit
from selfsight.backbones.vit import SIZES
from selfsight.methods.contract import Hooks, MethodContractError, hooks_of
from selfsight.registry import Registry


@dataclass
class MethodSpec:
    params: type
    build: Callable
    defaults: dict = field(default_factory=dict)   # config tree merged under the user's recipe
    summary: str = ""
    needs_backbone: bool = True     # False: build(params, None, channels=C, image_size=S) (e.g. tokenizers)
    check: Callable | None = None   # cfg -> None, or (key, what is wrong, value): the method's own config rules
    input_shape: bool = False       # True: build(params, backbone, channels=C, image_size=S) (e.g. distill)


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, params: type, defaults: dict | None = None, summary: str = "",
                    needs_backbone: bool = True, check: Callable | None = None, input_shape: bool = False):
    """Register a method under ``name``: its parameter dataclass (the ``method:`` section, each field
    with its rule), the builder, the recipe defaults it brings, a summary line and ``check(cfg)``,
    the rules that concern this method alone (applied by ``resolve`` before anything is built)."""
    def deco(build: Callable) -> Callable:
        METHODS.register(name)(MethodSpec(params, build, defaults or {}, summary, needs_backbone, check, input_shape))
        return build
    return deco


def vit_only(cfg):
    """A ``check``: masked image modeling masks patches, so the backbone must be a ViT with patch
    tokens and masking (a built-in one, or a timm VisionTransformer by ``timm:NAME``)."""
    if cfg.backbone.name not in SIZES and not is_vit(cfg.backbone.name):
        return ("backbone.name", f"must be a ViT ({', '.join(SIZES)}, or timm:NAME of a timm VisionTransformer) "
                f"for method {cfg.method.name} (masked image modeling masks patches)", cfg.backbone.name)
    return None


def build_method(cfg, channels: int, image_size: int, backbone=None):
    """The method of a run config around ``backbone`` (default: the one ``cfg.backbone`` names),
    checked against the method contract once (``contract.hooks_of``)."""
    spec = METHODS.get(cfg.method.name)
    if not spec.needs_backbone:                       # e.g. a tokenizer: the method is the whole network
        method = spec.build(cfg.method, None, channels=channels, image_size=image_size)
    else:
        if backbone is None:
            backbone = build_backbone(cfg.backbone, channels, image_size)
        shape = {"channels": channels, "image_size": image_size} if spec.input_shape else {}
        method = spec.build(cfg.method, wrap(backbone, in_chans=channels, probe_size=image_size), **shape)
    hooks_of(method)
    return method


from selfsight.methods import (  # noqa: E402,F401  (registers)
    barlow_twins,
    byol,
    dino,
    dinov2,
    distill,
    ibot,
    ijepa,
    mim,
    moco,
    mocov3,
    simclr,
    simsiam,
    tokenizer,
    vicreg,
)

__all__ = ["METHODS", "MethodSpec", "register_method", "build_method", "Hooks", "MethodContractError", "hooks_of"]
