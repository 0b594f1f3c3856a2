"""Value and combination checks of a resolved run config, run by ``build_config`` before anything
is built or trained: a bad value stops the run with one ``ConfigError`` line naming the key.

Types and unknown keys are checked by ``config.from_dict``; here: ranges (no negative sizes,
probabilities in [0, 1], finite numbers), choices, and combinations no run can train with
(a MoCo queue that is not a multiple of the keys enqueued per step, a ViT-only method with a
ResNet). Method sections are checked by field name: integer sizes/widths are >= 1 unless their
default is 0 (0 = "auto"), temperatures > 0 (>= 0 where 0 means auto), momentums in [0, 1]
(or -1 where -1 is the default's "off"), ratios in [0, 1]; method-specific checks that need the
built network stay in the methods.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from selfsight.config import ConfigError

CHOICES = {
    "data.device_augment": ("auto", "on", "off"),
    "data.decode": ("workers", "device"),
    "views.preset": ("auto", "small", "imagenet"),
    "backbone.small_stem": ("auto", "none", "cifar", "s2"),
    "backbone.pos_embed": ("learned", "sincos", "none"),
    "optim.name": ("sgd", "adamw", "lars"),
    "optim.lr_scaling": ("linear", "sqrt", "none"),
    "optim.clip_mode": ("global", "per_param"),
    "train.precision": ("auto", "bf16", "fp32"),
}
AT_LEAST = {       # key: smallest valid value
    "data.batch_size": 1, "data.workers": -1, "data.prefetch": 0, "data.cache_size": 0, "data.shuffle_buffer": 0, "views.size": 0, "views.n_views": 1, "views.jitter_strength": 0,
    "views.local_crops": 0, "views.local_size": 0, "backbone.width": 1, "backbone.in_chans": 0,
    "backbone.patch_size": 1, "backbone.img_size": 0, "backbone.depth": 0, "backbone.layer_scale": 0,
    "optim.lr": 0, "optim.base_batch": 1, "optim.min_lr": 0, "optim.warmup_epochs": 0, "optim.weight_decay": 0,
    "optim.clip_grad": 0, "optim.trust_coefficient": 0, "train.epochs": 0, "train.steps": 0, "train.minutes": 0,
    "train.schedule_epochs": 0, "train.checkpoint_every": 0, "train.log_every": 1, "train.threads": 0,
    "train.nonfinite_limit": 1, "eval.knn_k": 1,
}
UNIT = ("views.flip_p", "views.jitter_p", "views.gray_p", "views.solarize_p", "optim.warmup_fraction",
        "optim.momentum", "backbone.drop_path")                     # probabilities and the like: [0, 1]
UNIT_OR_OFF = ("views.blur_p", "views.local_blur_p")                # -1 = the preset's value
POSITIVE = ("eval.knn_temperature", "eval.online_probe_lr")
UNIT_LISTS = ("views.view_blur_p", "views.view_solarize_p", "optim.betas")


def _fail(key: str, what: str, value: Any) -> None:
    raise ConfigError(f"config key {key!r} {what}, got {value!r}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_scale(key: str, value: tuple) -> None:
    if len(value) != 2 or not all(_number(v) for v in value) or not 0 < value[0] <= value[1] <= 1:
        _fail(key, "must be [min, max] with 0 < min <= max <= 1", list(value))


def _walk(obj: Any, prefix: str):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            yield f"{prefix}{f.name}", f.name, value, default


def _check_method_field(key: str, name: str, value: Any, default: Any) -> None:
    words = set(name.split("_"))
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if value < 0:
            _fail(key, "must be >= 0", value)
        sizes = {"dim", "size", "heads", "bins", "cell", "hidden", "downsample", "version", "layers"}
        if words & sizes and isinstance(default, int) and default >= 1 and value < 1:
            _fail(key, "must be >= 1", value)
    elif isinstance(value, float):
        if words & {"temp", "temperature"} and "epochs" not in words:
            if value < 0 or (value == 0 and not default == 0):
                _fail(key, "must be > 0" if default != 0 else "must be >= 0 (0 = auto)", value)
        elif "momentum" in words or name == "decay":
            if not (0 <= value <= 1 or (value == -1 and default is not None and default < 0)):
                _fail(key, "must be in [0, 1]" + (" or -1" if default is not None and default < 0 else ""), value)
        elif words & {"ratio", "share"}:
            if not 0 <= value <= 1:
                _fail(key, "must be in [0, 1]", value)
        elif value < 0:
            _fail(key, "must be >= 0", value)
    elif isinstance(value, tuple) and name == "ratio_range" and value:
        if len(value) != 2 or not all(_number(v) for v in value) or not 0 <= value[0] <= value[1] <= 1:
            _fail(key, "must be [] or [min, max] with 0 <= min <= max <= 1", list(value))


def _check_combinations(cfg) -> None:
    from selfsight.backbones.factory import BACKBONES
    from selfsight.backbones.vit import SIZES
    from selfsight.methods.ibot import IBOTParams
    from selfsight.methods.mim import MIMParams
    from selfsight.methods.moco import MoCoParams
    m, b = cfg.method, cfg.backbone
    if b.name not in BACKBONES:
        try:
            BACKBONES.get(b.name)
        except KeyError as e:
            raise ConfigError(f"config key 'backbone.name': {e.args[0]}") from None
    if isinstance(m, (MIMParams, IBOTParams)) and b.name not in SIZES:
        _fail("backbone.name", f"must be a ViT ({', '.join(SIZES)}) for method {m.name} (masked image modeling "
              "masks patches)", b.name)
    if isinstance(m, MoCoParams):
        per_step = cfg.data.batch_size * (2 if m.symmetric else 1)
        if m.queue_size < 1 or m.queue_size % per_step:
            _fail("method.queue_size", f"must be a positive multiple of the keys enqueued per step ({per_step}: "
                  f"data.batch_size{' x2, symmetric loss' if m.symmetric else ''})", m.queue_size)


def validate_config(cfg) -> None:
    """Raise ConfigError (one line, naming the key) for the first invalid value of ``cfg``."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("method", "out")}
    for section, obj in sections.items():
        for key, name, value, _ in _walk(obj, f"{section}."):
            if isinstance(value, float) and not math.isfinite(value):
                _fail(key, "must be a finite number", value)
            if key in CHOICES and value not in CHOICES[key]:
                _fail(key, f"must be one of {', '.join(CHOICES[key])}", value)
            if key in AT_LEAST and value < AT_LEAST[key]:
                _fail(key, f"must be >= {AT_LEAST[key]}", value)
            if key in UNIT and not 0 <= value <= 1:
                _fail(key, "must be in [0, 1]", value)
            if key in UNIT_OR_OFF and not (0 <= value <= 1 or value == -1):
                _fail(key, "must be in [0, 1] or -1 (the preset's value)", value)
            if key in POSITIVE and not value > 0:
                _fail(key, "must be > 0", value)
            if key == "optim.weight_decay_end" and value < 0 and value != -1:
                _fail(key, "must be >= 0 or -1 (constant weight decay)", value)
            if key == "data.cache" and not (isinstance(value, bool) or value == "auto"):
                _fail(key, "must be true, false or auto", value)
            if key.endswith("crop_scale"):
                _check_scale(key, value)
            if key in UNIT_LISTS and not all(_number(v) and 0 <= v <= 1 for v in value):
                _fail(key, "must hold numbers in [0, 1]", list(value))
            if key == "views.jitter" and (len(value) not in (0, 4) or not all(_number(v) and v >= 0 for v in value)):
                _fail(key, "must be [] or [brightness, contrast, saturation, hue] (numbers >= 0)", list(value))
            if key == "data.train" and not value.strip():
                _fail(key, "must name a built-in set or a folder", value)
    if cfg.method is not None:
        for key, name, value, default in _walk(cfg.method, "method."):
            if isinstance(value, float) and not math.isfinite(value):
                _fail(key, "must be a finite number", value)
            _check_method_field(key, name, value, default)
        _check_combinations(cfg)
