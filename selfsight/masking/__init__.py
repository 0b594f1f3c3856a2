"""Patch masks for masked image modeling (MAE random, BEiT block-wise, iBOT ratio range)."""
from selfsight.masking.generators import MaskGenerator, block_mask, random_mask

__all__ = ["MaskGenerator", "block_mask", "random_mask"]
