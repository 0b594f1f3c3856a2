"""train.compile: compiled runs give the eager run's losses, compile once (no recompilation per
step), leave checkpoints an eager model loads, and fall back to eager with one warning line."""
import json
import logging

import pytest
import torch
from helpers import tiny_overrides

from selfsight.engine.trainer import Trainer
from selfsight.files import safe_load
from selfsight.methods import build_method
from selfsight.resolve import load_config

RUNS = {
    "simclr-resnet": {"method.name": "simclr"},
    "dino-multicrop": {"method.name": "dino", "method.out_dim": 64, "method.hidden_dim": 32,
                       "method.bottleneck_dim": 16, "views.local_crops": 2, "views.local_size": 12,
                       "optim.name": "adamw", "optim.lr": 1e-3},
    "mae-vit-masks": {"method.name": "mae", "backbone.name": "vit_tiny", "backbone.depth": 2,
                      "backbone.patch_size": 7, "method.head.decoder_dim": 32, "method.head.decoder_depth": 1,
                      "method.head.decoder_heads": 2, "optim.name": "adamw", "optim.lr": 1e-3,
                      "views.n_views": 1},
}


def cfg_of(run: str, compile_: bool, steps: int = 3):
    over = {**RUNS[run], "train.steps": steps, "train.log_every": 1, "train.checkpoint_every": 0,
            "data.batch_size": 16, "train.compile": str(compile_).lower()}
    over = tiny_overrides(**over)
    if run.startswith("mae"):                         # no temperature in MAE
        over = [o for o in over if not o.startswith("method.temperature=")]
    return load_config(overrides=over)


def losses(run_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_compiled_run_matches_eager_and_compiles_once(tmp_path, fmnist_small, run, caplog):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    eager = Trainer(cfg_of(run, False, 4), tmp_path / "eager", dataset=fmnist_small)
    eager.fit()
    tr = Trainer(cfg_of(run, True, 4), tmp_path / "compiled", dataset=fmnist_small)
    assert tr.compiled and all(name.split(".")[0] in ("student", "teacher", "key_student", "head")
                               for name in tr.compiled)
    graphs, real = [], tr._step

    def step(*args):
        real(*args)
        graphs.append(counters["stats"]["unique_graphs"])
    tr._step = step
    with caplog.at_level(logging.WARNING, logger="selfsight"):
        tr.fit()
    assert "train.compile failed" not in caplog.text
    assert graphs[0] > 0 and graphs[1] == graphs[-1], graphs       # every shape compiled by step 2, then reused
    # the first two steps (the forward, then one update from the compiled backward) agree closely; later
    # steps drift apart as rounding differences grow through training (up to 0.4 % by step 4 at some seeds)
    ours, ref = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    torch.testing.assert_close(ours[:2], ref[:2], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)
    # the checkpoint is an ordinary one: an eager model of the same config loads it key for key
    ck = safe_load(tmp_path / "compiled" / "checkpoint.pt")
    model = build_method(tr.cfg, 1, 28)
    model.load_state_dict(ck["model"])
    x = (fmnist_small.images[:4].float() / 255 - 0.5) / 0.5
    model.eval(), tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), tr.model.backbone(x))   # tr.model runs eagerly again


def test_a_failing_compile_falls_back_to_eager_with_one_warning(tmp_path, fmnist_small, monkeypatch, caplog):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("simulated compiler failure\nsecond line of a long traceback")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    eager = Trainer(cfg_of("simclr-resnet", False), tmp_path / "eager", dataset=fmnist_small)
    eager.fit()
    tr = Trainer(cfg_of("simclr-resnet", True), tmp_path / "compiled", dataset=fmnist_small)
    assert tr.compiled == ["student"]
    with caplog.at_level(logging.WARNING, logger="selfsight"):
        res = tr.fit()
    warnings = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert res["steps"] == 3 and len(warnings) == 1 and "\n" not in warnings[0]
    assert "simulated compiler failure" in warnings[0] and "continues uncompiled" in warnings[0]
    assert "second line of a long traceback" in (tmp_path / "compiled" / "compile_error.txt").read_text()
    # the failed first step was rolled back and re-run eagerly: the same losses as an eager run
    assert losses(tmp_path / "compiled") == losses(tmp_path / "eager")


def _compile_agreement_worker(rank, run_dir, dataset, failing_rank):
    """One Trainer per rank with train.compile; ``failing_rank``'s toolchain check raises (a node
    without a compiler), the other's passes without compiling anything (kept fast)."""
    import selfsight.engine.compile as compile_mod

    def check(device):
        if rank == failing_rank:
            raise RuntimeError(f"no C++ compiler on rank {rank}")
    compile_mod.toolchain_check = check
    tr = Trainer(cfg_of("simclr-resnet", True, 2), run_dir, dataset=dataset)
    compiled = list(tr.compiled)
    if failing_rank >= 0:
        tr.fit()                            # eager on both ranks: the step's collectives meet
    return {"compiled": compiled, "steps": tr.step}


@pytest.mark.parametrize("failing_rank", [1, -1])
def test_ranks_agree_to_run_eagerly_when_one_cannot_compile(tmp_path, fmnist_small, failing_rank):
    from helpers import run_on_gloo
    run_dir = tmp_path / "run"
    (tmp_path / "gloo").mkdir()
    out = run_on_gloo(_compile_agreement_worker, tmp_path / "gloo", run_dir, fmnist_small, failing_rank,
                      writes=[run_dir])
    if failing_rank < 0:
        assert out == {"compiled": ["student"], "steps": 0}         # every rank can: compiled as asked
    else:
        assert out == {"compiled": [], "steps": 2}                  # rank 0 learned of rank 1's failure
        assert "another process" in (run_dir / "compile_error.txt").read_text()
