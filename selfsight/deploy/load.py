"""``load_backbone(path)``: an exported file or a run -> (backbone in eval mode, its preprocessing)."""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF
from PIL import Image
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from selfsight.backbones import build_backbone, wrap
from selfsight.deploy.backbone import read_metadata, sidecar, timm_model, torchvision_model
from selfsight.files import load_plain
from selfsight.nn.images import eval_resize, to_channels
from selfsight.resolve import build_config
from selfsight.runs import load_run


class Preprocess:
    """A PIL image or uint8 tensor (C×H×W, or B×C×H×W) -> the normalized float input of the backbone.

    Channels are matched first (RGB -> gray with PIL's ITU-R 601 weights, gray -> RGB by
    repetition; ``nn.images.to_channels``), then the evaluation resize (``nn.images.eval_resize``: small images
    straight to S×S; large ones shorter side to S·256/224 and the central crop), then
    ``(x / 255 - mean) / std``. A single image gives C×S×S, a batch B×C×S×S.
    """

    def __init__(self, size: int, mean, std, channels: int):
        self.size, self.channels = int(size), int(channels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def from_meta(cls, meta: dict) -> "Preprocess":
        return cls(meta.get("image_size", meta.get("size")), meta["mean"], meta["std"], meta["channels"])

    def to_uint8(self, image) -> torch.Tensor:
        """PIL image / uint8 tensor -> uint8 C×H×W or B×C×H×W with the model's channel count."""
        if isinstance(image, Image.Image):
            image = image.convert("L" if self.channels == 1 else "RGB")
            return TF.pil_to_tensor(image)
        x = torch.as_tensor(image)
        if x.dtype != torch.uint8:
            raise ValueError(f"preprocess takes PIL images or uint8 tensors, got a {x.dtype} tensor")
        return to_channels(x, self.channels)                   # RGB -> luma as PIL's "L", gray -> repeated

    def __call__(self, image) -> torch.Tensor:
        x = self.to_uint8(image)
        single = x.ndim == 3
        x = eval_resize((x[None] if single else x).float() / 255, self.size)      # B×C×S×S in [0, 1]
        x = (x - self.mean) / self.std
        return x[0] if single else x

    def __repr__(self) -> str:
        return (f"Preprocess(size={self.size}, channels={self.channels}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()})")


def _from_run(path: Path, device, backbone=None):
    model, cfg, pre = load_run(path, device, backbone=backbone)
    backbone = model.backbone.eval()
    meta = {"format": "run", "method": cfg.method.name, "backbone": cfg.backbone.name, "image_size": pre["size"],
            "mean": pre["mean"], "std": pre["std"], "channels": pre["channels"],
            "feature_dim": int(backbone.embed_dim)}
    return backbone, meta


def _from_export(path: Path, device, backbone=None):
    meta = read_metadata(path)
    fmt = meta["format"]
    if fmt == "onnx":
        raise ValueError(f"{path} is an ONNX export: run it with onnxruntime, e.g. onnxruntime.InferenceSession("
                         f"'{path}').run(None, {{'image': x}}) (x: {meta['input']})")
    if path.suffix.lower() == ".safetensors":
        sd = load_file(str(path))
    else:
        sd = load_plain(path)
    if fmt == "torchvision":
        net = torchvision_model(meta)
    elif fmt == "timm":
        net = timm_model(meta)
    else:                                           # selfsight's own backbone, rebuilt from the saved config
        cfg = build_config(meta["config"], resolved=True)
        if backbone is not None:                     # a network of the user's own (custom:)
            net = wrap(backbone, in_chans=meta["channels"], probe_size=meta["image_size"])
        else:
            net = build_backbone(cfg.backbone, meta["channels"], meta["image_size"])
        if "mask_token" in sd:
            net.enable_masking("token")
    net.load_state_dict(sd, strict=True)
    return net.to(device).eval(), meta


def is_hub_folder(path: Path) -> bool:
    """A timm / Hugging Face hub folder: ``config.json`` and ``model.safetensors``."""
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _from_hub_folder(path: Path, device):
    """``export --format hf`` folders, and any timm hub folder (its ``pretrained_cfg`` gives the
    preprocessing): timm's own ``local-dir:`` route for timm models, the torchvision model of
    ``selfsight.json`` for torchvision ones."""
    config = json.loads((path / "config.json").read_text())
    own = path / "selfsight.json"
    meta = json.loads(own.read_text()) if own.is_file() else None
    if config.get("library") == "torchvision":
        if meta is None:
            raise ValueError(f"{path} is a torchvision folder without selfsight.json (not written by selfsight export)")
        net = torchvision_model(meta)
        net.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    else:
        net = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
        if meta is None:                        # a timm hub folder from elsewhere: timm's preprocessing
            cfg = config.get("pretrained_cfg", {})
            c, _, s = cfg.get("input_size", (3, 224, 224))
            meta = {"format": "hf", "method": "unknown", "backbone": f"timm:{config.get('architecture')}",
                    "image_size": s, "mean": cfg.get("mean", IMAGENET_DEFAULT_MEAN),
                    "std": cfg.get("std", IMAGENET_DEFAULT_STD), "channels": c,
                    "feature_dim": int(getattr(net, "head_hidden_size", None) or net.num_features)}
    return net.to(device).eval(), meta


def load_backbone(path: str | Path, device="cpu", with_meta: bool = False, backbone: nn.Module | None = None):
    """An exported file (``selfsight export``: .safetensors, or .pt/.pth with its FILE.json), a hub
    folder (``export --format hf``, or a timm hub folder) or a run folder / checkpoint -> (backbone,
    preprocess).

    The backbone is in eval mode and maps normalized B×C×S×S inputs to B×D features
    (``backbone(x)``); selfsight's own backbones (safetensors exports and runs) also have
    ``forward_features(x) -> Features(cls, patch)``. ``preprocess`` (a ``Preprocess``) maps a PIL
    image or uint8 tensor to that input. ``with_meta=True`` adds the metadata dict as a third value.
    ``backbone``: for a run (or its safetensors export) that trained a module given from Python
    (``custom:``), a new instance of it to load the weights into.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist (give an exported .safetensors file, a run folder or a checkpoint)")
    if is_hub_folder(p):
        net, meta = _from_hub_folder(p, device)
    elif p.is_dir() or (p.suffix.lower() in (".pt", ".pth") and not sidecar(p).exists()):
        net, meta = _from_run(p, device, backbone)      # a run folder or its checkpoint
    else:
        net, meta = _from_export(p, device, backbone)
    pre = Preprocess.from_meta(meta)
    return (net, pre, meta) if with_meta else (net, pre)


@torch.no_grad()
def features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """B×D features of normalized inputs for any backbone ``load_backbone`` returns."""
    if hasattr(net, "forward_features") and hasattr(net, "embed_dim") and not hasattr(net, "default_cfg"):
        return net.forward_features(x).cls
    return net(x)
