"""Backbone registry: names -> builders taking the backbone config section."""
from __future__ import annotations

from selfsight.backbones.resnet import DEPTHS, ResNetBackbone
from selfsight.backbones.vit import SIZES, ViTBackbone
from selfsight.registry import Registry

BACKBONES = Registry("backbone")

for _name in DEPTHS:
    BACKBONES.register(_name)(
        lambda cfg, in_chans, image_size, _n=_name: ResNetBackbone(_n, in_chans, cfg.small_stem, width=cfg.width,
                                                                  zero_init_residual=cfg.zero_init_residual,
                                                                  grad_checkpointing=cfg.grad_checkpointing))
for _name in SIZES:
    BACKBONES.register(_name)(
        lambda cfg, in_chans, image_size, _n=_name: ViTBackbone(_n, cfg.img_size or image_size, cfg.patch_size,
                                                                in_chans, cfg.drop_path, pos_embed=cfg.pos_embed,
                                                                depth=cfg.depth, layer_scale=cfg.layer_scale,
                                                                rel_pos_bias=cfg.rel_pos_bias,
                                                                grad_checkpointing=cfg.grad_checkpointing))


def build_backbone(cfg, in_chans: int, image_size: int):
    """Build the backbone named ``cfg.name`` for ``in_chans``-channel images of ``image_size`` px."""
    return BACKBONES.get(cfg.name)(cfg, cfg.in_chans or in_chans, image_size)
