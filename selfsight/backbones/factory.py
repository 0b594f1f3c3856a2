"""Backbone registry: names -> builders taking the backbone config section."""
from __future__ import annotations

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
                           rel_pos_bias=cfg.rel_pos_bias, grad_checkpointing=cfg.grad_checkpointing)
    return build


for _name in DEPTHS:
    BACKBONES.register(_name)(_resnet(_name))
for _name in SIZES:
    BACKBONES.register(_name)(_vit(_name))


def build_backbone(cfg, in_chans: int, image_size: int):
    """Build the backbone named ``cfg.name`` for ``in_chans``-channel images of ``image_size`` px."""
    return BACKBONES.get(cfg.name)(cfg, cfg.in_chans or in_chans, image_size)
