"""The training step reads nothing from the device between two log steps (train.log_every), and a
step with NaN in it is skipped on the device: weights, EMA teacher, MoCo queue and DINO center as
they were. Real Fashion-MNIST images; SimCLR (fused SGD), DINO (fused AdamW, center, multi-crop),
MoCo v2 (queue, shuffle-BN, fused SGD)."""
import contextlib

import pytest
import torch
from helpers import tiny_overrides

from selfsight.engine.trainer import Trainer
from selfsight.resolve import load_config

READS = ("__bool__", "item", "tolist", "__float__", "__int__")
METHODS = {
    "simclr": {"method.name": "simclr"},
    "dino": {"method.name": "dino", "method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16,
             "views.local_crops": 2, "views.local_size": 12, "optim.name": "adamw", "optim.lr": 1e-3,
             "optim.clip_grad": 3.0, "optim.clip_mode": "per_param"},
    "mocov2": {"method.name": "mocov2", "method.queue_size": 256, "method.dim": 16},
}
HEADS = ("projector", "head", "teacher_head", "key_head")       # outputs poisoned with NaN in one step


@contextlib.contextmanager
def host_reads_forbidden():
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a device value inside the training step")
    try:
        for name in READS:
            setattr(torch.Tensor, name, forbidden)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def trainer(tmp_path, fmnist_small, method: str, steps: int, **extra) -> Trainer:
    over = tiny_overrides(**{**METHODS[method], "train.steps": steps, "train.checkpoint_every": 0,
                             "data.batch_size": 16, **extra})
    return Trainer(load_config(overrides=over), tmp_path / "run", dataset=fmnist_small)


@pytest.mark.parametrize("method", list(METHODS))
def test_no_host_read_inside_the_step_between_log_steps(tmp_path, fmnist_small, method):
    tr = trainer(tmp_path, fmnist_small, method, 4, **{"train.log_every": 4})
    real, guarded = tr._step, []

    def step(batch, sched, window):
        if (tr.step + 1) % tr.cfg.train.log_every == 0:        # a log step reads the monitor: allowed
            return real(batch, sched, window)
        with host_reads_forbidden():
            real(batch, sched, window)
        guarded.append(tr.step)
    tr._step = step
    res = tr.fit()
    assert guarded == [0, 1, 2] and res["steps"] == 4 and res["nonfinite_steps"] == 0
    with pytest.raises(AssertionError, match="host read"):      # the guard itself works
        with host_reads_forbidden():
            bool(torch.ones(()))


def state(model) -> dict:
    keep = {k: v for k, v in model.state_dict().items() if not k.endswith(("running_mean", "running_var",
                                                                         "num_batches_tracked", "queue_ptr"))}
    return {k: v.detach().clone() for k, v in keep.items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_nan_step_changes_no_weight_queue_or_center(tmp_path, fmnist_small, method):
    tr = trainer(tmp_path, fmnist_small, method, 4, **{"train.log_every": 2})
    poison_at, seen = 2, {}
    for name in HEADS:
        if getattr(tr.model, name, None) is not None:
            getattr(tr.model, name).register_forward_hook(
                lambda m, i, out: out * float("nan") if tr.step == poison_at else out)
    real = tr._step

    def step(batch, sched, window):
        seen[tr.step] = state(tr.model)
        real(batch, sched, window)
        seen[tr.step + 0.5] = state(tr.model)
    tr._step = step
    assert tr.fit()["nonfinite_steps"] == 1
    before, after = seen[poison_at], seen[poison_at + 0.5]
    assert any(k in before for k in ("queue", "center")) or method == "simclr"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # MoCo's key encoder moves INSIDE the step, before the key pass (the paper), towards the query
    # encoder's finite weights; everything else (weights, EMA teachers, queue, center) stays
    assert all(k.startswith("key_") for k in changed) and (method == "mocov2") == bool(changed)
    assert all(torch.isfinite(after[k]).all() for k in changed)
    moved = [k for k in before if not torch.equal(seen[poison_at + 1][k], seen[poison_at + 1.5][k])]
    assert moved and all(torch.isfinite(v).all() for v in seen[poison_at + 1.5].values())   # training goes on
