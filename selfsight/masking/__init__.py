"""Patch masks for masked image modeling (MAE random, BEiT block-wise, iBOT ratio range, I-JEPA multi-block)."""
from selfsight.masking.generators import MaskGenerator, block_mask, random_mask
from selfsight.masking.multiblock import MultiBlockMasker, MultiBlockMasks

__all__ = ["MaskGenerator", "MultiBlockMasker", "MultiBlockMasks", "block_mask", "random_mask"]
