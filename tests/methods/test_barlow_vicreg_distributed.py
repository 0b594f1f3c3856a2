"""2 processes on gloo (DDP, global BN) == 1 process with the global batch for Barlow Twins (the
cross-correlation summed over ranks with gradient) and VICReg (variance and covariance over the
gathered batch): loss and every gradient, in float64."""
import pytest
import torch

from helpers import fmnist_view_pair, run_on_gloo
from selfsight.backbones.resnet import ResNetBackbone
from selfsight.methods.barlow_twins import BarlowTwins, BarlowTwinsParams
from selfsight.methods.vicreg import VICReg, VICRegParams
from selfsight.nn.distributed import gather_no_grad
from selfsight.nn.sync_bn import convert_sync_batchnorm

WORLD = 2


def make(kind: str):
    torch.manual_seed(0)
    net = ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=8)
    model = BarlowTwins(BarlowTwinsParams(proj_dim=32), net) if kind == "barlow_twins" else \
        VICReg(VICRegParams(proj_dim=32), net)
    return model.double()


def run(model, views):
    out = model({"views": views}, {})
    out["loss"].backward()
    return out["loss"].detach(), {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


def _worker(rank, views):
    results = {}
    for kind in ("barlow_twins", "vicreg"):
        ddp = torch.nn.parallel.DistributedDataParallel(convert_sync_batchnorm(make(kind), "cpu"))
        b = views[0].shape[0] // WORLD
        loss, grads = run(ddp, [v[rank * b:(rank + 1) * b] for v in views])
        results[kind] = {"loss": gather_no_grad(loss.view(1)).mean(), "grads": grads}
    return results


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, fmnist_small):
    views = fmnist_view_pair(fmnist_small)
    ddp = run_on_gloo(_worker, tmp_path, views, world=WORLD)
    for kind in ("barlow_twins", "vicreg"):
        loss, grads = run(make(kind), views)
        got = ddp[kind]
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-9), kind
        assert grads.keys() == got["grads"].keys() and len(grads) > 10
        for n, g in grads.items():
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-6, atol=1e-9, msg=f"{kind}: gradient of {n}")
