"""Backbones behind one contract: ``embed_dim`` and ``forward_features(x, mask) -> Features``."""
from selfsight.backbones.base import Features, WrappedBackbone, wrap
from selfsight.backbones.factory import BACKBONES, build_backbone

__all__ = ["Features", "WrappedBackbone", "wrap", "BACKBONES", "build_backbone"]
