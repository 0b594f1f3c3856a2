"""Any timm or torchvision classification model behind the backbone contract (``timm:NAME``,
``torchvision:NAME``).

* timm ``VisionTransformer`` models (ViT, DeiT, register tokens, average or attention pooling)
  become a ``ViTBackbone`` around the timm network: masking (MAE, BEiT, iBOT), the last-n-blocks
  features, layer-wise learning-rate decay and attention pictures work on them as on the built-in
  ViTs. They are built with ``dynamic_img_size`` (and ``dynamic_img_pad``, so any view size fits a
  patch grid) at the view size.
* Every other timm model is a ``TimmBackbone``: ``cls`` is the model's own pooled pre-logits
  feature (``forward_head(pre_logits=True)``: global pooling, a head's hidden layer where it has
  one), ``patch`` the tokens of its last stage (a ConvNet's or Swin's last map, a token model's
  tokens without its prefix tokens).
* torchvision models are a ``TorchvisionBackbone``: the classifier's last ``Linear`` removed (its
  dropout too), ``cls`` what the model then returns, ``patch`` the map entering its global pooling
  (a ViT's encoder tokens without the class token).

Input channels other than 3 are adapted as timm adapts a stem: timm models build with ``in_chans``
(pretrained weights folded by timm); torchvision models get their first convolution rebuilt, its
weights summed over the RGB channels for gray input or repeated and rescaled for more channels
(``adapt_first_conv``).
"""
from __future__ import annotations

import difflib
import logging
from contextlib import contextmanager

import timm
import torch
import torch.nn as nn
import torchvision
from timm.models import adapt_input_conv

from selfsight.backbones.base import Features
from selfsight.backbones.vit import ViTBackbone
from selfsight.nn.attention import use_sdpa

log = logging.getLogger("selfsight")


def _check_name(name: str, kind: str, names) -> None:
    if name not in names:
        close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(f'{kind}:{c}' for c in close)}?" if close else ""
        raise ValueError(f"{kind} has no model {name!r}{hint}")


def timm_names() -> list[str]:
    return timm.list_models()


def torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_hub_name(name: str) -> None:
    """A ``timm:``/``torchvision:`` backbone name that exists (one line with suggestions if not)."""
    kind, _, model = name.partition(":")
    if kind == "timm":
        _check_name(model, "timm", timm_names())
    elif kind == "torchvision":
        _check_name(model, "torchvision", torchvision_names())


def is_vit(name: str) -> bool:
    """Whether a backbone name gives a ViT with patch tokens and masking (``ViTBackbone``); a
    ``timm:`` model is built on the meta device to see its class (no memory, no download)."""
    if not name.startswith("timm:"):
        return False
    with torch.device("meta"):
        net = timm.create_model(name[5:], pretrained=False, num_classes=0)
    return isinstance(net, timm.models.VisionTransformer)


def _create_timm(model: str, in_chans: int, image_size: int, pretrained: bool, pretrained_file: str,
                 drop_path: float) -> nn.Module:
    """timm's model at the view size: ViTs with dynamic size and padding, others with ``img_size``
    where they take it; timm's pretrained weights (or its local-file route) on request."""
    kwargs = {"pretrained": pretrained or bool(pretrained_file), "num_classes": 0, "in_chans": in_chans}
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained_file}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    tries = ({"img_size": image_size, "dynamic_img_size": True, "dynamic_img_pad": True},
             {"img_size": image_size, "dynamic_img_size": True}, {"img_size": image_size}, {})
    error = None
    for extra in tries:
        try:
            with _quiet_hub():
                return timm.create_model(model, **kwargs, **extra)
        except TypeError as e:          # this model does not take these arguments: the next, simpler try
            error = e
        except (OSError, RuntimeError, ValueError) as e:
            if kwargs["pretrained"] and not pretrained_file and _looks_offline(e):
                raise ValueError(f"backbone.pretrained: timm could not download the weights of {model} (no network?): "
                                 f"download {_timm_source(model)} where there is a network and pass the file as "
                                 "backbone.pretrained_file=FILE (timm adapts it as it adapts a download) or "
                                 "backbone.weights=FILE") from None
            raise
    raise ValueError(f"timm:{model} could not be built for {image_size} px views ({first_line(error)})")


@contextmanager
def _quiet_hub():
    """huggingface_hub logs each failed request itself; the one line that matters is selfsight's."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def _timm_source(model: str) -> str:
    """Where timm downloads a model's default weights from (for the offline message)."""
    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except Exception:                      # noqa: BLE001  (only the wording of a message depends on it)
        cfg = None
    if cfg is not None and cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id} (its model.safetensors)"
    if cfg is not None and cfg.url:
        return cfg.url
    return "its weights"


def _looks_offline(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("connect", "resolve", "network", "offline", "http", "hub", "timed out",
                                   "name or service", "temporary failure", "urlopen", "localentrynotfound"))


