"""The evaluation backbone alone, in a file other code can load: safetensors, torchvision, timm, ONNX.

``export(run, out, format)`` keeps only ``model.backbone`` of a run (the network evaluation uses:
DINO/iBOT the teacher's, MoCo the query encoder, ...); projector, predictor, teacher, decoder and
heads are thrown away. Every file carries its metadata (``metadata()``): method, backbone, image
size, normalization, channels, feature dim, selfsight version, the run's config and, for the
torchvision/timm formats, how to build the matching model. safetensors files keep it in their
header (string -> string; nested values JSON-encoded); ONNX files get a ``FILE.json`` sidecar.

Formats:

- ``safetensors``: selfsight's own state dict (``net.*``, plus ``mask_token`` / ``rel_pos_bias.*``
  when the run had them); ``load_backbone`` rebuilds the exact backbone from the metadata.
- ``torchvision`` (ResNets): torchvision's keys, with ``fc`` written as a D×D identity so the file
  loads with ``strict=True`` into ``torchvision.models.resnetXX(num_classes=D)`` and ``model(x)``
  returns the B×D features unchanged. Small stems, other widths and in_chans != 3 keep the
  torchvision module tree with a different ``conv1`` / stage width: ``torchvision_model(meta)``
  builds it (the metadata's ``torchvision.build`` says so in words).
- ``timm`` (ViTs): the keys of ``timm.create_model(meta["timm"]["name"], pretrained=False,
  **meta["timm"]["kwargs"])`` (num_classes=0: ``model(x)`` is the class token). Refused for runs
  with BEiT's shared relative position bias (no timm VisionTransformer holds that table).
- ``onnx``: ``torch.onnx.export`` of x (B×C×S×S, normalized) -> class-token / pooled features B×D,
  dynamic batch.
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torchvision
from safetensors import safe_open
from safetensors.torch import save

from selfsight import __version__
from selfsight.backbones.resnet import DEPTHS, ResNetBackbone, make_resnet
from selfsight.backbones.vit import SIZES, ViTBackbone
from selfsight.config import to_dict
from selfsight.files import atomic_write
from selfsight.runs import load_run

FORMATS = ("safetensors", "torchvision", "timm", "onnx")
STATE_SUFFIXES = (".safetensors", ".pt", ".pth")


# ---------------------------------------------------------------------- what a run holds
def _kind(backbone: nn.Module) -> str:
    if isinstance(backbone, ResNetBackbone):
        return "resnet"
    if isinstance(backbone, ViTBackbone):
        return "vit"
    raise ValueError(f"cannot export a {type(backbone).__name__} backbone: only selfsight's ResNet and ViT "
                     "backbones can be rebuilt from a file (save a custom module's state_dict yourself)")


def _torchvision_spec(backbone: nn.Module) -> dict:
    """How to build the torchvision ResNet whose state dict matches this backbone's ``net``."""
    net = backbone.net
    kind, layers = DEPTHS[backbone.name]
    c1 = net.conv1
    width = c1.out_channels
    stem = {"in_channels": c1.in_channels, "out_channels": width, "kernel_size": c1.kernel_size[0],
            "stride": c1.stride[0], "padding": c1.padding[0], "maxpool": not isinstance(net.maxpool, nn.Identity)}
    stock = (backbone.name != "resnet10" and width == 64 and stem == {"in_channels": 3, "out_channels": 64,
             "kernel_size": 7, "stride": 2, "padding": 3, "maxpool": True})
    d = backbone.embed_dim
    if stock:
        build = f"torchvision.models.{backbone.name}(num_classes={d})"
    else:
        build = (f"selfsight.deploy.torchvision_model(meta): torchvision.models.resnet.ResNet("
                 f"{'BasicBlock' if kind == 'basic' else 'Bottleneck'}, {layers}, num_classes={d}) with stage "
                 f"widths {width}x(1, 2, 4, 8), conv1 = Conv2d({stem['in_channels']}, {width}, "
                 f"{stem['kernel_size']}, stride={stem['stride']}, padding={stem['padding']}, bias=False)"
                 + ("" if stem["maxpool"] else ", maxpool = Identity()"))
    return {"block": kind, "layers": list(layers), "width": width, "num_classes": d, "stem": stem,
            "stock": stock, "build": build}


