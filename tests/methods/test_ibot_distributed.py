"""2 processes on gloo (DDP) == 1 process with the global batch for iBOT: the class and patch
centers (all-reduced teacher outputs of the global crops), the loss and every gradient, in
float64. Each rank holds its half of the images and of their masks (drawn once for the global
batch: about half the images unmasked, the others 10-50 % in blocks)."""
import pytest
import torch

from helpers import run_on_gloo
from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.backbones.vit import ViTBackbone
from selfsight.losses.dino import update_center
from selfsight.losses.ibot import update_patch_center
from selfsight.methods.ibot import IBOT, IBOTParams
from selfsight.nn.distributed import gather_no_grad

WORLD = 2


def make():
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=7, in_chans=1, depth=1)
    m = IBOT(IBOTParams(out_dim=64, hidden_dim=32, bottleneck_dim=16), vit).double()
    with torch.no_grad():
        m.center.normal_()
        m.patch_center.normal_()
    return m


def run(model, views, masks):
    out = model({"views": views, "masks": masks}, {"epoch": 0.0})
    out["loss"].backward()
    core = getattr(model, "module", model)
    grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads, core.center.clone(), core.patch_center.clone()


def _worker(rank, views, masks, t_cls, t_patch):
    b = views[0].shape[0] // WORLD
    part = slice(rank * b, (rank + 1) * b)
    ddp = torch.nn.parallel.DistributedDataParallel(make())
    mine = [None if m is None else m[part] for m in masks]
    loss, grads, center, patch_center = run(ddp, [v[part] for v in views], mine)
    # the centers alone: each rank holds its half of both global crops' teacher outputs
    n = t_cls.shape[0] // 2                                   # per global crop
    c1, c2 = torch.zeros(1, 64, dtype=torch.float64), torch.zeros(1, 64, dtype=torch.float64)
    update_center(c1, torch.cat([t_cls[:n][part], t_cls[n:][part]]), 0.9)
    update_patch_center(c2, torch.cat([t_patch[:n][part], t_patch[n:][part]]), 0.9)
    return {"loss": gather_no_grad(loss.view(1)).mean(), "grads": grads, "center": center,
            "patch_center": patch_center, "c1": c1, "c2": c2}


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, fmnist_small):
    recipe = ViewRecipe(size=28, crop_scale=(0.4, 1.0), local_crops=2, local_size=14, local_crop_scale=(0.1, 0.4),
                        mean=(0.5,), std=(0.5,))
    views = [v.double() for v in BatchedViews(recipe, torch.Generator().manual_seed(1))(fmnist_small.images[:16])]
    masks = make().make_masker()(views, 5)                    # 16×16 masks for the 2 global crops, None for locals
    assert all(m[:8].any() and m[8:].any() and not m.all(1).any() for m in masks[:2])
    g = torch.Generator().manual_seed(2)
    t_cls, t_patch = torch.randn(32, 64, generator=g, dtype=torch.float64), torch.randn(32, 16, 64, generator=g,
                                                                                         dtype=torch.float64)
    got = run_on_gloo(_worker, tmp_path, views, masks, t_cls, t_patch, world=WORLD)
    loss, grads, center, patch_center = run(make(), views, masks)
    c1, c2 = torch.zeros(1, 64, dtype=torch.float64), torch.zeros(1, 64, dtype=torch.float64)
    update_center(c1, t_cls, 0.9)
    update_patch_center(c2, t_patch, 0.9)
    torch.testing.assert_close(got["c1"], c1)
    torch.testing.assert_close(got["c2"], c2)
    torch.testing.assert_close(c2, 0.1 * t_patch.mean((0, 1))[None])          # the mean over all patch tokens
    torch.testing.assert_close(got["center"], center)
    torch.testing.assert_close(got["patch_center"], patch_center)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert grads.keys() == got["grads"].keys() and "student.mask_token" in grads and len(grads) > 20
    for n, gr in grads.items():
        atol = 1e-7 if n.endswith("pos_embed") else 1e-9      # timm resizes it for the local crops in float32
        torch.testing.assert_close(got["grads"][n], gr, rtol=1e-6, atol=atol, msg=f"gradient of {n}")