def first_line(e: Exception | None) -> str:
    """An error's first line (200 characters at most), for one-line messages."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200] if e is not None else ""


class TimmBackbone(nn.Module):
    """A timm model that is not a ``VisionTransformer`` (module docstring)."""

    def __init__(self, name: str, net: nn.Module):
        super().__init__()
        self.name, self.net = name, net
        self.output_fmt = getattr(net, "output_fmt", "NCHW")
        self.prefix = getattr(net, "num_prefix_tokens", 0) or 0
        self.embed_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
        info = getattr(net, "feature_info", None)
        self.reduction = int(info[-1]["reduction"]) if info else None
        use_sdpa(net)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Features:
        if mask is not None:
            raise ValueError(f"timm:{self.name} does not take a patch mask (masked image modeling needs a timm "
                             "VisionTransformer)")
        f = self.net.forward_features(x)
        cls = self.net.forward_head(f, pre_logits=True)
        if f.ndim == 4:                             # a map: B×C×h×w, or B×h×w×C (Swin)
            patch = f.flatten(1, 2) if self.output_fmt == "NHWC" else f.flatten(2).transpose(1, 2)
        elif f.ndim == 3:                           # tokens B×T×C
            patch = f[:, self.prefix:]
        else:
            patch = None
        return Features(cls, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).cls


def build_timm(model: str, in_chans: int, image_size: int, pretrained: bool = False, pretrained_file: str = "",
               drop_path: float = 0.0, grad_checkpointing: bool = False) -> nn.Module:
    """``timm:MODEL``: a ``ViTBackbone`` around a timm VisionTransformer, else a ``TimmBackbone``."""
    _check_name(model, "timm", timm_names())
    net = _create_timm(model, in_chans, image_size, pretrained, pretrained_file, drop_path)
    if isinstance(net, timm.models.VisionTransformer):
        return ViTBackbone(f"timm:{model}", net=net, grad_checkpointing=grad_checkpointing)
    if grad_checkpointing:
        try:
            net.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError):
            log.warning("backbone.grad_checkpointing: timm:%s does not support it; training without", model)
    return TimmBackbone(model, net)


# ---- torchvision -----------------------------------------------------------------------------
# the module whose output is the last map (or tokens) where a model pools without an avgpool module
MAP_MODULE = {"densenet": "features", "shufflenet": "conv5", "mnasnet": "layers", "vit": "encoder",
              "maxvit": "blocks"}


def adapt_first_conv(module: nn.Module, in_chans: int) -> None:
    """Rebuild the first 3-channel convolution of ``module`` for ``in_chans`` input channels, its
    weights adapted as timm adapts a pretrained stem (``adapt_input_conv``: summed for gray input,
    repeated and rescaled for more channels)."""
    for name, conv in module.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
            with torch.no_grad():
                new.weight.copy_(adapt_input_conv(in_chans, conv.weight))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], new)
            return
    raise ValueError(f"{type(module).__name__} has no 3-channel convolution to adapt to {in_chans} channels")


def remove_classifier(model: nn.Module) -> tuple[str, int]:
    """Replace the model's last ``Linear`` (its classifier) and any dropout beside it by identities;
    returns the classifier's name and its input width (the feature width)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision's {type(model).__name__} has no linear classifier to remove")
    name, linear = linears[-1]
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    if parent is not model:
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(parent, child_name, nn.Identity())
    return name, linear.in_features


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model without its classifier (module docstring)."""

    def __init__(self, name: str, in_chans: int = 3, image_size: int = 224, pretrained: bool = False):
        super().__init__()
        _check_name(name, "torchvision", torchvision_names())
        kwargs = {"weights": "DEFAULT" if pretrained else None}
        if name.startswith("vit_"):                         # torchvision's ViTs have a fixed input size
            kwargs["image_size"] = image_size
        try:
            net = torchvision.models.get_model(name, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            if pretrained and _looks_offline(e):
                url = torchvision.models.get_model_weights(name).DEFAULT.url
                raise ValueError(f"backbone.pretrained: torchvision could not download the weights of {name} "
                                 f"({first_line(e)}): download {url} where there is a network and pass the file as "
                                 "backbone.weights=FILE") from None
            raise
        self.head_name, self.embed_dim = remove_classifier(net)
        if in_chans != 3:
            adapt_first_conv(net, in_chans)
        self.name, self.net, self.in_chans, self.image_size = name, net, in_chans, image_size
        self._map = None
        target = "avgpool" if hasattr(net, "avgpool") else MAP_MODULE.get(name.split("_")[0].rstrip("0123456789"))
        self.map_module = target
        if target == "avgpool":
            net.avgpool.register_forward_pre_hook(self._keep_input)
        elif target is not None:
            net.get_submodule(target).register_forward_hook(self._keep_output)

    def _keep_input(self, module, args) -> None:
        self._map = args[0]

    def _keep_output(self, module, args, output) -> None:
        self._map = output

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Features:
        if mask is not None:
            raise ValueError(f"torchvision:{self.name} does not take a patch mask (masked image modeling needs a "
                             "timm VisionTransformer)")
        self._map = None
        cls = self.net(x)
        m, self._map = self._map, None
        if m is None:
            return Features(cls)
        if m.ndim == 4:                                    # B×C×h×w
            return Features(cls, m.flatten(2).transpose(1, 2))
        return Features(cls, m[:, 1:] if self.name.startswith("vit_") else m)   # tokens; a ViT's class token left out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).cls


def total_stride(backbone: nn.Module, image_size: int, in_chans: int) -> int | None:
    """How many input pixels one step of the backbone's last map covers (None: not a map model)."""
    reduction = getattr(backbone, "reduction", None)
    if reduction:
        return reduction
    if isinstance(backbone, TorchvisionBackbone):
        was = backbone.training
        backbone.eval()
        with torch.no_grad():
            f = backbone.forward_features(torch.zeros(1, in_chans, image_size, image_size))
        backbone.train(was)
        if f.patch is not None and f.patch.shape[1] > 0 and not backbone.name.startswith("vit_"):
            side = max(1, round(f.patch.shape[1] ** 0.5))
            return max(1, image_size // side)
    return None


def is_convnet(backbone: nn.Module) -> bool:
    """A backbone of convolutions (channels-last helps it), not a ViT."""
    return not isinstance(backbone, ViTBackbone) and any(isinstance(m, nn.Conv2d) for m in backbone.modules())
