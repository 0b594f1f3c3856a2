"""Under DDP (2 gloo processes) the device-side finiteness flag is reduced over ranks: a NaN on
one rank only skips the step on both; a time budget stops both at the same step (agreed every
STOP_SYNC_EVERY steps)."""
import pytest
import torch
from helpers import run_on_gloo, tiny_overrides

from selfsight.engine.trainer import STOP_SYNC_EVERY, Trainer
from selfsight.resolve import load_config


def _worker(rank, run_dir, dataset, budget):
    over = {"train.checkpoint_every": 0, "train.log_every": 2, "data.batch_size": 16, **budget}
    tr = Trainer(load_config(overrides=tiny_overrides(**over)), run_dir, dataset=dataset)
    if rank == 1:                                   # NaN in rank 1's projector output at step 2 only
        tr.model.projector.register_forward_hook(lambda m, i, out: out * float("nan") if tr.step == 2 else out)
    res = tr.fit()
    params = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    return {"res": res, "params": params}


def _both(rank, run_dir, dataset, budget):
    out = _worker(rank, run_dir, dataset, budget)
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, out)
    return gathered


@pytest.mark.slow
def test_nan_on_one_rank_skips_on_both_and_time_stops_agree(tmp_path, fmnist_small):
    (tmp_path / "a").mkdir()
    r0, r1 = run_on_gloo(_both, tmp_path / "a", tmp_path / "a" / "run", fmnist_small, {"train.steps": 4})
    assert r0["res"]["nonfinite_steps"] == r1["res"]["nonfinite_steps"] == 1
    assert torch.equal(r0["params"], r1["params"]) and torch.isfinite(r0["params"]).all()
    (tmp_path / "b").mkdir()
    r0, r1 = run_on_gloo(_both, tmp_path / "b", tmp_path / "b" / "run", fmnist_small, {"train.minutes": 0.01})
    assert r0["res"]["steps"] == r1["res"]["steps"] and r0["res"]["steps"] % STOP_SYNC_EVERY == 0
    assert torch.equal(r0["params"], r1["params"])
