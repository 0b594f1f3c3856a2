"""MIM targets: the teacher T of the unified view (methods.md §14). Each target maps the
intact, normalized view B×C×H×W and the student's patch grid (h, w) to one target per patch:
B×N×dim floats, or B×N long ids when ``discrete``.

========  ==========================================================  =====================
kind      target                                                      paper
========  ==========================================================  =====================
pixels    the patch's pixels (p·p·C)                                  MAE
hog       HOG: 9 unsigned bins per cell, per-cell L2, per channel     MaskFeat
teacher   patch features of a frozen network (file, timm, torchvision) MaskDistill
ema       patch features of an EMA copy of the student                data2vec-style
tokens    visual-token ids of a tokenizer artifact                    BEiT
========  ==========================================================  =====================
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from selfsight.targets.features import FeatureTarget, InputAdapter, TokenTarget, load_teacher
from selfsight.targets.hog import HOG
from selfsight.targets.pixels import NORMS, normalize_target, patchify, unpatchify
from selfsight.tokenizers import TOKENIZERS, load_tokenizer, save_tokenizer

TARGETS = ("pixels", "hog", "teacher", "ema", "tokens")


class PixelTarget(nn.Module):
    discrete = False

    def __init__(self, patch: int, channels: int):
        super().__init__()
        self.patch, self.dim = patch, patch * patch * channels

    def forward(self, x: torch.Tensor, grid: tuple) -> torch.Tensor:
        return patchify(x.float(), self.patch)                                 # B×N×(p·p·C)


class HOGTarget(nn.Module):
    discrete = False

    def __init__(self, patch: int, channels: int, nbins: int = 9, cell: int = 8):
        super().__init__()
        if patch % cell:
            raise ValueError(f"method.target.hog_cell={cell} must divide the patch size {patch}")
        self.hog, self.patch = HOG(nbins, cell, channels), patch
        self.dim = channels * nbins * (patch // cell) ** 2

    def forward(self, x: torch.Tensor, grid: tuple) -> torch.Tensor:
        return self.hog(x, self.patch)                                         # B×N×(C·bins·cells)


def build_teacher_target(params, preprocess: dict, key: str = "method.target") -> "FeatureTarget":
    """A frozen teacher from ``params`` (``teacher``, ``teacher_weights``, ``teacher_size``,
    ``teacher_dim``) fed the student's input (``preprocess``: its {mean, std}) converted to its own;
    ``key`` names the config section in errors.
    Its width is written back to ``params.teacher_dim``; when the teacher's file is gone and the
    width is known, the target is a placeholder that fails only if called (a finished run stays
    loadable). Shared by MaskDistill-style targets and VQ-KD tokenizers."""
    if not params.teacher:
        raise ValueError(f"a teacher target needs {key}.teacher: a selfsight run folder or checkpoint, "
                         f"or timm:NAME / torchvision:NAME with {key}.teacher_weights")
    local = not params.teacher.startswith(("timm:", "torchvision:"))
    if local and not Path(params.teacher).exists() and params.teacher_dim > 0:
        return FeatureTarget(None, None, params.teacher_dim, missing=(
            f"the teacher {params.teacher!r} is needed to train this run and does not exist"))
    net, pre = load_teacher(params.teacher, params.teacher_weights)
    adapter = InputAdapter(preprocess["mean"], preprocess["std"], pre["mean"], pre["std"],
                           params.teacher_size, pre.get("channels", 3))
    params.teacher_dim = int(net.embed_dim)
    return FeatureTarget(net, adapter, net.embed_dim)


def build_target(params, student: nn.Module, preprocess: dict, ema_network: nn.Module | None = None) -> nn.Module:
    """``params``: the ``method.target`` section; ``preprocess``: the student's {mean, std}.
    A frozen teacher's width is written back to ``params.teacher_dim`` so that a saved config
    rebuilds the run without the teacher's file."""
    kind = params.kind
    patch = student.patch_size
    channels = student.net.patch_embed.proj.in_channels
    if kind == "pixels":
        return PixelTarget(patch, channels)
    if kind == "hog":
        return HOGTarget(patch, channels, params.hog_bins, params.hog_cell)
    if kind == "ema":
        return FeatureTarget(ema_network, None, ema_network.embed_dim, frozen=False)   # same input as the student
    if kind == "teacher":
        return build_teacher_target(params, preprocess)
    if kind == "tokens":
        if not params.tokenizer:
            raise ValueError("method.target.kind=tokens needs method.target.tokenizer: the path of a tokenizer "
                             "artifact (selfsight tokenizer train)")
        tok, pre = load_tokenizer(params.tokenizer)
        adapter = InputAdapter(preprocess["mean"], preprocess["std"], pre["mean"], pre["std"], pre.get("size", 0),
                               pre.get("channels", channels))
        return TokenTarget(tok, adapter)
    raise ValueError(f"method.target.kind must be one of {', '.join(TARGETS)}, got {kind!r}")


__all__ = ["FeatureTarget", "HOG", "HOGTarget", "InputAdapter", "NORMS", "PixelTarget", "TARGETS", "TOKENIZERS",
           "TokenTarget", "build_target", "build_teacher_target", "load_teacher", "load_tokenizer", "normalize_target", "patchify",
           "save_tokenizer", "unpatchify"]
