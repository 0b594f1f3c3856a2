"""2 processes on gloo (DDP, global BN) == 1 process with the global batch for DINO: the center
(all-reduced teacher outputs of the global crops), the loss and every gradient, in float64."""
import pytest
import torch

from helpers import run_on_gloo
from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.backbones.resnet import ResNetBackbone
from selfsight.losses.dino import update_center
from selfsight.methods.dino import DINO, DINOParams
from selfsight.nn.distributed import gather_no_grad
from selfsight.nn.sync_bn import convert_sync_batchnorm

WORLD = 2


def make():
    torch.manual_seed(0)
    net = ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=8)
    m = DINO(DINOParams(out_dim=64, hidden_dim=32, bottleneck_dim=16), net).double()
    with torch.no_grad():
        m.center.normal_()
    return m


def run(model, views):
    out = model({"views": views}, {"epoch": 0.0})
    out["loss"].backward()
    core = getattr(model, "module", model)
    return out["loss"].detach(), {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}, core.center.clone()


def _worker(rank, views, teacher_out):
    b = views[0].shape[0] // WORLD
    ddp = torch.nn.parallel.DistributedDataParallel(convert_sync_batchnorm(make(), "cpu"))
    loss, grads, center = run(ddp, [v[rank * b:(rank + 1) * b] for v in views])
    # the center alone: each rank holds its half of both global crops' teacher outputs
    c = torch.zeros(1, teacher_out.shape[1], dtype=torch.float64)
    n = teacher_out.shape[0] // 2                             # per global crop
    half = n // WORLD
    mine = torch.cat([teacher_out[:n][rank * half:(rank + 1) * half], teacher_out[n:][rank * half:(rank + 1) * half]])
    update_center(c, mine, 0.9)
    return {"loss": gather_no_grad(loss.view(1)).mean(), "grads": grads, "center": center, "center_only": c}


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, fmnist_small):
    recipe = ViewRecipe(size=28, crop_scale=(0.4, 1.0), local_crops=2, local_size=12, local_crop_scale=(0.1, 0.4),
                        mean=(0.5,), std=(0.5,))
    views = [v.double() for v in BatchedViews(recipe, torch.Generator().manual_seed(1))(fmnist_small.images[:16])]
    teacher_out = torch.randn(32, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = run_on_gloo(_worker, tmp_path, views, teacher_out, world=WORLD)
    loss, grads, center = run(make(), views)
    c = torch.zeros(1, 64, dtype=torch.float64)
    update_center(c, teacher_out, 0.9)
    torch.testing.assert_close(got["center_only"], c)
    torch.testing.assert_close(got["center"], center)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert grads.keys() == got["grads"].keys() and len(grads) > 10
    for n, g in grads.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-6, atol=1e-9, msg=f"gradient of {n}")
