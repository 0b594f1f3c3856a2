"""The method contract (methods/contract.py): every registered method passes it when built, a
malformed method is refused in one line naming what is wrong, and nothing outside the contract
probes a method for hooks."""
import re
from pathlib import Path

import pytest
import torch.nn as nn
from helpers import SMALL_METHOD as SMALL, tiny_overrides

from selfsight.methods import METHODS, MethodContractError, build_method, hooks_of
from selfsight.resolve import load_config

# the optional hooks each method has (what the engine will call)
EXPECTED = {"simclr": {"finetune_network"}, "simsiam": {"finetune_network", "fixed_lr_parameters"},
            "byol": {"after_step", "finetune_network", "schedules"},
            "dino": {"after_step", "before_optimizer_step", "finetune_network", "schedules"},
            "ibot": {"after_step", "before_optimizer_step", "finetune_network", "make_masker", "schedules"},
            "dinov2": {"after_step", "before_optimizer_step", "finetune_network", "make_masker", "schedules"},
            "mae": {"after_step", "finetune_network", "make_masker", "pictures", "schedules"},
            "distill": {"set_views"}, "tokenizer": {"pictures", "schedules", "write_artifacts"}}


@pytest.mark.parametrize("name", ["simclr", "mocov2", "mocov3", "simsiam", "byol", "dino", "barlow_twins", "vicreg",
                                  "ibot", "dinov2", "distill", "mae", "maskfeat", "tokenizer"])
def test_every_method_passes_the_contract(name):
    assert name in METHODS
    cfg = load_config(None, tiny_overrides(**{"method.name": name, "data.batch_size": 32, **SMALL.get(name, {})}))
    hooks = hooks_of(build_method(cfg, 1, 28))
    have = {h for h in ("after_step", "before_optimizer_step", "schedules", "make_masker", "pictures",
                        "write_artifacts", "finetune_network", "fixed_lr_parameters", "set_views")
            if getattr(hooks, h) is not None}
    if name in EXPECTED:
        assert have == EXPECTED[name]


class _Backbone(nn.Module):
    embed_dim = 4


def _method(**members):
    base = {"backbone": property(lambda self: self.student),
            "training_step": lambda self, batch, sched: {"loss": 0},
            "forward": lambda self, batch, sched: self.training_step(batch, sched)}
    cls = type("Broken", (nn.Module,), {**base, **members})
    m = cls()
    m.student = _Backbone()
    return m


@pytest.mark.parametrize("members, words", [
    ({"training_step": None}, "has no training_step"),
    ({"training_step": lambda self, batch: {}}, "training_step must take (batch, sched)"),
    ({"forward": nn.Module.forward}, "must define forward(batch, sched)"),
    ({"backbone": None}, "must have a backbone property"),
    ({"after_step": lambda self: None}, "after_step is malformed, the contract is after_step(sched)"),
    ({"after_steps": lambda self, sched: None}, "did you mean after_step?"),
    ({"schedules": lambda self, x: {}}, "schedules is malformed"),
])
def test_a_malformed_method_is_one_line_naming_what_is_wrong(members, words):
    with pytest.raises(MethodContractError) as e:
        hooks_of(_method(**members))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_well_formed_method_gets_its_hooks_and_defaults():
    m = _method(after_step=lambda self, sched: None)
    hooks = hooks_of(m)
    assert hooks.after_step is not None and hooks.pictures is None and hooks.scheduled() == {}
    assert hooks.network_to_finetune() is m.student and hooks.fixed_lr() == []
    assert hooks_of(m) is hooks                                     # checked once


def test_nothing_outside_the_contract_probes_a_method():
    from selfsight.methods.contract import HOOKS
    package = Path(__file__).resolve().parents[2] / "selfsight"
    probe = re.compile(r"(hasattr|getattr)\([^,()]+,\s*[\"'](%s|training_step|backbone)[\"']" % "|".join(HOOKS))
    found = [f"{p.relative_to(package.parent)}:{i}" for p in package.rglob("*.py") if p.name != "contract.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
    assert found == []
