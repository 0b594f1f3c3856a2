"""2 processes on gloo == 1 process with the global batch, for the MoCo family (float64):

* MoCo v2 (shuffle-BN, per-process BN): one process with ``bn_splits=2`` stands for the two
  processes; with the same shuffle permutation the queue after a step holds the same keys, and
  the loss and every gradient agree.
* MoCo v3 (SyncBN, keys gathered without gradient, labels offset by rank): loss and gradients.
"""
import pytest
import torch

from helpers import fmnist_view_pair, run_on_gloo
from selfsight.backbones.resnet import ResNetBackbone
from selfsight.methods.moco import MoCo, MoCoParams
from selfsight.methods.mocov3 import MoCoV3, MoCoV3Params
from selfsight.nn.distributed import gather_no_grad
from selfsight.nn.sync_bn import convert_sync_batchnorm

WORLD = 2
SCHED = {"momentum": 0.99}


def make(kind: str, splits: int = 1):
    torch.manual_seed(0)
    net = ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=8)
    if kind == "mocov2":
        model = MoCo(MoCoParams(temperature=0.2, dim=16, head_hidden_dim=32, queue_size=64, bn_splits=splits), net)
    else:
        model = MoCoV3(MoCoV3Params(hidden_dim=32, dim=16), net)
    with torch.no_grad():      # a key encoder that differs from the query encoder, as after some training
        for p in list(getattr(model, "key_student", getattr(model, "momentum_student", None)).parameters()):
            p.add_(0.01 * torch.randn_like(p))
    return model.double()


def run(model, views):
    torch.manual_seed(123)                          # the shuffle permutation (drawn on rank 0)
    out = model({"views": views}, dict(SCHED))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads


def _worker(rank, views):
    results = {}
    for kind in ("mocov2", "mocov3"):
        model = make(kind, splits=1)
        if kind == "mocov3":
            model = convert_sync_batchnorm(model, "cpu")
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        b = views[0].shape[0] // WORLD
        loss, grads = run(ddp, [v[rank * b:(rank + 1) * b] for v in views])
        results[kind] = {"loss": gather_no_grad(loss.view(1)).mean(),
                         "grads": {n.removeprefix("module."): g for n, g in grads.items()},
                         "buffers": dict(model.named_buffers())}
    return results


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, fmnist_small):
    views = fmnist_view_pair(fmnist_small)
    ddp = run_on_gloo(_worker, tmp_path, views, world=WORLD)

    for kind, splits in (("mocov2", 2), ("mocov3", 1)):
        model = make(kind, splits)
        loss, grads = run(model, views)
        got = ddp[kind]
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-9), kind
        assert grads.keys() == got["grads"].keys() and len(grads) > 10
        for n, g in grads.items():
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-6, atol=1e-8, msg=f"{kind}: gradient of {n}")
        if kind == "mocov2":
            torch.testing.assert_close(got["buffers"]["queue"], model.queue, msg="queue after one step")
            assert int(got["buffers"]["queue_ptr"]) == int(model.queue_ptr) == 16
            # the new keys really came in: the first 16 rows changed, the rest is the random init
            init = make(kind, splits).queue
            assert not torch.allclose(model.queue[:16], init[:16]) and torch.equal(model.queue[16:], init[16:])
