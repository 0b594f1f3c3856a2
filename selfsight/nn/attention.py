"""Which scaled-dot-product-attention kernel a token sequence runs on.

On the CPU, PyTorch's flash-attention kernel (its default there) is 1.5-3.4x slower than the
plain math kernel (Q·Kᵀ, softmax, ·V as separate ops) for short sequences, forward plus
backward in bf16: measured on a 2-core CPU for 13-160 tokens with 32/64-wide heads; from about
197 tokens on, flash is faster (benchmarks/mae_sparse_vs_dense.py, docs/mim.md). ViTs on small
images, MAE's sparse encoder (a quarter of the tokens) and small decoders all live below that
line. On CUDA the choice is left to PyTorch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

CPU_MATH_MAX_TOKENS = 160


def attention_kernels(tokens: torch.Tensor):
    """A context for the attention layers over ``tokens`` (B×N×D): the math kernel on the CPU for
    N ≤ 160, PyTorch's own choice otherwise."""
    if tokens.device.type == "cpu" and tokens.shape[1] <= CPU_MATH_MAX_TOKENS:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def use_sdpa(module: nn.Module) -> nn.Module:
    """Every timm attention layer in ``module`` on ``F.scaled_dot_product_attention`` (timm's
    ``fused_attn``), whatever ``TIMM_FUSED_ATTN`` says: the fused kernels on CUDA, the kernel
    choice above on the CPU, and no B×heads×N×N matrix kept for backward. Returns ``module``."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    return module
