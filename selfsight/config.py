"""Typed run configuration, the schema and its parsing: dataclasses are the schema and the
defaults, and each field declares its rule (``setting``: choices, bounds), which ``check_fields``
applies generically.

A run is described by a YAML recipe plus ``key=value`` overrides (dotted keys, YAML
values). Unknown keys are errors naming the key and the closest valid one. The method
section's schema is the method's own dataclass; ``resolve.build_config`` picks it by
``method.name``, merges the method's recipe defaults and runs the checks. The resolved config is
saved in the run folder as ``config.yaml``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names it."""


def setting(default: Any = dataclasses.MISSING, *, factory: Any = None, choices: tuple = (), at_least: float | None = None,
            above: float | None = None, unit: bool = False, off: float | None = None, unit_items: bool = False,
            scale: bool = False, check: Any = None, unbounded: bool = False):
    """A config field with its rule, declared where the field is (``check_fields`` applies it):
    ``choices``; ``at_least`` (>=) or ``above`` (>) a number; ``unit`` (in [0, 1]); ``off``: one more
    value meaning "off" or "auto" (e.g. -1); ``unit_items``: a list of numbers in [0, 1]; ``scale``:
    ``[min, max]`` with 0 < min <= max <= 1; ``check``: ``value -> error text or None``;
    ``unbounded``: any number (seeds). Every float must be finite."""
    rule = {"choices": tuple(choices), "at_least": at_least, "above": above, "unit": unit, "off": off,
            "unit_items": unit_items, "scale": scale, "check": check, "unbounded": unbounded}
    meta = {"rule": {k: v for k, v in rule.items() if v is not None and v is not False and v != ()}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def unit_range(value: tuple) -> str | None:
    """A ``check`` for ``[]`` or ``[lo, hi]`` with 0 <= lo <= hi <= 1 (a per-image ratio range)."""
    if not value or (len(value) == 2 and all(_number(v) for v in value) and 0 <= value[0] <= value[1] <= 1):
        return None
    return "must be [] or [min, max] with 0 <= min <= max <= 1"


def _nonblank(value: str) -> str | None:
    return None if value.strip() else "must name a built-in set or a folder"


def _cache_choice(value: Any) -> str | None:
    return None if isinstance(value, bool) or value == "auto" else "must be true, false or auto"


def _jitter_values(value: tuple) -> str | None:
    ok = len(value) in (0, 4) and all(_number(v) and v >= 0 for v in value)
    return None if ok else "must be [] or [brightness, contrast, saturation, hue] (numbers >= 0)"


# ---- the --features choice of the evaluations (eval.online_probe_features too) --------------------
FEATURES = ("cls", "mean", "cls+mean")
_LAST = re.compile(r"last(\d+)(\+mean)?")
FEATURES_HELP = ("cls (a ViT's class token, a ConvNet's pooled map), mean (mean of the patch tokens), cls+mean, "
                 "lastN (ViTs: class tokens of the last N blocks, e.g. last4, as DINO's linear probe) or "
                 "lastN+mean (plus the mean patch token of the last block)")


def parse_features(features: str) -> tuple[str, int, bool]:
    """``cls`` | ``mean`` | ``cls+mean`` | ``lastN`` | ``lastN+mean`` -> (kind, n, with_mean);
    kind is the name itself, or ``last`` for the last-N-blocks choices."""
    if features in FEATURES:
        return features, 1, False
    m = _LAST.fullmatch(features)
    if m and int(m.group(1)) >= 1:
        return "last", int(m.group(1)), m.group(2) is not None
    raise ValueError(f"features must be one of {', '.join(FEATURES)}, lastN or lastN+mean (N >= 1, e.g. last4), "
                     f"got {features!r}")


def _features_choice(value: str) -> str | None:
    try:
        parse_features(value)
    except ValueError as e:
        return str(e).split(', got')[0].replace('features must', 'must')
    return None


@dataclass
class DataConfig:
    train: str = setting("fashion-mnist", check=_nonblank)   # built-in name ("fashion-mnist", "cifar10", ...), a folder or tar shards
    root: str = ""                     # where built-in sets live/download; "" = $SELFSIGHT_DATA or ~/.cache/selfsight/data
    batch_size: int = setting(256, at_least=1)      # GLOBAL batch (all processes together)
    workers: int = setting(-1, at_least=-1)         # DataLoader workers per process; -1 = auto
    device_augment: str = setting("auto", choices=("auto", "on", "off"))  # auto|on: arrays batched on the device, folders/shards hybrid; off: per sample
    decode: str = setting("workers", choices=("workers", "device"))      # workers: JPEGs decoded by DataLoader workers; device: by the GPU (nvJPEG), folders
    prefetch: int = setting(2, at_least=0)          # arrays (built-in sets, data.cache) on a GPU: batches gathered ahead in a thread; 0 = off
    download: bool = True              # built-in sets missing locally are downloaded by torchvision
    cache: Any = setting(False, check=_cache_choice)   # folders: pre-decoded uint8 memmap cache: false | true | auto (docs/data.md)
    cache_size: int = setting(0, at_least=0)        # px of the cached squares; 0 = the view size (smaller images: their own)
    shuffle_buffer: int = setting(1000, at_least=0)  # tar shards: samples held per stream to shuffle within shards; 0 = shard order
    image_column: str = ""             # hf: image column ("" = first Image feature); lists with a header: path column
    label_column: str = ""             # hf: datasets, CSV lists: the label column ("" = "label" where there is one)


@dataclass
class ViewsConfig:
    """SimCLR-style view recipe (Chen et al. 2020a, Appendix A); see augment/views.py."""
    preset: str = setting("auto", choices=("auto", "small", "imagenet"))   # auto (from the images' size) | small (28-32 px, no blur) | imagenet (224 px)
    size: int = setting(0, at_least=0)              # 0 = the preset's size
    n_views: int = setting(2, at_least=1)
    crop_scale: tuple = setting((0.08, 1.0), scale=True)
    flip_p: float = setting(0.5, unit=True)
    jitter_strength: float = setting(1.0, at_least=0)   # s in (0.8s, 0.8s, 0.8s, 0.2s)
    jitter: tuple = setting((), check=_jitter_values)   # explicit [brightness, contrast, saturation, hue]; [] = the strength rule
    jitter_p: float = setting(0.8, unit=True)
    gray_p: float = setting(0.2, unit=True)
    blur_p: float = setting(-1.0, unit=True, off=-1)    # -1 = the preset's value
    solarize_p: float = setting(0.0, unit=True)
    view_blur_p: tuple = setting((), unit_items=True)       # per-view blur p, e.g. [1.0, 0.1] (BYOL, MoCo v3); [] = blur_p for all
    view_solarize_p: tuple = setting((), unit_items=True)   # per-view solarize p, e.g. [0.0, 0.2]; [] = solarize_p for all
    local_crops: int = setting(0, at_least=0)       # multi-crop: small views after the n_views (DINO: 8-10)
    local_size: int = setting(0, at_least=0)        # 0 = 96/224 of the view size (96 px beside 224)
    local_crop_scale: tuple = setting((0.05, 0.4), scale=True)
    local_blur_p: float = setting(-1.0, unit=True, off=-1)  # -1 = 0.5 where the preset blurs, else 0


def _freeze_choice(value: str) -> str | None:
    ok = value in ("none", "stem") or (value.isdigit() and int(value) >= 1)
    return None if ok else "must be none, stem, or N >= 1 (the stem and the first N stages)"


@dataclass
class BackboneConfig:
    name: str = "resnet18"             # a short name, timm:NAME, torchvision:NAME or python:module:factory
    small_stem: str = setting("auto", choices=("auto", "none", "cifar", "s2"))  # ResNets: auto (cifar for views <= 64 px, else none) | none | cifar (3x3 s1, no max-pool) | s2 (3x3 s2, no max-pool)
    width: int = setting(64, at_least=1)            # ResNets: channels of the first stage (64 = torchvision)
    zero_init_residual: bool = False   # ResNets: last BN of each residual block starts at 0 (SimSiam)
    in_chans: int = setting(0, at_least=0)          # 0 = from the data (1 for gray, 3 for RGB)
    patch_size: int = setting(16, at_least=1)       # ViTs
    img_size: int = setting(0, at_least=0)          # ViTs; 0 = the view size
    drop_path: float = setting(0.0, unit=True)      # ViTs
    pos_embed: str = setting("learned", choices=("learned", "sincos", "none"))  # ViTs: learned | sincos (fixed 2-D sine-cosine, MAE / MoCo v3) | none (BEiT)
    depth: int = setting(0, at_least=0)             # ViTs: number of blocks; 0 = the size's own (12)
    layer_scale: float = setting(0.0, at_least=0)   # ViTs: LayerScale init value (CaiT; BEiT 0.1); 0 = off
    rel_pos_bias: bool = False         # ViTs: BEiT's shared relative position bias (dense input at the build size)
    class_token: bool = True                       # ViTs: false = no class token; the image feature is the mean of the
                                                   # final-normed patch tokens (I-JEPA's encoders, MAE's global pool)
    registers: int = setting(0, at_least=0)        # ViTs: register tokens (Darcet et al. 2024; DINOv2 reg4: 4); 0 = none
    sync_bn: bool = True               # SyncBatchNorm under DDP (SimCLR's global BN)
    channels_last: bool = True         # ConvNets
    grad_checkpointing: bool = False   # recompute activations in backward (timm ViT blocks, ResNet stages)
    pretrained: bool = False           # timm:/torchvision: start from the library's pretrained weights
    pretrained_file: str = ""          # timm: a local file of timm's own weights (pretrained_cfg_overlay)
    weights: str = ""                  # starting weights: a .safetensors/.pth state dict, a selfsight export or run
    weights_strict: bool = True        # a mismatch beyond the classifier stops the run (false: load what fits)
    freeze: str = setting("none", check=_freeze_choice)   # none | stem | N: stem + first N stages get no gradient
    lr_scale: float = setting(1.0, above=0)             # the backbone's learning rate x this (continued pretraining)


@dataclass
class OptimConfig:
    name: str = setting("lars", choices=("sgd", "adamw", "lars"))
    lr: float = setting(0.3, at_least=0)            # base lr at base_batch; effective lr follows lr_scaling
    lr_scaling: str = setting("linear", choices=("linear", "sqrt", "none"))  # linear (lr*B/base_batch) | sqrt (lr*sqrt(B/base_batch)) | none
    base_batch: int = setting(256, at_least=1)
    min_lr: float = setting(0.0, at_least=0)        # cosine floor (absolute)
    warmup_epochs: float = setting(0.0, at_least=0)
    warmup_fraction: float = setting(0.0, unit=True)    # alternative to warmup_epochs: share of the total steps
    weight_decay: float = setting(1e-6, at_least=0)
    weight_decay_end: float = setting(-1.0, at_least=0, off=-1)  # -1 = constant weight decay
    momentum: float = setting(0.9, unit=True)
    betas: tuple = setting((0.9, 0.999), unit_items=True)
    decay_all: bool = False            # weight decay on biases and norm parameters too (MoCo v3's AdamW)
    clip_grad: float = setting(0.0, at_least=0)     # max grad norm; 0 = off
    clip_mode: str = setting("global", choices=("global", "per_param"))  # global (one norm over all parameters) | per_param (DINO: each tensor)
    trust_coefficient: float = setting(1e-3, at_least=0)   # LARS eta
    layer_decay: float = setting(1.0, above=0)     # ViTs: the backbone's block b learns at lr x this^(depth - b) (DINOv2 0.9); 1 = off
    patch_embed_lr_scale: float = setting(1.0, above=0)   # ViTs: the patch embedding's lr x this (DINOv2 0.2)


LOGGERS = ("tensorboard", "wandb", "mlflow", "csv")


def _loggers_choice(value) -> str | None:
    bad = [v for v in value if v not in LOGGERS]
    if not bad:
        return None
    near = difflib.get_close_matches(str(bad[0]), LOGGERS, n=1)
    return f"names {bad[0]!r}: each must be one of {', '.join(LOGGERS)}" + (f" (did you mean {near[0]}?)" if near else "")


@dataclass
class TrainConfig:
    epochs: float = setting(0.0, at_least=0)        # stop after this many epochs (0 = no limit)
    steps: int = setting(0, at_least=0)             # stop after this many steps (0 = no limit)
    minutes: float = setting(0.0, at_least=0)       # wall-clock budget (0 = no limit)
    schedule_epochs: float = setting(0.0, at_least=0)   # length of the schedules when only --minutes is given (0 = estimate)
    # auto: bf16 where native, else fp16 with a gradient scaler (GPU) or fp32 (CPU)
    precision: str = setting("auto", choices=("auto", "bf16", "fp16", "fp32"))
    seed: int = setting(0, unbounded=True)
    deterministic: bool = False
    checkpoint_every: int = setting(500, at_least=0)    # steps; 0 = only at the end
    log_every: int = setting(20, at_least=1)        # steps between metric logs
    nonfinite_limit: int = setting(10, at_least=1)  # non-finite loss/grad steps: skipped and counted; stop at this many in a row
    threads: int = setting(0, at_least=0)           # torch CPU threads per process; 0 = torch default
    compile: bool = False              # torch.compile the backbones (falls back to eager with a warning)
    fsdp: bool = False                 # shard parameters, gradients and optimizer state over the processes (FSDP2)
    progress: bool = True              # a bar on a terminal; elsewhere a line every 30 s (rate, time left)
    tensorboard: bool = True           # false: leave tensorboard out of train.loggers (older recipes)
    loggers: tuple = setting(("tensorboard",), check=_loggers_choice)   # tensorboard | wandb | mlflow | csv
    project: str = "selfsight"         # the W&B project and MLflow experiment of the run


@dataclass
class EvalConfig:
    knn_k: int = setting(20, at_least=1)
    knn_temperature: float = setting(0.07, above=0)
    test: str = ""                     # test split used by `selfsight demo`; "" = the train set's test split
    online_probe: bool = False         # train a linear probe on detached features during pretraining (needs labels)
    online_probe_lr: float = setting(1e-3, above=0)     # its own Adam learning rate
    online_probe_features: str = setting("cls", check=_features_choice)  # cls | mean | cls+mean | lastN[+mean] (as eval --features)


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


# ---- the generic check of the rules declared on the fields ---------------------------------------
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fail(key: str, what: str, value: Any) -> None:
    raise ConfigError(f"config key {key!r} {what}, got {list(value) if isinstance(value, tuple) else value!r}")


def _check_rule(key: str, value: Any, rule: dict) -> None:
    off = rule.get("off")
    if off is not None and value == off:
        return
    alt = f" or {off:g}" if off is not None else ""
    if rule.get("choices") and value not in rule["choices"]:
        _fail(key, f"must be one of {', '.join(map(str, rule['choices']))}", value)
    if rule.get("at_least") is not None and value < rule["at_least"]:
        _fail(key, f"must be >= {rule['at_least']:g}{alt}", value)
    if rule.get("above") is not None and not value > rule["above"]:
        _fail(key, f"must be > {rule['above']:g}{alt}", value)
    if rule.get("unit") and not 0 <= value <= 1:
        _fail(key, f"must be in [0, 1]{alt}", value)
    if rule.get("unit_items") and not all(_number(v) and 0 <= v <= 1 for v in value):
        _fail(key, "must hold numbers in [0, 1]", value)
    if rule.get("scale") and (len(value) != 2 or not all(_number(v) for v in value)
                              or not 0 < value[0] <= value[1] <= 1):
        _fail(key, "must be [min, max] with 0 < min <= max <= 1", value)
    if rule.get("check") is not None:
        error = rule["check"](value)
        if error:
            _fail(key, error, value)


def check_fields(obj: Any, prefix: str = "") -> None:
    """Apply the rule each field of a config dataclass declares (``setting``), in nested sections
    too; every float must be finite. Raises ConfigError (one line naming the key)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            check_fields(value, f"{key}.")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            _fail(key, "must be a finite number", value)
        rule = f.metadata.get("rule")
        if rule:
            _check_rule(key, value, rule)


def ruled_fields(cls: type, prefix: str = ""):
    """(key, field) of every field of a config dataclass and its nested sections (for tests)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            yield from ruled_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


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


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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
        set_dotted(tree, key.strip(), value)
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


def read_sources(files: list[str] | None = None, overrides: list[str] | dict | None = None,
                 flags: dict | None = None) -> dict:
    """The raw config tree of a run, merged in order: YAML ``files`` (paths or bundled recipe
    names), ``flags`` (from CLI options), ``key=value`` overrides. A bundled recipe's settings of
    selfsight's own networks (``OWN_NETWORK_KEYS``: its resnet10's stem and width) are left out when
    the run's backbone is a timm, torchvision or python: model, to which they do not apply."""
    trees = [(read_yaml(f), is_bundled(f)) for f in files or []]
    if flags:
        trees.append((flags, False))
    if overrides:
        trees.append((overrides if isinstance(overrides, dict) else parse_overrides(overrides), False))
    name = ""
    for t, _ in trees:
        if isinstance(t.get("backbone"), dict) and "name" in t["backbone"]:
            name = t["backbone"]["name"]
    tree: dict = {}
    for t, bundled in trees:
        if bundled and isinstance(name, str) and ":" in name and isinstance(t.get("backbone"), dict):
            t = {**t, "backbone": {k: v for k, v in t["backbone"].items() if k not in OWN_NETWORK_KEYS}}
        tree = merge(tree, t)
    return tree


def is_bundled(path: str | Path) -> bool:
    """A bundled recipe (a name such as ``simclr_fashion_mnist``, or a file of ``recipes_dir()``)."""
    p = Path(path)
    if not p.exists() and not p.suffix:
        return (recipes_dir() / f"{p}.yaml").exists()
    return p.resolve().parent == recipes_dir().resolve()


# backbone keys of selfsight's own networks (resnet*, vit_*): a timm, torchvision or python: model
# keeps its own architecture, so such a key set to another value than its default is an error
OWN_NETWORK_KEYS = ("small_stem", "width", "zero_init_residual", "patch_size", "img_size", "pos_embed", "depth",
                    "layer_scale", "rel_pos_bias", "class_token")


def check_backbone_keys(tree: dict, method_defaults: dict | None = None) -> None:
    """The backbone keys of a raw config tree must apply to the backbone it names: one
    ``ConfigError`` line otherwise. A key at its default, or at the method's recipe default
    (``method_defaults``: MAE's sin-cos table, which a saved run config holds), is not the user's."""
    b = tree.get("backbone") or {}
    if not isinstance(b, dict) or not isinstance(b.get("name", ""), str):
        return
    name = b.get("name", BackboneConfig.name)
    hub = name.partition(":")[0] if ":" in name else None
    defaults, recipe = BackboneConfig(), (method_defaults or {}).get("backbone") or {}
    if hub is not None:
        for key in OWN_NETWORK_KEYS + (("drop_path", "grad_checkpointing") if hub != "timm" else ()):
            if key in b and b[key] != getattr(defaults, key) and b[key] != recipe.get(key, getattr(defaults, key)):
                timm_too = key in ("drop_path", "grad_checkpointing")
                raise ConfigError(f"config key 'backbone.{key}' applies to selfsight's own resnet*/vit_* backbones"
                                  + (" and timm models" if timm_too else "") + f"; {name} keeps its own architecture"
                                  + ("" if timm_too else f" (pick a model name with the {key} you want)"))
    if b.get("pretrained_file") and hub != "timm":
        raise ConfigError("config key 'backbone.pretrained_file' is timm's local-file route for a timm:NAME backbone; "
                          f"for {name} pass the file as backbone.weights=FILE")
    if b.get("pretrained") is True and hub not in ("timm", "torchvision"):
        raise ConfigError(f"config key 'backbone.pretrained': {name} has no library weights (only timm:NAME and "
                          "torchvision:NAME do); start from a file with backbone.weights=FILE")


def check_sections(tree: dict) -> None:
    """Every section but ``method`` checked against the schema (unknown keys, types, rules), without
    the method registry and so without torch: a typo in a data, views, backbone, optim, train or eval
    key fails at once (``resolve.build_config`` then checks everything, the method included)."""
    cfg = from_dict(RunConfig, {k: v for k, v in tree.items() if k != "method"})
    check_fields(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)
