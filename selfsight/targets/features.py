"""Targets from another network: the features of a frozen teacher (MaskDistill, Peng et al.
2022, methods.md §14: the teacher in eval mode under no_grad on the UNMASKED image, pitfall
22), the features of an EMA teacher, and the ids of a tokenizer (BEiT).

The teacher sees the same crop as the student, converted to its own input: un-normalized
with the student's mean/std, gray repeated to RGB when the teacher wants 3 channels, resized
to ``size``, normalized with the teacher's mean/std. Its patch features (B×h×w×D, or a
ConvNet's last map) are resized bilinearly to the student's patch grid when the grids differ.

Frozen teachers (``load_teacher``) come from:
* a selfsight run folder or checkpoint: its evaluation backbone and preprocessing;
* ``timm:NAME`` + a local weights file: ``timm.create_model(NAME, pretrained=False)``, patch
  tokens of ``forward_features`` (prefix tokens dropped), the model's own mean/std;
* ``torchvision:NAME`` + a local weights file: all children but the last two (pooling and
  classifier) give the feature map (ResNets, ConvNeXts), ImageNet mean/std.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file

from selfsight.backbones.base import Features, wrap
from selfsight.files import load_plain
from selfsight.nn.images import to_channels


class InputAdapter(nn.Module):
    """Student-normalized views -> the teacher's input (channels, size, normalization)."""

    def __init__(self, src_mean, src_std, dst_mean, dst_std, size: int = 0, channels: int = 0):
        super().__init__()
        for name, v in (("src_mean", src_mean), ("src_std", src_std), ("dst_mean", dst_mean), ("dst_std", dst_std)):
            self.register_buffer(name, torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.size, self.channels = size, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.src_std + self.src_mean                          # back to [0, 1]
        if self.channels:
            x = to_channels(x, self.channels)
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        return (x - self.dst_mean) / self.dst_std


def _to_grid(patch: torch.Tensor, grid: tuple) -> torch.Tensor:
    """B×n×D teacher tokens on a square grid -> B×N×D on the student's (h, w) grid."""
    b, n, d = patch.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"teacher gives {n} patch tokens, not a square grid")
    if (side, side) == tuple(grid):
        return patch
    m = patch.transpose(1, 2).reshape(b, d, side, side).float()
    m = F.interpolate(m, size=tuple(grid), mode="bilinear", align_corners=False)
    return m.flatten(2).transpose(1, 2)


class TimmTokens(nn.Module):
    """A timm model behind the backbone contract (patch tokens without prefix tokens)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.embed_dim = model.num_features

    def forward_features(self, x: torch.Tensor, mask=None) -> Features:
        out = self.model.forward_features(x)
        if out.ndim == 4:                                                     # ConvNet map B×D×h×w
            return Features(out.mean((2, 3)), out.flatten(2).transpose(1, 2))
        prefix = getattr(self.model, "num_prefix_tokens", 1)
        return Features(out[:, 0], out[:, prefix:])


def _load_weights(path: str) -> dict:
    if not path:
        raise ValueError("a timm: or torchvision: teacher needs method.target.teacher_weights (a local file; "
                         "nothing is downloaded)")
    if str(path).endswith(".safetensors"):
        return load_file(path)
    state = load_plain(path)                    # weights_only: a pickled code payload is refused, never run
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def load_teacher(spec: str, weights: str = "") -> tuple[nn.Module, dict]:
    """-> (frozen network with ``forward_features``, preprocess {size, mean, std, channels})."""
    if spec.startswith("timm:"):
        try:                                     # ViTs: any input size (teacher_size)
            model = timm.create_model(spec[5:], pretrained=False, num_classes=0, dynamic_img_size=True)
        except TypeError:
            model = timm.create_model(spec[5:], pretrained=False, num_classes=0)
        _strict_load(model, _load_weights(weights), spec)
        cfg = model.pretrained_cfg
        net, pre = TimmTokens(model), {"size": cfg.get("input_size", (3, 224, 224))[-1], "mean": list(cfg["mean"]),
                                       "std": list(cfg["std"]), "channels": cfg.get("input_size", (3,))[0]}
    elif spec.startswith("torchvision:"):
        model = torchvision.models.get_model(spec[12:], weights=None)
        _strict_load(model, _load_weights(weights), spec)
        net = wrap(nn.Sequential(*list(model.children())[:-2]), in_chans=3, probe_size=64)
        pre = {"size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": 3}
    else:
        if not Path(spec).exists():
            raise FileNotFoundError(f"method.target.teacher {spec!r}: no such run folder or checkpoint "
                                    "(or name a model as timm:NAME / torchvision:NAME with teacher_weights)")
        from selfsight.runs import load_run  # the one upward import: a teacher that is an earlier run
        method, _, pre = load_run(spec)
        net = method.backbone
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), pre


def _strict_load(model: nn.Module, state: dict, spec: str) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "classifier."))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:                    # shape mismatches
        raise ValueError(f"teacher weights do not fit {spec}: {str(e).splitlines()[1].strip()}") from None
    missing = [k for k in missing if not k.startswith(("fc.", "head.", "classifier."))]
    if missing or unexpected:
        raise ValueError(f"teacher weights do not fit {spec}: missing {missing[:5]}, unexpected {unexpected[:5]}")


class FeatureTarget(nn.Module):
    """Patch features of a teacher network on the intact view, on the student's grid: B×N×D.

    ``frozen=True``: the network is held outside the module tree (not trained, never put in
    train mode, not checkpointed: it is re-read from its file when a run resumes).
    ``frozen=False``: an EMA teacher, a registered submodule that the method updates and
    checkpoints. ``network=None`` builds a target that only knows its width (evaluating a run
    whose teacher file is gone); using it raises ``missing``."""

    discrete = False

    def __init__(self, network: nn.Module | None, adapter: InputAdapter | None, dim: int, frozen: bool = True,
                 missing: str = ""):
        super().__init__()
        self.adapter, self.dim, self.missing = adapter, dim, missing
        self._frozen = [network] if frozen and network is not None else []
        self.network = None if frozen else network

    @torch.no_grad()
    def forward(self, x: torch.Tensor, grid: tuple) -> torch.Tensor:
        net = self.network if self.network is not None else (self._frozen[0] if self._frozen else None)
        if net is None:
            raise FileNotFoundError(self.missing)
        if self._frozen and next(net.parameters()).device != x.device:
            net.to(x.device)
        x = x if self.adapter is None else self.adapter(x)                   # None: the student's own input
        return _to_grid(net.forward_features(x).patch, grid)


class TokenTarget(nn.Module):
    """Visual-token ids of a tokenizer (BEiT) on the intact view: B×N long."""

    discrete = True

    def __init__(self, tokenizer: nn.Module, adapter: InputAdapter):
        super().__init__()
        self._tokenizer = [tokenizer]                 # frozen, not checkpointed with the run
        self.adapter = adapter
        self.dim = tokenizer.vocab_size

    @torch.no_grad()
    def forward(self, x: torch.Tensor, grid: tuple) -> torch.Tensor:
        tok = self._tokenizer[0]
        if next(tok.parameters(), torch.empty(0, device=x.device)).device != x.device:
            tok.to(x.device)
        ids = tok.encode(self.adapter(x))                                      # B×h×w
        if tuple(ids.shape[1:]) != tuple(grid):
            raise ValueError(f"the tokenizer gives a {tuple(ids.shape[1:])} token grid, the student a {tuple(grid)} "
                             "patch grid: set the tokenizer's input size so that the grids match")
        return ids.flatten(1)
