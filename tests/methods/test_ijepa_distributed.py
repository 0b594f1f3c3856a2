"""2 processes on gloo (DDP) == 1 process with the global batch for I-JEPA: the masks are drawn once
for the global batch (one context count for all images, as one process would have them) and each
rank holds its slice of the images and masks; the loss and every gradient match, in float64."""
import pytest
import torch
from helpers import run_on_gloo

from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.backbones.vit import ViTBackbone
from selfsight.methods.ijepa import IJEPA, IJEPAParams
from selfsight.nn.distributed import gather_no_grad

WORLD = 2


def make():
    torch.manual_seed(0)
    p = IJEPAParams(predictor_dim=32, predictor_depth=1, predictor_heads=2)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=1, class_token=False)
    return IJEPA(p, vit).double()


def run(model, views, masks):
    out = model({"views": views, "masks": masks}, {})
    out["loss"].backward()
    return out["loss"].detach(), {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


def _worker(rank, views, masks):
    b = views[0].shape[0] // WORLD
    part = slice(rank * b, (rank + 1) * b)
    ddp = torch.nn.parallel.DistributedDataParallel(make())
    loss, grads = run(ddp, [v[part] for v in views], [tuple(t[part] for t in masks[0])])
    return {"loss": gather_no_grad(loss.view(1)).mean(), "grads": grads}


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, fmnist_small):
    recipe = ViewRecipe(size=28, crop_scale=(0.3, 1.0), flip_p=0.0, mean=(0.5,), std=(0.5,))
    views = [v.double() for v in BatchedViews(recipe, torch.Generator().manual_seed(1))(fmnist_small.images[:16])][:1]
    masks = make().masker(views, seed=7)
    got = run_on_gloo(_worker, tmp_path, views, masks, world=WORLD)
    loss, grads = run(make(), views, masks)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert grads.keys() == got["grads"].keys() and len(grads) > 20
    assert not any(n.startswith("teacher.") for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-6, atol=1e-9, msg=f"gradient of {n}")
