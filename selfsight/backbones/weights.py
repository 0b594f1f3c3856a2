"""Starting weights for a backbone (``backbone.weights``): a state dict from any source, its keys
matched to the backbone's, and the parts of continued pretraining (frozen stages).

Keys are matched whatever the file's wrapping: a leading ``module.`` (DDP), ``backbone.``,
``model.``, ``encoder.``, ``student.``, ``teacher.``, ``net.`` or ``_orig_mod.`` (compile) is taken
off, and ``net.`` (selfsight's wrappers) put on, in whichever combination matches the most keys. A
first convolution of another channel count is adapted as timm adapts a stem (a 3-channel file
for gray input: the weights summed over RGB), a ViT's position table resampled to the grid. Keys of
a classification head (``fc``, ``head``, ``heads``, ``classifier``) are left out. Anything else
that does not fit (a missing or unexpected key, another shape) is an error naming the first such
key, unless ``strict=False``: then it is left at its initialisation and listed in the report.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv, group_parameters

from selfsight.files import load_plain
from selfsight.nn.sync_bn import keep_running_stats

log = logging.getLogger("selfsight")
WRAPPERS = ("module", "backbone", "model", "encoder", "student", "teacher", "net", "_orig_mod")
HEADS = ("fc", "head", "heads", "classifier", "last_linear", "head_dist", "head_drop")
NEVER_IN_A_FILE = ("mask_token", "rel_pos_bias.")          # selfsight's own: trained by the methods that use them


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only``), unwrapped from
    the usual containers (``{"state_dict": ...}``, ``{"model": ...}``)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"backbone.weights: {p} does not exist")
    state = load_file(str(p)) if p.suffix == ".safetensors" else load_plain(p)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"backbone.weights: {p} holds no state dict of tensors")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(state: dict) -> str:
    """A sha256 of a state dict's names, dtypes, shapes and bytes (the same weights, the same hash)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _prefixes(keys, words) -> set[str]:
    """The leading runs of wrapper words of some keys: ``module.backbone.`` -> '', 'module.', 'module.backbone.'."""
    out = {""}
    for k in keys:
        parts, prefix = k.split("."), ""
        for part in parts[:-1]:
            if part not in words:
                break
            prefix += part + "."
            out.add(prefix)
    return out


def match_keys(source: dict, target_keys: set[str]) -> dict:
    """``source`` with its keys renamed to the target's where a prefix was taken off or put on (the
    combination that matches the most keys)."""
    best, best_n = source, -1
    for strip in sorted(_prefixes(source, WRAPPERS), key=len):
        for add in sorted(_prefixes(target_keys, WRAPPERS), key=len):
            mapped = {add + k[len(strip):]: v for k, v in source.items() if k.startswith(strip)}
            n = len(mapped.keys() & target_keys)
            if n > best_n:
                best, best_n = mapped, n
    return best


def _is_head(key: str) -> bool:
    parts = key.split(".")
    while parts and parts[0] in WRAPPERS:
        parts = parts[1:]
    return bool(parts) and parts[0] in HEADS


def _fit(key: str, value: torch.Tensor, own: torch.Tensor, module: nn.Module) -> torch.Tensor | None:
    """``value`` made to fit ``own``'s shape where a known adaptation exists (None where none does)."""
    if value.shape == own.shape:
        return value
    if value.ndim == 4 and own.ndim == 4 and value.shape[0] == own.shape[0] and value.shape[2:] == own.shape[2:]:
        return adapt_input_conv(own.shape[1], value, base_chans=value.shape[1]).to(own.dtype)   # a stem's channels
    if key.endswith("pos_embed") and value.ndim == 3 and own.ndim == 3 and value.shape[2] == own.shape[2]:
        net = next((m for m in module.modules() if isinstance(m, timm.models.VisionTransformer)), None)
        if net is not None:
            prefix = 0 if getattr(net, "no_embed_class", False) else net.num_prefix_tokens
            grid = tuple(net.patch_embed.grid_size)
            return resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=prefix)
    return None


