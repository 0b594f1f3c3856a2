"""2 processes on gloo (DDP, global BN, negatives gathered with gradient) == 1 process with
the global batch: SimCLR's loss, every parameter gradient and BN running statistics
(float64, so that the 1e-5 tolerance tests the algebra, not float32 rounding)."""
import pytest
import torch

from helpers import fmnist_view_pair, run_on_gloo
from selfsight.backbones.resnet import ResNetBackbone
from selfsight.methods.simclr import SimCLR, SimCLRParams
from selfsight.nn.distributed import gather_no_grad, gather_with_grad
from selfsight.nn.sync_bn import convert_sync_batchnorm

WORLD = 2


def make_model():
    torch.manual_seed(0)
    return SimCLR(SimCLRParams(temperature=0.2, proj_hidden_dim=32, proj_out_dim=16),
                  ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=8)).double()


def step(model, views):
    out = model({"views": views}, {})
    out["loss"].backward()
    return out["loss"].detach()


def _worker(rank, views):
    model = convert_sync_batchnorm(make_model(), "cpu")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    b = views[0].shape[0] // WORLD
    local = [v[rank * b:(rank + 1) * b] for v in views]
    loss = ddp({"views": local}, {})["loss"]
    loss.backward()
    losses = gather_no_grad(loss.detach().view(1))
    return {"loss": losses.mean(), "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "buffers": {n: b for n, b in model.named_buffers()}}


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, fmnist_small):
    views = fmnist_view_pair(fmnist_small)
    ddp = run_on_gloo(_worker, tmp_path, views, world=WORLD)

    model = make_model()
    loss = step(model, views)
    assert ddp["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ddp["grads"].keys() and len(grads) > 10
    for n, g in grads.items():
        torch.testing.assert_close(ddp["grads"][n], g, rtol=1e-5, atol=1e-5, msg=f"gradient of {n}")
    for n, b in model.named_buffers():
        torch.testing.assert_close(ddp["buffers"][n].float(), b.float(), rtol=1e-5, atol=1e-5, msg=f"buffer {n}")


def test_helpers_are_no_ops_without_a_process_group():
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x
    torch.testing.assert_close(gather_no_grad(x), x.detach())
    assert not gather_no_grad(x).requires_grad
