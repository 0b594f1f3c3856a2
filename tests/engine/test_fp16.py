"""fp16 with a gradient scaler (``train.precision=fp16``, or ``auto`` on a GPU without native bf16):
the choice of precision per device, a step the scaler skips on an overflow (weights, EMA teachers,
queues and centers unchanged, counted, never a stop by itself, the scale halved and grown back),
its state across a resume, and every method's loss computed in fp32 under fp16 autocast."""
import copy
import json

import pytest
import torch
from helpers import SMALL_METHOD, tiny_overrides

import selfsight.engine.assemble as assemble
import selfsight.nn.precision as precision
from selfsight.engine.trainer import Trainer
from selfsight.files import safe_load
from selfsight.nn.precision import autocast, pick_precision
from selfsight.resolve import load_config

S = 8.0                                                           # the scaler's first scale in these tests
RUNNING = ("running_mean", "running_var", "num_batches_tracked")   # BN statistics move in any forward pass


@pytest.mark.parametrize("device, capability, cpu_bf16, choice, expected", [
    ("cuda", (7, 0), False, "auto", torch.float16),        # V100
    ("cuda", (7, 5), False, "auto", torch.float16),        # T4
    ("cuda", (6, 0), False, "auto", torch.float16),        # P100
    ("cuda", (8, 0), False, "auto", torch.bfloat16),       # A100
    ("cuda", (9, 0), False, "auto", torch.bfloat16),       # H100
    ("cuda", (8, 0), False, "fp16", torch.float16),
    ("cuda", (7, 0), False, "fp32", None),
    ("cpu", None, True, "auto", torch.bfloat16),
    ("cpu", None, False, "auto", None),
    ("cpu", None, False, "fp16", torch.float16),
])
def test_auto_picks_bf16_where_native_else_fp16_on_a_gpu(monkeypatch, device, capability, cpu_bf16, choice, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: cpu_bf16)
    dtype = pick_precision(choice, torch.device(device))
    assert dtype == expected
    assert (precision.grad_scaler(dtype, torch.device("cpu")) is not None) == (dtype == torch.float16)


def _trainer(tmp_path, fmnist_small, monkeypatch, method="simclr", **extra):
    """A tiny fp16 run whose scaler grows back after 2 clean steps (torch's default: 2000)."""
    monkeypatch.setattr(assemble, "grad_scaler",      # a start low enough that only the injected steps overflow
                        lambda dtype, device: torch.amp.GradScaler("cpu", init_scale=S, growth_interval=2))
    cfg = load_config(overrides=tiny_overrides(**{"method.name": method, "train.precision": "fp16",
                                                  **SMALL_METHOD.get(method, {}), **extra}))
    return Trainer(cfg, tmp_path / "run", dataset=fmnist_small)


def _overflow_on(tr, steps: set):
    """The first parameter's gradient is made infinite at the 0-based ``steps`` (loss finite): an fp16
    overflow as the scaler sees it."""
    p = next(p for p in tr.model.parameters() if p.requires_grad)
    p.register_hook(lambda g: g * float("inf") if tr.step in steps else g)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(RUNNING)}


@pytest.mark.parametrize("method", ["mocov2", "dino"])     # an EMA key encoder and a queue; an EMA teacher and a center
def test_an_overflow_step_is_skipped_leaving_every_state_and_the_scale_recovers(tmp_path, fmnist_small,
                                                                                monkeypatch, method):
    tr = _trainer(tmp_path, fmnist_small, monkeypatch, method, **{"train.steps": 6})
    _overflow_on(tr, {1})
    scaler, window = tr.parts.scaler, tr.log.window()
    batches = iter(tr.loader.epoch(0))
    scales, changed = [], []
    for step in range(5):
        before = _state(tr.model)
        tr.step = step
        tr._step(next(batches), tr.schedule(step), window)
        after = _state(tr.model)
        changed.append(sorted(k for k in after if not torch.equal(before[k], after[k])))
        scales.append(scaler.get_scale())
    # the queue pointer moves on by design (methods/moco.py: the oldest keys stay one more round)
    changed = [[k for k in c if k != "queue_ptr"] for c in changed]
    assert changed[1] == [] and changed[0] and changed[2]       # nothing moved on the overflow step: weights,
    assert any("queue" in k or "center" in k for k in changed[0])     # EMA copy, queue/center (they do on others)
    assert scales[0] == S and scales[1] == S / 2 and scales[3] == S    # halved, grown after 2 clean
    assert int(window.n) == 4 and window.steps == 5             # counted as a non-finite step
    assert tr.nonfinite.read() == 0 and tr.nonfinite.seen == 1     # counted in the total, but no streak


def test_overflows_in_a_row_are_counted_but_never_stop_the_run(tmp_path, fmnist_small, monkeypatch):
    tr = _trainer(tmp_path, fmnist_small, monkeypatch, **{"train.steps": 8, "train.log_every": 4,
                                                          "train.nonfinite_limit": 3})
    _overflow_on(tr, {1, 2, 3, 4, 5})
    res = tr.fit()
    assert res["steps"] == 8 and res["nonfinite_steps"] == 5
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows] == [3, 2] and rows[0]["grad_scale"] == S / 8
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_the_scale_is_checkpointed_and_resumed(tmp_path, fmnist_small, monkeypatch):
    tr = _trainer(tmp_path, fmnist_small, monkeypatch, **{"train.steps": 3})
    _overflow_on(tr, {0, 1})
    tr.fit()
    ck = safe_load(tmp_path / "run" / "checkpoint.pt")
    assert ck["grad_scaler"]["scale"] == S / 4
    resumed = _trainer(tmp_path, fmnist_small, monkeypatch, **{"train.steps": 4})
    resumed.resume = True
    resumed.fit()
    # the growth counter came back too: step 2's clean step and the resumed step 3 double the scale
    assert resumed.parts.scaler.get_scale() == S / 2


@pytest.mark.parametrize("name", ["simclr", "mocov2", "mocov3", "simsiam", "byol", "dino", "barlow_twins", "vicreg",
                                  "ibot", "mae", "maskfeat", "tokenizer"])
def test_every_method_computes_its_loss_in_fp32_under_fp16(tmp_path, fmnist_small, name):
    # Barlow Twins and VICReg at 4096-d (8192 by default): wide enough that fp16 products overflow
    wide = {"method.proj_dim": 4096} if name in ("barlow_twins", "vicreg") else {}
    cfg = load_config(overrides=tiny_overrides(**{"method.name": name, "train.steps": 1, "data.batch_size": 16,
                                                  **SMALL_METHOD.get(name, {}), **wide}))
    tr = Trainer(cfg, tmp_path / "run", dataset=fmnist_small)
    batch, sched = next(iter(tr.loader.epoch(0))), tr.schedule(0)
    losses = {}
    for dtype in (None, torch.float16):
        model = copy.deepcopy(tr.model)             # a forward moves queues, centers, BN statistics
        torch.manual_seed(0)
        with autocast("cpu", dtype):
            loss = model(batch, sched)["loss"]
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[dtype] = loss.detach()
    torch.testing.assert_close(losses[torch.float16], losses[None], rtol=2e-2, atol=2e-3)
