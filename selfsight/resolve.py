"""Resolving a run's config: YAML recipes, CLI flags and ``key=value`` overrides merged over the
method's own recipe defaults, parsed into the schema (``config``), then checked before anything is
built: the rule each field declares (``config.check_fields``), the backbone's name, and the rules
of the method's registration (``MethodSpec.check``: a MoCo queue that is not a multiple of the
keys enqueued per step, a masked-image method without a ViT). A bad value stops the run with one
``ConfigError`` line naming the key.
"""
from __future__ import annotations

from selfsight.backbones.factory import check_backbone_name
from selfsight.config import ConfigError, RunConfig, check_backbone_keys, check_fields, from_dict, merge, read_sources
from selfsight.methods import METHODS


def validate_config(cfg: RunConfig) -> None:
    """Raise ConfigError (one line, naming the key) for the first invalid value of ``cfg``."""
    check_fields(cfg)
    try:
        check_backbone_name(cfg.backbone.name)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config key 'backbone.name': {e.args[0]}") from None
    if cfg.method is not None:
        spec = METHODS.get(cfg.method.name)
        error = spec.check(cfg) if spec.check is not None else None
        if error:
            key, what, value = error
            raise ConfigError(f"config key {key!r} {what}, got {value!r}")


def build_config(tree: dict, resolved: bool = False) -> RunConfig:
    """Validate a raw nested dict into a RunConfig (method section chosen by its name).

    ``resolved=True``: ``tree`` is a run's saved, fully resolved config (a checkpoint's): the
    method's preset defaults are not merged under it again, so a key added to selfsight after
    the run was written takes its plain default (features are added switched off) instead of a
    preset value the run never had."""
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
        check_backbone_keys(tree, spec.defaults)
        tree = merge(spec.defaults, tree)       # the method's own recipe defaults, under the user's
    method_tree = tree.pop("method", None) or {}
    method = from_dict(spec.params, {**method_tree, "name": name}, "method.")
    cfg = from_dict(RunConfig, tree)
    cfg.method = method
    validate_config(cfg)                        # values and combinations, before anything runs
    return cfg


def load_config(files: list[str] | None = None, overrides: list[str] | dict | None = None,
                flags: dict | None = None) -> RunConfig:
    """Merge, in order: YAML ``files`` (paths or bundled recipe names), ``flags`` (from CLI options),
    ``key=value`` overrides (``config.read_sources``); then ``build_config``."""
    return build_config(read_sources(files, overrides, flags))
