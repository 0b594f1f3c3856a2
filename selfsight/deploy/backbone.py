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
  Other torchvision models (``torchvision:NAME``): the model's keys with its classifier (the last
  ``Linear``) written as a D×D identity, for ``torchvision.models.get_model(NAME, num_classes=D)``.
- ``timm`` (ViTs, ``timm:NAME``): the keys of ``timm.create_model(meta["timm"]["name"],
  pretrained=False, **meta["timm"]["kwargs"])`` (num_classes=0: ``model(x)`` is the pooled feature;
  the kwargs are timm's own record of the construction, ``get_model_args``). Refused for runs with
  BEiT's shared relative position bias (no timm VisionTransformer holds that table).
- ``hf``: a folder in the timm / Hugging Face hub layout (``config.json`` with the architecture,
  its arguments, input size, mean and std; ``model.safetensors``) that
  ``timm.create_model("local-dir:DIR", pretrained=True)`` loads (timm-backed backbones); torchvision
  ResNets and models get the same layout with their torchvision state (``selfsight.load_backbone``
  reads both); ``selfsight.json`` beside them keeps selfsight's metadata.
- ``onnx``: ``torch.onnx.export`` of x (B×C×S×S, normalized) -> class-token / pooled features B×D,
  dynamic batch.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torchvision
from safetensors import safe_open
from safetensors.torch import save
from timm.models import get_model_args, save_for_hf

from selfsight import __version__
from selfsight.backbones.hub import TimmBackbone, TorchvisionBackbone, adapt_first_conv
from selfsight.backbones.resnet import DEPTHS, ResNetBackbone, make_resnet
from selfsight.backbones.vit import SIZES, ViTBackbone
from selfsight.config import to_dict
from selfsight.files import atomic_write
from selfsight.runs import load_run

log = logging.getLogger("selfsight")

FORMATS = ("safetensors", "torchvision", "timm", "hf", "onnx")
STATE_SUFFIXES = (".safetensors", ".pt", ".pth")
# where timm's own weights came from: not true of an exported run
SOURCE_KEYS = ("hf_hub_id", "hf_hub_filename", "url", "file", "license", "paper_ids", "paper_name", "origin_url",
               "notes", "source")


# ---------------------------------------------------------------------- what a run holds
def _kind(backbone: nn.Module, name: str = "") -> str:
    """resnet (selfsight's torchvision ResNets), vit (ViTBackbone: built-in or timm), timm (any
    other timm model), torchvision (any other torchvision model) or module (a user's own network:
    ``python:module:factory`` or a module given from Python, ``custom:``)."""
    if isinstance(backbone, ResNetBackbone):
        return "resnet"
    if isinstance(backbone, ViTBackbone):
        return "vit"
    if isinstance(backbone, TimmBackbone):
        return "timm"
    if isinstance(backbone, TorchvisionBackbone):
        return "torchvision"
    if name.startswith(("python:", "custom:")):
        return "module"
    raise ValueError(f"cannot export a {type(backbone).__name__} backbone: a module given to selfsight.pretrain() "
                     "cannot be rebuilt from a file; train it as backbone.name=python:package.module:factory, or "
                     "save its state_dict yourself")


def _timm_backed(kind: str) -> bool:
    return kind in ("vit", "timm")


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
    if getattr(backbone, "rel_pos_bias", None) is not None:
        raise ValueError("--format timm: this ViT uses BEiT's shared relative position bias, which no timm "
                         "VisionTransformer holds; export --format safetensors (selfsight.load_backbone) or onnx")
    net = backbone.net
    if backbone.name in SIZES:
        kwargs = {"num_classes": 0, "img_size": int(net.patch_embed.img_size[0]),
                  "patch_size": int(net.patch_embed.patch_size[0]), "in_chans": int(net.patch_embed.proj.in_channels),
                  "depth": len(net.blocks), "dynamic_img_size": True}
        if net.cls_token is None:                                   # mean-pooled, final norm on the tokens
            kwargs.update(class_token=False, global_pool="avg", fc_norm=False)
        if getattr(net, "num_reg_tokens", 0):
            kwargs["reg_tokens"] = int(net.num_reg_tokens)
        if not isinstance(net.blocks[0].ls1, nn.Identity):
            kwargs["init_values"] = layer_scale or 1e-5            # any value: the trained gammas are loaded
        name = SIZES[backbone.name]
    else:                                                           # timm:NAME: timm's own record of the build
        kwargs = json.loads(json.dumps(get_model_args(net)))       # tuples as lists (JSON)
        name = net.pretrained_cfg.get("architecture") or backbone.name.removeprefix("timm:")
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return {"name": name, "kwargs": kwargs, "build": f"timm.create_model({name!r}, pretrained=False, {args})"}


def _torchvision_model_spec(backbone: TorchvisionBackbone) -> dict:
    """How to build the torchvision model whose state dict matches ``backbone.net``."""
    d, c = backbone.embed_dim, backbone.in_chans
    extra = f", image_size={backbone.image_size}" if backbone.name.startswith("vit_") else ""
    build = f"torchvision.models.get_model({backbone.name!r}, num_classes={d}{extra})"
    if c != 3:
        build = f"selfsight.deploy.torchvision_model(meta): {build} with its first convolution taking {c} channels"
    return {"name": backbone.name, "num_classes": d, "in_chans": c, "head": backbone.head_name,
            "image_size": backbone.image_size, "stock": c == 3, "build": build}


def metadata(backbone: nn.Module, cfg, pre: dict, fmt: str) -> dict:
    """What a user needs to feed the exported backbone and rebuild it (JSON-serialisable)."""
    meta = {"format": fmt, "selfsight": __version__, "method": cfg.method.name, "backbone": cfg.backbone.name,
            "kind": _kind(backbone, cfg.backbone.name), "image_size": int(pre["size"]), "mean": list(pre["mean"]),
            "std": list(pre["std"]), "channels": int(pre["channels"]), "feature_dim": int(backbone.embed_dim),
            "input": "float B×C×S×S: RGB (or gray) in [0, 1], resized to image_size, then (x - mean) / std",
            "config": to_dict(cfg)}
    if meta["kind"] == "resnet":
        meta["torchvision"] = _torchvision_spec(backbone)
    elif meta["kind"] == "torchvision":
        meta["torchvision"] = _torchvision_model_spec(backbone)
    elif _timm_backed(meta["kind"]) and getattr(backbone, "rel_pos_bias", None) is None:
        meta["timm"] = _timm_spec(backbone, cfg.backbone.layer_scale)
    return meta


# ---------------------------------------------------------------------- state dicts per format
def _state(module: nn.Module, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU copies (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()
            if not k.startswith(drop)}


def torchvision_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """``backbone.net``'s state dict with the classifier as a D×D identity (torchvision's keys:
    ``fc`` for ResNets, the removed last ``Linear`` for other models)."""
    sd = _state(backbone.net)
    d = backbone.embed_dim
    head = getattr(backbone, "head_name", "fc")
    sd[f"{head}.weight"] = torch.eye(d)
    sd[f"{head}.bias"] = torch.zeros(d)
    return sd


def _check_format(kind: str, fmt: str, backbone: nn.Module, name: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt in ("torchvision", "timm", "hf") and kind == "module":
        raise ValueError(f"--format {fmt} holds {'timm or torchvision' if fmt == 'hf' else fmt} models; this run's "
                         f"backbone is a network of your own ({name}): use --format safetensors "
                         "(selfsight.load_backbone rebuilds it) or onnx")
    if fmt == "torchvision" and kind not in ("resnet", "torchvision"):
        raise ValueError(f"--format torchvision holds torchvision models; this run's backbone is {name}, "
                         "a timm model: use --format timm")
    if fmt == "timm" and not _timm_backed(kind):
        raise ValueError(f"--format timm holds timm models; this run's backbone is {name}, a torchvision "
                         "model: use --format torchvision")
    if fmt in ("timm", "hf") and _timm_backed(kind):
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
    elif fmt == "hf":
        if suffix:
            raise ValueError(f"--format hf writes a folder (config.json, model.safetensors): give a folder name "
                             f"without a suffix (got {Path(out).name})")
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
    t0 = time.perf_counter()
    log.info("exporting %s to ONNX through torch.export (tens of seconds on a CPU for a large model)",
             meta["backbone"])
    try:
        torch.onnx.export(module, (example,), str(out), input_names=["image"], output_names=["features"],
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False, verbose=False)
    except ImportError as e:
        raise ValueError(f"--format onnx needs the onnx and onnxscript packages ({e}); "
                         "pip install onnx onnxscript") from None
    except Exception as e:                     # noqa: BLE001  torch.export's errors run to pages
        report = out.with_name(out.name + ".error.txt")
        report.write_text("".join(traceback.format_exception(e)))
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if line.startswith("<class '")), lines[0])    # the underlying error
        raise ValueError(f"torch.onnx.export could not export {meta['backbone']} with a dynamic batch "
                         f"({reason[:200]}); "
                         f"the whole error is in {report}; the safetensors, timm, torchvision and hf formats do not "
                         "depend on torch.export") from None
    log.info("ONNX export done in %.0f s", time.perf_counter() - t0)
    _write_sidecar(out, meta)


def _write_sidecar(out: Path, meta: dict) -> None:
    data = json.dumps(meta, indent=1).encode()
    atomic_write(sidecar(out), lambda f: f.write(data))


def export_backbone(backbone: nn.Module, meta: dict, out: str | Path, fmt: str = "safetensors") -> dict:
    """Write ``backbone`` (a selfsight ResNet/ViT backbone) as ``fmt`` to ``out`` with ``meta``:
    a ``.safetensors`` file (metadata in its header), a torch ``.pt``/``.pth`` state dict or an
    ``.onnx`` model (metadata in the ``FILE.json`` sidecar)."""
    out = Path(out)
    kind = _kind(backbone, meta.get("backbone", ""))
    _check_format(kind, fmt, backbone, meta.get("backbone", ""))
    check_out_name(out, fmt)
    meta = {**meta, "format": fmt}
    out.parent.mkdir(parents=True, exist_ok=True)
    backbone = backbone.cpu().eval()
    if fmt == "onnx":
        _export_onnx(backbone, meta, out)
        return meta
    if fmt == "hf":
        _export_hub_folder(backbone, meta, out, kind)
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


def _export_hub_folder(backbone: nn.Module, meta: dict, out: Path, kind: str) -> None:
    """The timm / Hugging Face hub layout (module docstring), written through a temporary folder."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    c, s = meta["channels"], meta["image_size"]
    data = {"input_size": (c, s, s), "mean": tuple(meta["mean"]), "std": tuple(meta["std"]),
            "interpolation": "bilinear", "crop_pct": 1.0 if s <= 64 else 224 / 256}
    if _timm_backed(kind):
        save_for_hf(backbone.net, str(tmp), model_args=get_model_args(backbone.net), safe_serialization=True,
                    data_config=data)
        config = json.loads((tmp / "config.json").read_text())
        for key in SOURCE_KEYS:                     # the weights are this run's, not the ones timm would fetch
            config["pretrained_cfg"].pop(key, None)
        config["pretrained_cfg"]["tag"] = "selfsight"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    else:
        spec = meta["torchvision"]
        config = {"architecture": spec.get("name", meta["backbone"]), "library": "torchvision",
                  "num_classes": spec["num_classes"],
                  "pretrained_cfg": {**data, "input_size": list(data["input_size"])}}
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / "model.safetensors").write_bytes(save(torchvision_state(backbone)))
    (tmp / "selfsight.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


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
    """The torchvision model an exported ``torchvision`` file loads into with ``strict=True``
    (``torchvision.models.resnetXX(num_classes=D)`` or ``get_model(NAME, num_classes=D)`` for a stock
    architecture; other stems, widths and channel counts rebuilt as the metadata says)."""
    spec = meta.get("torchvision")
    if spec is None:
        raise ValueError("this export holds no torchvision model (its backbone is a timm model: see meta['timm'])")
    if "name" in spec:                                  # torchvision:NAME
        kwargs = {"image_size": spec["image_size"]} if spec["name"].startswith("vit_") else {}
        net = torchvision.models.get_model(spec["name"], weights=None, num_classes=spec["num_classes"], **kwargs)
        if spec["in_chans"] != 3:
            adapt_first_conv(net, spec["in_chans"])
        return net
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
        raise ValueError("this export holds no timm model (a torchvision one: see meta['torchvision'], or a ViT "
                         "with a relative position bias: load it with selfsight.load_backbone)")
    return timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
