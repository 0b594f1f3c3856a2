"""Bad configuration: random and adversarial YAML (wrong types, negative sizes, non-finite
numbers, unknown keys, impossible combinations) is rejected before anything runs, with one
ConfigError line naming the key; the CLI prints it as one line, exit code 2, and creates no run."""
import dataclasses
import re

import pytest
import yaml
from helpers import tiny_overrides
from hypothesis import HealthCheck, given, settings, strategies as st

from selfsight.cli import main
from selfsight.config import ConfigError, RunConfig
from selfsight.methods import METHODS
from selfsight.resolve import load_config

SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig) if f.name not in ("method", "out")}
KEY = re.compile(r"'(method|data|views|backbone|optim|train|eval|out)(\.[^']*)?'")     # a quoted dotted key


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def section_class(name: str):
    import typing
    return typing.get_type_hints(RunConfig)[name]


values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=8), st.sampled_from(["auto", "on", "off", "lars", "resnet18", "vit_tiny", "1e-3"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=4)


@st.composite
def trees(draw) -> dict:
    tree = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=3, unique=True)):
        keys = field_names(section_class(section)) + ["unknown_key"]
        tree[section] = {k: draw(values) for k in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True))}
    if draw(st.booleans()):
        name = draw(st.sampled_from(METHODS.names()) | st.text(max_size=6))
        params = METHODS.get(name).params if name in METHODS else None
        keys = (field_names(params) if params else []) + ["unknown_key"]
        tree["method"] = {"name": name, **{k: draw(values) for k in draw(st.lists(st.sampled_from(keys), max_size=3,
                                                                                        unique=True)) if k != "name"}}
    return tree


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=trees())
def test_random_yaml_is_accepted_or_rejected_in_one_line_naming_the_key(tmp_path, tree):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        load_config([str(path)])
    except ConfigError as e:              # any other exception is a crash the user would see as a traceback
        msg = str(e)
        assert "\n" not in msg and KEY.search(msg), msg


ADVERSARIAL = [
    (["--method", "mocov2", "method.queue_size=100"], "method.queue_size"),           # 100 % 32 keys != 0
    (["--method", "mocov2", "method.queue_size=96", "method.symmetric=true"], "method.queue_size"),  # x2 keys
    (["--method", "mae", "--backbone", "resnet18"], "backbone.name"),                  # ViT-only methods
    (["--method", "ibot", "--backbone", "resnet18"], "backbone.name"),
    (["--method", "beit", "--backbone", "resnet50"], "backbone.name"),
    (["data.batch_size=-8"], "data.batch_size"),
    (["views.size=-1"], "views.size"),
    (["train.steps=-5"], "train.steps"),
    (["optim.lr=-0.1"], "optim.lr"),
    (["optim.lr=.nan"], "optim.lr"),
    (["train.log_every=0"], "train.log_every"),
    (["views.crop_scale=[0.9,0.2]"], "views.crop_scale"),
    (["views.flip_p=1.5"], "views.flip_p"),
    (["optim.name=adam"], "optim.name"),
    (["train.precision=fp8"], "train.precision"),
    (["method.temperature=0"], "method.temperature"),
    (["backbone.name=resnet19"], "backbone.name"),
    (["data.batch_size=abc"], "data.batch_size"),
    (["train.steps=.inf"], "train.steps"),
    (["optim=3"], "optim"),
]


@pytest.mark.parametrize("args, key", ADVERSARIAL)
def test_adversarial_config_is_one_cli_line_before_anything_runs(tmp_path, capsys, args, key):
    out = tmp_path / "run"
    base = [a for a in tiny_overrides(**{"train.steps": 2}) if not any(a.startswith(x.split("=")[0] + "=")
                                                                        for x in args if "=" in x)]
    if "--method" in args:                                     # another method: its own recipe's sections
        base = [a for a in base if not a.startswith(("backbone.", "method."))]
    rc = main(["pretrain", "--out", str(out), *args, *base])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("selfsight: error:"), err
    assert f"'{key}'" in err[0], err[0]
    assert not out.exists()                                   # rejected before the run folder exists


def test_adversarial_yaml_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: mocov2\n  queue_size: 1000\ndata:\n  batch_size: 64\n")
    with pytest.raises(ConfigError, match=r"'method.queue_size' must be a positive multiple .* \(64"):
        load_config([str(bad)])
    bad.write_text("views: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"section 'views' must be a mapping"):
        load_config([str(bad)])
