"""2 processes on gloo (DDP, global BN) == 1 process with the global batch for MAE with the
global contrastive term: each rank holds its slice of the images and of their masks; the loss
and every gradient match, in float64 (random masks mask the same count in every image, so the
mean over a rank's masked patches averages to the global one)."""
import pytest
import torch

from helpers import run_on_gloo
from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.backbones.vit import ViTBackbone
from selfsight.masking import MaskGenerator
from selfsight.methods.mim import MIM, MIMParams
from selfsight.nn.distributed import gather_no_grad
from selfsight.nn.sync_bn import convert_sync_batchnorm

WORLD = 2


def make():
    torch.manual_seed(0)
    p = MIMParams()
    p.head.decoder_dim, p.head.decoder_depth, p.head.decoder_heads = 32, 1, 2
    p.global_term.kind, p.global_term.hidden_dim, p.global_term.dim = "contrastive", 32, 16
    return MIM(p, ViTBackbone("vit_tiny", img_size=28, patch_size=7, in_chans=1, depth=1)).double()


def run(model, views, masks):
    out = model({"views": views, "masks": masks}, {})
    out["loss"].backward()
    return out["loss"].detach(), {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


def _worker(rank, views, masks):
    b = views[0].shape[0] // WORLD
    ddp = torch.nn.parallel.DistributedDataParallel(convert_sync_batchnorm(make(), "cpu"))
    part = slice(rank * b, (rank + 1) * b)
    loss, grads = run(ddp, [v[part] for v in views], [m[part] for m in masks])
    return {"loss": gather_no_grad(loss.view(1)).mean(), "grads": grads}


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, fmnist_small):
    recipe = ViewRecipe(size=28, crop_scale=(0.4, 1.0), mean=(0.5,), std=(0.5,))
    views = [v.double() for v in BatchedViews(recipe, torch.Generator().manual_seed(1))(fmnist_small.images[:16])]
    masks = [MaskGenerator("random", 0.75)(16, 4, 4, seed=s) for s in (1, 2)]
    got = run_on_gloo(_worker, tmp_path, views, masks, world=WORLD)
    loss, grads = run(make(), views, masks)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert grads.keys() == got["grads"].keys() and len(grads) > 20
    for n, g in grads.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-6, atol=1e-9, msg=f"gradient of {n}")
