"""Typed run configuration: dataclasses are the schema and the defaults.

A run is described by a YAML recipe plus ``key=value`` overrides (dotted keys, YAML
values). Unknown keys are errors naming the key and the closest valid one. The method
section's schema depends on ``method.name`` (each method registers its own dataclass).
The resolved config is saved in the run folder as ``config.yaml``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names it."""


@dataclass
class DataConfig:
    train: str = "fashion-mnist"       # built-in name ("fashion-mnist", "cifar10", ...), a folder or tar shards
    root: str = ""                     # where built-in sets live/download; "" = $SELFSIGHT_DATA or ~/.cache/selfsight/data
    batch_size: int = 256              # GLOBAL batch (all processes together)
    workers: int = -1                  # DataLoader workers per process; -1 = auto
    device_augment: str = "auto"       # auto|on: arrays batched on the device, folders/shards hybrid; off: per sample
    decode: str = "workers"            # workers: JPEGs decoded by DataLoader workers; device: by the GPU (nvJPEG), folders
    prefetch: int = 2                  # arrays (built-in sets, data.cache) on a GPU: batches gathered ahead in a thread; 0 = off
    download: bool = True              # built-in sets missing locally are downloaded by torchvision
    cache: Any = False                 # folders: pre-decoded uint8 memmap cache: false | true | auto (docs/data.md)
    cache_size: int = 0                # px of the cached squares; 0 = the view size (smaller images: their own)
    shuffle_buffer: int = 1000         # tar shards: samples held per stream to shuffle within shards; 0 = shard order


@dataclass
class ViewsConfig:
    """SimCLR-style view recipe (Chen et al. 2020a, Appendix A); see augment/views.py."""
    preset: str = "auto"               # auto | small (28-32 px, no blur) | imagenet (224 px)
    size: int = 0                      # 0 = the preset's size
    n_views: int = 2
    crop_scale: tuple = (0.08, 1.0)
    flip_p: float = 0.5
    jitter_strength: float = 1.0       # s in (0.8s, 0.8s, 0.8s, 0.2s)
    jitter: tuple = ()                 # explicit [brightness, contrast, saturation, hue]; [] = the strength rule
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = -1.0               # -1 = the preset's value
    solarize_p: float = 0.0
    view_blur_p: tuple = ()            # per-view blur p, e.g. [1.0, 0.1] (BYOL, MoCo v3); [] = blur_p for all
    view_solarize_p: tuple = ()        # per-view solarize p, e.g. [0.0, 0.2]; [] = solarize_p for all
    local_crops: int = 0               # multi-crop: small views after the n_views (DINO: 8-10)
    local_size: int = 0                # 0 = 96/224 of the view size (96 px beside 224)
    local_crop_scale: tuple = (0.05, 0.4)
    local_blur_p: float = -1.0         # -1 = 0.5 where the preset blurs, else 0


@dataclass
class BackboneConfig:
    name: str = "resnet18"
    small_stem: str = "auto"           # ResNets: auto (cifar for views <= 64 px, else none) | none | cifar (3x3 s1, no max-pool) | s2 (3x3 s2, no max-pool)
    width: int = 64                    # ResNets: channels of the first stage (64 = torchvision)
    zero_init_residual: bool = False   # ResNets: last BN of each residual block starts at 0 (SimSiam)
    in_chans: int = 0                  # 0 = from the data (1 for gray, 3 for RGB)
    patch_size: int = 16               # ViTs
    img_size: int = 0                  # ViTs; 0 = the view size
    drop_path: float = 0.0             # ViTs
    pos_embed: str = "learned"         # ViTs: learned | sincos (fixed 2-D sine-cosine, MAE / MoCo v3) | none (BEiT)
    depth: int = 0                     # ViTs: number of blocks; 0 = the size's own (12)
    layer_scale: float = 0.0           # ViTs: LayerScale init value (CaiT; BEiT 0.1); 0 = off
    rel_pos_bias: bool = False         # ViTs: BEiT's shared relative position bias (dense input at the build size)
    sync_bn: bool = True               # SyncBatchNorm under DDP (SimCLR's global BN)
    channels_last: bool = True         # ConvNets
    grad_checkpointing: bool = False   # recompute activations in backward (timm ViT blocks, ResNet stages)


@dataclass
class OptimConfig:
    name: str = "lars"                 # sgd | adamw | lars
    lr: float = 0.3                    # base lr at base_batch; effective lr follows lr_scaling
    lr_scaling: str = "linear"         # linear (lr*B/base_batch) | sqrt (lr*sqrt(B/base_batch)) | none
    base_batch: int = 256
    min_lr: float = 0.0                # cosine floor (absolute)
    warmup_epochs: float = 0.0
    warmup_fraction: float = 0.0       # alternative to warmup_epochs: share of the total steps
    weight_decay: float = 1e-6
    weight_decay_end: float = -1.0     # -1 = constant weight decay
    momentum: float = 0.9
    betas: tuple = (0.9, 0.999)
    decay_all: bool = False            # weight decay on biases and norm parameters too (MoCo v3's AdamW)
    clip_grad: float = 0.0             # max grad norm; 0 = off
    clip_mode: str = "global"          # global (one norm over all parameters) | per_param (DINO: each tensor)
    trust_coefficient: float = 1e-3    # LARS eta