def _timm_spec(backbone: nn.Module, layer_scale: float) -> dict:
    if backbone.rel_pos_bias is not None:
        raise ValueError("--format timm: this ViT uses BEiT's shared relative position bias, which no timm "
                         "VisionTransformer holds; export --format safetensors (selfsight.load_backbone) or onnx")
    net = backbone.net
    kwargs = {"num_classes": 0, "img_size": int(net.patch_embed.img_size[0]),
              "patch_size": int(net.patch_embed.patch_size[0]), "in_chans": int(net.patch_embed.proj.in_channels),
              "depth": len(net.blocks), "dynamic_img_size": True}
    if not isinstance(net.blocks[0].ls1, nn.Identity):
        kwargs["init_values"] = layer_scale or 1e-5            # any value: the trained gammas are loaded
    name = SIZES[backbone.name]
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return {"name": name, "kwargs": kwargs, "build": f"timm.create_model({name!r}, pretrained=False, {args})"}


def metadata(backbone: nn.Module, cfg, pre: dict, fmt: str) -> dict:
    """What a user needs to feed the exported backbone and rebuild it (JSON-serialisable)."""
    meta = {"format": fmt, "selfsight": __version__, "method": cfg.method.name, "backbone": cfg.backbone.name,
            "kind": _kind(backbone), "image_size": int(pre["size"]), "mean": list(pre["mean"]),
            "std": list(pre["std"]), "channels": int(pre["channels"]), "feature_dim": int(backbone.embed_dim),
            "input": "float B×C×S×S: RGB (or gray) in [0, 1], resized to image_size, then (x - mean) / std",
            "config": to_dict(cfg)}
    if meta["kind"] == "resnet":
        meta["torchvision"] = _torchvision_spec(backbone)
    elif backbone.rel_pos_bias is None:
        meta["timm"] = _timm_spec(backbone, cfg.backbone.layer_scale)
    return meta


# ---------------------------------------------------------------------- state dicts per format
def _state(module: nn.Module, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU copies (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()
            if not k.startswith(drop)}


def torchvision_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """``backbone.net``'s state dict with ``fc`` as a D×D identity (torchvision's keys)."""
    sd = _state(backbone.net)
    d = backbone.embed_dim
    sd["fc.weight"] = torch.eye(d)
    sd["fc.bias"] = torch.zeros(d)
    return sd


def _check_format(kind: str, fmt: str, backbone: nn.Module) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "torchvision" and kind != "resnet":
        raise ValueError(f"--format torchvision holds ResNets; this run's backbone is a ViT ({backbone.name}): "
                         "use --format timm")
    if fmt == "timm" and kind != "vit":
        raise ValueError(f"--format timm holds ViTs; this run's backbone is a ResNet ({backbone.name}): "
                         "use --format torchvision")
    if fmt == "timm":
        _timm_spec(backbone, 0.0)                      # refuses a ViT that timm cannot hold


def _encode(meta: dict) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def sidecar(path: str | Path) -> Path:
    """``FILE.json``: the metadata beside an ONNX or torch (.pt/.pth) export."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def check_out_name(out: str | Path, fmt: str) -> None:
    """The file name must say what the file is: ``.onnx`` for ONNX; ``.safetensors`` or a torch
    file ``.pt``/``.pth`` for the state-dict formats. Anything else is refused in one line."""
    suffix = Path(out).suffix.lower()
    if fmt == "onnx":
        if suffix != ".onnx":
            raise ValueError(f"--format onnx writes an ONNX model: name the file .onnx (got {Path(out).name})")
    elif suffix not in STATE_SUFFIXES:
        raise ValueError(f"--format {fmt} writes a state dict: name the file .safetensors, or .pt/.pth for a torch "
                         f"file read with torch.load(weights_only=True) (got {Path(out).name})")


def read_metadata(path: str | Path) -> dict:
    """The metadata of an exported file (safetensors header, or the ``FILE.json`` sidecar of an
    ONNX or torch file)."""
    p = Path(path)
    if p.suffix.lower() in (".onnx", ".pt", ".pth"):
        side = sidecar(p)
        if not side.exists():
            raise ValueError(f"{p} has no metadata sidecar {side.name} (not written by selfsight export)")
        return json.loads(side.read_text())
    try:
        with safe_open(str(p), "pt") as f:
            raw = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{p} is not a safetensors file ({str(e).splitlines()[0]})") from None
    if "format" not in raw or "selfsight" not in raw:
        raise ValueError(f"{p} is a safetensors file without selfsight metadata (not written by selfsight export)")
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:            # plain strings are stored as is
            meta[k] = v
    return meta


class _Features(nn.Module):
    """x -> the B×D features the evaluation uses (ViT class token / pooled ResNet map)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x).cls


