"""Non-finite loss policy (``train.nonfinite_limit``): a NaN or Inf loss step is skipped (the
weights do not move) and counted in the logs and the result; ``nonfinite_limit`` of them in a
row stop the run with one clear line, keeping the last good checkpoint."""
import json
import math

import pytest
import torch
from helpers import tiny_overrides

from selfsight.config import ConfigError
from selfsight.engine.trainer import Trainer, TrainingError
from selfsight.files import safe_load
from selfsight.resolve import load_config


def inject(monkeypatch, bad: float, at):
    """SimCLR's loss becomes ``bad`` at the 1-based calls in ``at`` (a predicate)."""
    import selfsight.methods.simclr as simclr
    real, calls = simclr.nt_xent, {"n": 0}

    def faulty(z1, z2, t):
        calls["n"] += 1
        loss = real(z1, z2, t)
        return loss * bad if at(calls["n"]) else loss
    monkeypatch.setattr(simclr, "nt_xent", faulty)


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, fmnist_small, monkeypatch, bad):
    inject(monkeypatch, bad, lambda n: n in (3, 7, 8))
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 10, "train.log_every": 5,
                                                  "train.nonfinite_limit": 3}))
    tr = Trainer(cfg, tmp_path / "run", dataset=fmnist_small)
    res = tr.fit()
    assert res["steps"] == 10 and res["nonfinite_steps"] == 3
    logged = rows(tmp_path / "run")
    assert sum(r["nonfinite_steps"] for r in logged) == 3 and all(math.isfinite(r["loss"]) for r in logged)
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_a_skipped_step_leaves_the_weights_unchanged(tmp_path, fmnist_small, monkeypatch):
    inject(monkeypatch, float("nan"), lambda n: n == 2)
    seen = []
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 2, "train.checkpoint_every": 1}))
    tr = Trainer(cfg, tmp_path / "run", dataset=fmnist_small)
    real_save = tr.save

    def save():
        seen.append({k: v.detach().clone() for k, v in tr.model.named_parameters()})
        real_save()
    tr.save = save
    assert tr.fit()["nonfinite_steps"] == 1
    after_step1, final = seen[0], seen[-1]            # step 2 (NaN) changed no parameter (BN statistics
    assert all(torch.equal(after_step1[k], final[k]) for k in final)      # move in any forward pass)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_in_a_row_stops_with_the_last_good_checkpoint(tmp_path, fmnist_small, monkeypatch, bad):
    inject(monkeypatch, bad, lambda n: n == 2 or n >= 9)
    cfg = load_config(overrides=tiny_overrides(**{"train.steps": 40, "train.log_every": 1,
                                                  "train.checkpoint_every": 4, "train.nonfinite_limit": 3}))
    tr = Trainer(cfg, tmp_path / "run", dataset=fmnist_small)
    with pytest.raises(TrainingError) as e:
        tr.fit()
    msg = str(e.value)
    assert "\n" not in msg and "not finite for 3 steps in a row (step 10)" in msg and "checkpoint kept" in msg
    ck = safe_load(tmp_path / "run" / "checkpoint.pt")
    assert ck["step"] == 8                                   # the last checkpoint before the streak (steps 9-11)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert sum(r["nonfinite_steps"] for r in rows(tmp_path / "run")) >= 1    # the isolated step 2 is logged


def test_the_limit_must_be_positive():
    with pytest.raises(ConfigError, match="'train.nonfinite_limit' must be >= 1"):
        load_config(overrides=["train.nonfinite_limit=0"])
