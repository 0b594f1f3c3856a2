"""Backbone registry: names -> builders taking the backbone config section."""
from __future__ import annotations

import importlib

from selfsight.backbones.base import WrappedBackbone, wrap
from selfsight.backbones.hub import TorchvisionBackbone, build_timm, check_hub_name
from selfsight.backbones.resnet import DEPTHS, ResNetBackbone
from selfsight.backbones.vit import SIZES, ViTBackbone
from selfsight.registry import Registry

BACKBONES = Registry("backbone")


def resolve_stem(small_stem: str, image_size: int) -> str:
    """``backbone.small_stem=auto``: the CIFAR stem (3x3 stride 1, no max-pool; SimCLR's CIFAR
    ResNets) for views of 64 px and less, where the ImageNet stem's 4x downsampling would leave a
    1x1 or 2x2 last map; the ImageNet stem above."""
    if small_stem != "auto":
        return small_stem
    return "cifar" if image_size <= 64 else "none"


def _resnet(name: str):
    def build(cfg, in_chans: int, image_size: int) -> ResNetBackbone:
        return ResNetBackbone(name, in_chans, resolve_stem(cfg.small_stem, image_size), width=cfg.width,
                              zero_init_residual=cfg.zero_init_residual, grad_checkpointing=cfg.grad_checkpointing)
    return build


def _vit(name: str):
    def build(cfg, in_chans: int, image_size: int) -> ViTBackbone:
        return ViTBackbone(name, cfg.img_size or image_size, cfg.patch_size, in_chans, cfg.drop_path,
                           pos_embed=cfg.pos_embed, depth=cfg.depth, layer_scale=cfg.layer_scale,
                           rel_pos_bias=cfg.rel_pos_bias, grad_checkpointing=cfg.grad_checkpointing,
                           registers=cfg.registers, class_token=cfg.class_token)
    return build


for _name in DEPTHS:
    BACKBONES.register(_name)(_resnet(_name))
for _name in SIZES:
    BACKBONES.register(_name)(_vit(_name))


PREFIXES = ("timm:", "torchvision:", "python:", "custom:")


def custom_name(module) -> str:
    """``custom:package.module.Class``: the name a run records for a module given from Python."""
    inner = module.module if isinstance(module, WrappedBackbone) else module
    return f"custom:{type(inner).__module__}.{type(inner).__qualname__}"


def rebuild_refusal(name: str) -> str:
    """Why a ``custom:`` run cannot be rebuilt from its config, and which API call loads it."""
    return (f"this run trained a module given to selfsight.pretrain() ({name[7:]}), which its config cannot "
            "rebuild: load it from Python with a new instance of it, selfsight.load_backbone(RUN, backbone=MyNet()) "
            "or selfsight.evaluate(RUN, backbone=MyNet()), or train it as backbone.name=python:package.module:factory "
            "(a function taking in_chans and image_size) so that the CLI can rebuild it")


def check_backbone_name(name: str) -> None:
    """A registered short name, ``timm:NAME``, ``torchvision:NAME`` or ``python:module:factory``; a
    KeyError/ValueError with a suggestion otherwise."""
    if name.startswith(("timm:", "torchvision:")):
        check_hub_name(name)
    elif name.startswith("python:"):
        _factory(name)
    elif name.startswith("custom:"):
        return                                 # recorded by a run; build_backbone refuses to rebuild it
    else:
        BACKBONES.get(name)


def _factory(name: str):
    """``python:package.module:factory`` -> the callable (a user's own network)."""
    spec = name[len("python:"):]
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"backbone.name={name!r}: write python:package.module:factory")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"backbone.name={name!r}: cannot import {attr} from {module} ({e}; is its folder on "
                         "PYTHONPATH or the package installed?)") from None
    if not callable(fn):
        raise ValueError(f"backbone.name={name!r}: {attr} is not callable")
    return fn


def build_backbone(cfg, in_chans: int, image_size: int, pretrained: bool = False):
    """Build the backbone named ``cfg.name`` for ``in_chans``-channel images of ``image_size`` px.
    ``pretrained``: timm's or torchvision's own weights (``backbone.pretrained``; only a new run asks
    for them: a run rebuilt from its checkpoint gets its own weights). ``python:module:factory``
    is called with ``in_chans`` and ``image_size`` and put behind the contract (``wrap``)."""
    c = cfg.in_chans or in_chans
    if cfg.name.startswith("timm:"):
        return build_timm(cfg.name[5:], c, image_size, pretrained, cfg.pretrained_file if pretrained else "",
                          cfg.drop_path, cfg.grad_checkpointing)
    if cfg.name.startswith("torchvision:"):
        return TorchvisionBackbone(cfg.name[12:], c, image_size, pretrained)
    if cfg.name.startswith("custom:"):
        raise ValueError(rebuild_refusal(cfg.name))
    if cfg.name.startswith("python:"):
        return wrap(_factory(cfg.name)(in_chans=c, image_size=image_size), in_chans=c, probe_size=image_size)
    return BACKBONES.get(cfg.name)(cfg, c, image_size)