def _export_onnx(backbone: nn.Module, meta: dict, out: Path) -> None:
    s, c = meta["image_size"], meta["channels"]
    example = torch.randn(2, c, s, s)
    module = _Features(backbone).eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        torch.onnx.export(module, (example,), str(out), input_names=["image"], output_names=["features"],
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False, verbose=False)
    except ImportError as e:
        raise ValueError(f"--format onnx needs the onnx and onnxscript packages ({e}); "
                         "pip install onnx onnxscript") from None
    _write_sidecar(out, meta)


def _write_sidecar(out: Path, meta: dict) -> None:
    data = json.dumps(meta, indent=1).encode()
    atomic_write(sidecar(out), lambda f: f.write(data))


def export_backbone(backbone: nn.Module, meta: dict, out: str | Path, fmt: str = "safetensors") -> dict:
    """Write ``backbone`` (a selfsight ResNet/ViT backbone) as ``fmt`` to ``out`` with ``meta``:
    a ``.safetensors`` file (metadata in its header), a torch ``.pt``/``.pth`` state dict or an
    ``.onnx`` model (metadata in the ``FILE.json`` sidecar)."""
    out = Path(out)
    kind = _kind(backbone)
    _check_format(kind, fmt, backbone)
    check_out_name(out, fmt)
    meta = {**meta, "format": fmt}
    out.parent.mkdir(parents=True, exist_ok=True)
    backbone = backbone.cpu().eval()
    if fmt == "onnx":
        _export_onnx(backbone, meta, out)
        return meta
    if fmt == "safetensors":
        sd = _state(backbone)
    elif fmt == "torchvision":
        sd = torchvision_state(backbone)
    else:
        sd = _state(backbone.net)
    if out.suffix.lower() == ".safetensors":
        data = save(sd, metadata=_encode(meta))
        atomic_write(out, lambda f: f.write(data))
    else:                                          # .pt / .pth: the plain state dict, metadata beside it
        atomic_write(out, lambda f: torch.save(sd, f))
        _write_sidecar(out, meta)
    return meta


def export(run: str | Path, out: str | Path, format: str = "safetensors") -> dict:
    """Export the evaluation backbone of a run folder or checkpoint; returns the metadata written."""
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    check_out_name(out, format)                    # before the run is loaded: a wrong name fails at once
    model, cfg, pre = load_run(run, "cpu")
    backbone = model.backbone
    meta = metadata(backbone, cfg, pre, format)
    return export_backbone(backbone, meta, out, format)


# ---------------------------------------------------------------------- building the matching models
def torchvision_model(meta: dict) -> nn.Module:
    """The torchvision ``ResNet`` an exported ``torchvision`` file loads into with ``strict=True``
    (``torchvision.models.resnetXX(num_classes=D)`` for the stock architecture)."""
    spec = meta.get("torchvision")
    if spec is None:
        raise ValueError("this export holds no torchvision ResNet (its backbone is a ViT: see meta['timm'])")
    if spec["stock"]:
        return getattr(torchvision.models, meta["backbone"])(num_classes=spec["num_classes"])
    net = make_resnet(meta["backbone"], spec["width"])                     # torchvision's ResNet, other widths
    st = spec["stem"]
    net.conv1 = nn.Conv2d(st["in_channels"], st["out_channels"], st["kernel_size"], stride=st["stride"],
                          padding=st["padding"], bias=False)
    if not st["maxpool"]:
        net.maxpool = nn.Identity()
    net.fc = nn.Linear(net.fc.in_features, spec["num_classes"])
    return net


def timm_model(meta: dict) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` for an exported ``timm`` file."""
    spec = meta.get("timm")
    if spec is None:
        raise ValueError("this export holds no timm ViT (a ResNet: see meta['torchvision'], or a ViT with a "
                         "relative position bias: load it with selfsight.load_backbone)")
    return timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
