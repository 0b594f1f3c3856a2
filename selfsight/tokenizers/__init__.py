"""Image tokenizers the library trains itself for BEiT-style MIM (methods.md §11.3, §12.1).

=====  =====================================================  ===============================
kind   tokenizer                                              paper
=====  =====================================================  ===============================
dvae   ``DVAE``: Gumbel-softmax discrete VAE                   DALL-E (Ramesh et al. 2021), BEiT
vq     ``VQTokenizer``: EMA vector quantizer, pixel (VQ-VAE)   VQ-VAE (van den Oord et al. 2017),
       or teacher-feature (VQ-KD) target                      BEiT v2 (Peng et al. 2022)
=====  =====================================================  ===============================

Both are registered in ``artifact.TOKENIZERS``; a builder takes the constructor kwargs as a plain
dict (each module keeps it as ``.config``), so ``save_tokenizer(tok, kind, tok.config, preprocess,
path)`` / ``load_tokenizer(path)`` (``artifact.py``, the file format) round-trip.
"""
from __future__ import annotations

from selfsight.tokenizers.artifact import TOKENIZERS, load_tokenizer, save_tokenizer
from selfsight.tokenizers.dvae import DVAE
from selfsight.tokenizers.quantizer import Quantized, VectorQuantizer
from selfsight.tokenizers.vq import VQTokenizer


@TOKENIZERS.register("dvae")
def build_dvae(config: dict) -> DVAE:
    return DVAE(**config)


@TOKENIZERS.register("vq")
def build_vq(config: dict) -> VQTokenizer:
    return VQTokenizer(**config)


__all__ = ["DVAE", "Quantized", "TOKENIZERS", "VQTokenizer", "VectorQuantizer", "build_dvae", "build_vq",
           "load_tokenizer", "save_tokenizer"]