@dataclass
class TrainConfig:
    epochs: float = 0.0                # stop after this many epochs (0 = no limit)
    steps: int = 0                     # stop after this many steps (0 = no limit)
    minutes: float = 0.0               # wall-clock budget (0 = no limit)
    schedule_epochs: float = 0.0       # length of the schedules when only --minutes is given (0 = estimate)
    precision: str = "auto"            # auto | bf16 | fp32
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int = 500        # steps; 0 = only at the end
    log_every: int = 20                # steps between metric logs
    nonfinite_limit: int = 10          # non-finite loss/grad steps: skipped and counted; stop at this many in a row
    threads: int = 0                   # torch CPU threads per process; 0 = torch default
    compile: bool = False              # torch.compile the backbones (falls back to eager with a warning)
    fsdp: bool = False                 # shard parameters, gradients and optimizer state over the processes (FSDP2)
    progress: bool = True
    tensorboard: bool = True


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    test: str = ""                     # test split used by `selfsight demo`; "" = the train set's test split
    online_probe: bool = False         # train a linear probe on detached features during pretraining (needs labels)
    online_probe_lr: float = 1e-3      # its own Adam learning rate
    online_probe_features: str = "cls" # cls | mean | cls+mean | lastN[+mean] (as eval --features)


@dataclass
class RunConfig:
    method: Any = None                 # the method's own dataclass (chosen by method.name)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = ""


def _suggest(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    hint = f"; did you mean '{where}{close[0]}'?" if close else ""
    return f"unknown config key '{where}{key}'{hint} (valid keys in {where.rstrip('.') or 'the top level'}: {', '.join(valid)})"


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, str):              # YAML 1.1 reads "5e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if isinstance(value, bool):             # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return str(value)
    if typ is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return tuple(value)
    if origin is list or typ is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return list(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} has an invalid key {key!r}")
        if key not in names:
            raise ConfigError(_suggest(key, names, prefix))
        typ = hints[key]
        if is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, prefix + key)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["optim.lr=0.1", "train.minutes=5"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def recipes_dir() -> Path:
    return Path(__file__).parent / "configs"


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists() and not p.suffix and (recipes_dir() / f"{p}.yaml").exists():
        p = recipes_dir() / f"{p}.yaml"      # a recipe name, e.g. "simclr_fashion_mnist"
    if not p.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def build_config(tree: dict, resolved: bool = False) -> RunConfig:
    """Validate a raw nested dict into a RunConfig (method section chosen by its name).

    ``resolved=True``: ``tree`` is a run's saved, fully resolved config (a checkpoint's): the
    method's preset defaults are not merged under it again, so a key added to selfsight after
    the run was written takes its plain default (features are added switched off) instead of a
    preset value the run never had."""
    from selfsight.methods import METHODS  # late import: methods register their schemas

    tree = dict(tree)
    if isinstance(tree.get("method"), str):
        tree["method"] = {"name": tree["method"]}
    if not isinstance(tree.get("method") or {}, dict):
        raise ConfigError(f"config section 'method' must be a mapping or a method name, got {tree['method']!r}")
    name = (tree.get("method") or {}).get("name", "simclr")
    if not isinstance(name, str):
        raise ConfigError(f"config key 'method.name' must be a string, got {name!r}")
    try:
        spec = METHODS.get(name)
    except KeyError as e:
        raise ConfigError(f"config key 'method.name': {e.args[0]}") from None
    if not resolved:
        tree = _merge(spec.defaults, tree)      # the method's own recipe defaults, under the user's
    method_tree = tree.pop("method", None) or {}
    method = from_dict(spec.params, {**method_tree, "name": name}, "method.")
    cfg = from_dict(RunConfig, tree)
    cfg.method = method
    from selfsight.validate import validate_config
    validate_config(cfg)                        # values and combinations, before anything runs
    return cfg


def load_config(files: list[str] | None = None, overrides: list[str] | dict | None = None,
                flags: dict | None = None) -> RunConfig:
    """Merge, in order: YAML ``files``, ``flags`` (from CLI options), ``key=value`` overrides."""
    tree: dict = {}
    for f in files or []:
        tree = _merge(tree, read_yaml(f))
    if flags:
        tree = _merge(tree, flags)
    if overrides:
        tree = _merge(tree, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return build_config(tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)
