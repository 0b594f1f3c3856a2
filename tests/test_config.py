import pytest

from selfsight.config import ConfigError, parse_overrides, read_yaml, recipes_dir, save_config
from selfsight.resolve import load_config


def test_misspelled_key_names_the_key_and_the_nearest_valid_one():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["optim.learning_rat=0.1"])
    assert "'optim.learning_rat'" in str(e.value)
    with pytest.raises(ConfigError, match=r"did you mean 'optim.weight_decay'"):
        load_config(overrides=["optim.wieght_decay=0.1"])
    with pytest.raises(ConfigError, match=r"did you mean 'method.temperature'"):
        load_config(overrides=["method.temprature=0.3"])          # the method's own schema
    with pytest.raises(ConfigError, match=r"did you mean 'train'"):
        load_config(overrides=["trian.steps=3"])


def test_unknown_method_and_bad_values_are_clear_errors():
    with pytest.raises(ConfigError, match=r"unknown method 'simclrr'; did you mean 'simclr'"):
        load_config(overrides=["method.name=simclrr"])
    with pytest.raises(ConfigError, match=r"'train.steps' must be an integer"):
        load_config(overrides=["train.steps=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_precedence_method_defaults_then_yaml_then_flags_then_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("optim:\n  lr: 0.5\n  weight_decay: 5e-4\ntrain:\n  steps: 7\n")
    cfg = load_config([str(f)])
    assert cfg.optim.name == "lars" and cfg.optim.warmup_epochs == 10      # SimCLR's own defaults
    assert cfg.optim.lr == 0.5 and cfg.optim.weight_decay == 5e-4 and cfg.train.steps == 7
    cfg = load_config([str(f)], ["optim.lr=0.1", "views.crop_scale=[0.3,1.0]"], {"train": {"steps": 9}})
    assert cfg.optim.lr == 0.1 and cfg.train.steps == 9 and cfg.views.crop_scale == (0.3, 1.0)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(["simclr_fashion_mnist"], ["method.temperature=0.3"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config([str(tmp_path / "c.yaml")])
    assert again == cfg and again.method.temperature == 0.3


def test_every_bundled_recipe_is_valid():
    recipes = list(recipes_dir().glob("*.yaml"))
    assert recipes
    for r in recipes:
        # a distillation recipe names everything but the user's own teacher
        load_config([str(r)], [f"method.teacher={r}"] if r.name.startswith("distill") else None)
    with pytest.raises(ConfigError, match="method.teacher' must name the teacher"):
        load_config(["distill_fashion_mnist"])
    with pytest.raises(ConfigError, match="method.teacher' names no file or folder"):
        load_config(["distill_fashion_mnist"], ["method.teacher=runs/nope"])
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml("no_such_recipe")


def test_yaml_on_off_reach_string_fields_as_on_off():
    assert load_config(overrides=["data.device_augment=off"]).data.device_augment == "off"
    assert load_config(overrides=["data.device_augment=on"]).data.device_augment == "on"


def test_every_number_in_the_schema_declares_its_rule():
    """Bounds live on the fields (``config.setting``), never guessed from a field's name: every int
    and float of the run config and of each method's section says what it accepts."""

    from selfsight.config import RunConfig, ruled_fields
    from selfsight.methods import METHODS
    classes = [RunConfig] + [METHODS.get(n).params for n in METHODS.names()]
    bare = [key for cls in classes for key, f in ruled_fields(cls, f"{cls.__name__}.")
            if f.type in (int, float, "int", "float") and not f.metadata.get("rule")]
    assert bare == []
    assert len([1 for cls in classes for _ in ruled_fields(cls)]) > 200      # the walk does reach every section


def test_a_method_rule_lives_with_the_method_and_names_the_key():
    from selfsight.config import ConfigError
    from selfsight.methods import METHODS
    assert METHODS.get("mocov2").check is not None and METHODS.get("mae").check is not None
    with pytest.raises(ConfigError, match="'method.queue_size' must be a positive multiple"):
        load_config(None, ["method.name=mocov2", "method.queue_size=100", "data.batch_size=64"])
    with pytest.raises(ConfigError, match="'backbone.name' must be a ViT"):
        load_config(None, ["method.name=mae", "backbone.name=resnet18"])


def test_a_bundled_recipe_for_a_builtin_backbone_takes_a_timm_model():
    """--data fashion-mnist picks the bundled SimCLR recipe, written for resnet10 (CIFAR stem, width
    32): with --backbone timm:NAME its stem and width are left out instead of refused; the same keys
    from the user are refused."""
    from selfsight.config import ConfigError, read_sources
    from selfsight.resolve import build_config
    tree = read_sources(["simclr_fashion_mnist"], ["optim.lr=0.1"], {"backbone": {"name": "timm:resnet18d"}})
    assert "width" not in tree["backbone"] and "small_stem" not in tree["backbone"]
    cfg = build_config(tree)
    assert cfg.backbone.name == "timm:resnet18d" and cfg.optim.lr == 0.1 and cfg.views.size == 28
    with pytest.raises(ConfigError, match="'backbone.width' applies to selfsight's own"):
        build_config(read_sources(["simclr_fashion_mnist"], ["backbone.width=16"],
                                  {"backbone": {"name": "timm:resnet18d"}}))
    # a saved MAE run config holds the recipe's sin-cos table: not the user's, so a resume is not refused
    mae = build_config(read_sources(None, ["method.name=mae", "backbone.name=timm:vit_tiny_patch16_224",
                                           "backbone.pos_embed=sincos"]))
    assert mae.backbone.name == "timm:vit_tiny_patch16_224"