def load_starting_weights(module: nn.Module, source: dict, strict: bool = True, what: str = "backbone.weights") -> dict:
    """Load ``source`` into ``module`` (module docstring); returns the report: loaded, adapted,
    missing, unexpected and mismatched keys."""
    own = module.state_dict()
    mapped = match_keys(source, set(own))
    loaded, adapted, mismatched = {}, [], []
    for key, value in mapped.items():
        if key not in own:
            continue
        fitted = _fit(key, value, own[key], module)
        if fitted is None:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
            continue
        if fitted is not value:
            adapted.append(key)
        loaded[key] = fitted
    unexpected = sorted(k for k in mapped if k not in own and not _is_head(k))
    missing = sorted(k for k in own if k not in mapped and not any(w in k for w in NEVER_IN_A_FILE))
    report = {"loaded": len(loaded), "of": len(own), "adapted": adapted, "missing": missing,
              "unexpected": unexpected, "mismatched": mismatched}
    problems = [f"{len(mismatched)} of other shapes (first: {mismatched[0]})"] if mismatched else []
    problems += [f"{len(missing)} missing (first: {missing[0]})"] if missing else []
    problems += [f"{len(unexpected)} unexpected (first: {unexpected[0]})"] if unexpected else []
    if not loaded:
        raise ValueError(f"{what}: no key of the file fits this backbone ({', '.join(problems) or 'an empty file'})")
    if problems and strict:
        raise ValueError(f"{what}: the file does not fit this backbone: {'; '.join(problems)}; set "
                         "backbone.weights_strict=false to load the keys that fit")
    module.load_state_dict({**own, **loaded})
    if problems:
        log.warning("%s: loaded %d of %d tensors; %s (left at their initialisation)", what, len(loaded), len(own),
                    "; ".join(problems))
    return report


# ---- frozen stages (continued pretraining) -------------------------------------------------------
def stages(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in stages, input first: the stem, then each stage (a ResNet's
    layers, a ViT's blocks, a timm model's coarse groups, a torchvision model's feature blocks)."""
    net = getattr(backbone, "net", None)
    if net is None:
        raise ValueError(f"backbone.freeze needs a known architecture; {type(backbone).__name__} has no stages")
    if isinstance(net, timm.models.VisionTransformer):
        stem = [p for n, p in net.named_parameters() if not n.startswith(("blocks.", "norm.", "fc_norm.", "head"))]
        return [stem] + [list(b.parameters()) for b in net.blocks]
    if hasattr(net, "group_matcher"):                  # timm: its own coarse grouping (stem, stages, head)
        groups = group_parameters(net, net.group_matcher(coarse=True))
        named = dict(net.named_parameters())
        return [[named[n] for n in names] for _, names in sorted(groups.items())]
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):        # torchvision ResNets (and ours)
        stem = [p for n, p in net.named_parameters() if n.startswith(("conv1.", "bn1."))]
        return [stem] + [list(getattr(net, f"layer{i}").parameters()) for i in range(1, 5)]
    if isinstance(getattr(net, "features", None), nn.Sequential):  # torchvision EfficientNet, MobileNet, ConvNeXt
        return [list(m.parameters()) for m in net.features]
    raise ValueError(f"backbone.freeze: the stages of {getattr(backbone, 'name', type(net).__name__)} are not known")


def freeze(backbone: nn.Module, spec: str) -> int:
    """``none`` | ``stem`` | ``N`` (the stem and the first N stages): those parameters get no
    gradient (and no optimizer state), their BatchNorm layers use and keep their running
    statistics. Returns how many tensors were frozen."""
    if spec == "none":
        return 0
    groups = stages(backbone)
    n = 1 if spec == "stem" else 1 + int(spec)
    if n > len(groups):
        raise ValueError(f"backbone.freeze={spec}: the backbone has a stem and {len(groups) - 1} stages")
    frozen = [p for g in groups[:n] for p in g]
    for p in frozen:
        p.requires_grad_(False)
    ids = {id(p) for p in frozen}
    for m in backbone.modules():               # their BatchNorm statistics stay as they were too
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and id(m.weight) in ids:
            keep_running_stats(m)
    return len(frozen)
