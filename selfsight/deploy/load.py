"""``load_backbone(path)``: an exported file or a run -> (backbone in eval mode, its preprocessing)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF
from PIL import Image
from safetensors.torch import load_file

from selfsight.backbones import build_backbone
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


def _from_run(path: Path, device):
    model, cfg, pre = load_run(path, device)
    backbone = model.backbone.eval()
    meta = {"format": "run", "method": cfg.method.name, "backbone": cfg.backbone.name, "image_size": pre["size"],
            "mean": pre["mean"], "std": pre["std"], "channels": pre["channels"],
            "feature_dim": int(backbone.embed_dim)}
    return backbone, meta


def _from_export(path: Path, device):
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
        net = build_backbone(cfg.backbone, meta["channels"], meta["image_size"])
        if "mask_token" in sd:
            net.enable_masking("token")
    net.load_state_dict(sd, strict=True)
    return net.to(device).eval(), meta


def load_backbone(path: str | Path, device="cpu", with_meta: bool = False):
    """An exported file (``selfsight export``: .safetensors, or .pt/.pth with its FILE.json) or a run
    folder / checkpoint -> (backbone, preprocess).

    The backbone is in eval mode and maps normalized B×C×S×S inputs to B×D features
    (``backbone(x)``); selfsight's own backbones (safetensors exports and runs) also have
    ``forward_features(x) -> Features(cls, patch)``. ``preprocess`` (a ``Preprocess``) maps a PIL
    image or uint8 tensor to that input. ``with_meta=True`` adds the metadata dict as a third value.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist (give an exported .safetensors file, a run folder or a checkpoint)")
    if p.is_dir() or (p.suffix.lower() in (".pt", ".pth") and not sidecar(p).exists()):
        net, meta = _from_run(p, device)                # a run folder or its checkpoint
    else:
        net, meta = _from_export(p, device)
    pre = Preprocess.from_meta(meta)
    return (net, pre, meta) if with_meta else (net, pre)


@torch.no_grad()
def features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """B×D features of normalized inputs for any backbone ``load_backbone`` returns."""
    if hasattr(net, "forward_features") and hasattr(net, "embed_dim") and not hasattr(net, "default_cfg"):
        return net.forward_features(x).cls
    return net(x)
