"""2 processes on gloo (DDP) == 1 process with the global batch for DINOv2, in float64: the loss and
every gradient, with softmax centering (the class and masked-patch centers, all-reduced over
processes holding different numbers of masked patches) and with Sinkhorn-Knopp (row sums and the
total all-reduced), separate heads, and KoLeo with ``koleo_scope=global`` (the nearest neighbour
searched over both processes' class tokens). Each rank holds its half of the images and of their
masks (drawn for each half, as each rank's loader does). With the official per-process KoLeo the
two layouts differ by design: checked too, against the mean of the per-half KoLeo terms."""
import pytest
import torch
from helpers import run_on_gloo

from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.backbones.vit import ViTBackbone
from selfsight.losses.koleo import koleo_loss
from selfsight.methods.dinov2 import DINOv2, DINOv2Params
from selfsight.nn.distributed import gather_no_grad

WORLD = 2


def make(centering, scope="global"):
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=7, in_chans=1, depth=1, registers=2)
    m = DINOv2(DINOv2Params(out_dim=64, hidden_dim=32, bottleneck_dim=16, separate_head=True, ibot_out_dim=48,
                            centering=centering, koleo_scope=scope), vit).double()
    with torch.no_grad():
        m.center.normal_()
        m.patch_center.normal_()
    return m


def run(model, views, masks):
    out = model({"views": views, "masks": masks}, {"epoch": 0.0})
    out["loss"].backward()
    core = getattr(model, "module", model)
    grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads, core.center.clone(), core.patch_center.clone(), out["monitor"]


def _worker(rank, views, masks, centering):
    b = views[0].shape[0] // WORLD
    part = slice(rank * b, (rank + 1) * b)
    mine, my_masks = [v[part] for v in views], [None if m is None else m[part] for m in masks]
    # the official per-process KoLeo: each rank's own class tokens, before the step
    cls = make(centering, "process").student.forward_features(torch.cat(mine[:2]), torch.cat(my_masks[:2])).cls
    per_process = sum(koleo_loss(c, scope="process") for c in cls.detach().chunk(2))
    ddp = torch.nn.parallel.DistributedDataParallel(make(centering))
    loss, grads, center, patch_center, _ = run(ddp, mine, my_masks)
    return {"loss": gather_no_grad(loss.view(1)).mean(), "grads": grads, "center": center,
            "patch_center": patch_center, "koleo": gather_no_grad(per_process.view(1)).mean()}


def inputs(fmnist_small):
    recipe = ViewRecipe(size=28, crop_scale=(0.4, 1.0), local_crops=2, local_size=14, local_crop_scale=(0.1, 0.4),
                        mean=(0.5,), std=(0.5,))
    views = [v.double() for v in BatchedViews(recipe, torch.Generator().manual_seed(1))(fmnist_small.images[:16])]
    masker = make("center").make_masker()                     # each rank's masks for its own half, as the loader
    halves = [masker([v[r * 8:(r + 1) * 8] for v in views], 5 + r) for r in range(WORLD)]
    masks = [torch.cat([h[i] for h in halves]) for i in range(2)] + [None, None]   # 16×16 per global crop
    assert masks[0][:8].sum() != masks[0][8:].sum()           # the ranks hold different numbers of masked patches
    return views, masks


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, fmnist_small, centering):
    views, masks = inputs(fmnist_small)
    got = run_on_gloo(_worker, tmp_path, views, masks, centering, world=WORLD)
    loss, grads, center, patch_center, _ = run(make(centering), views, masks)
    if centering == "center":       # the official per-process KoLeo is each process's own batch, by design
        m = make(centering, "process")
        cls = m.student.forward_features(torch.cat(views[:2]), torch.cat(masks[:2])).cls.detach()   # crop 0, crop 1
        halves = [koleo_loss(cls[s]) + koleo_loss(cls[16:][s]) for s in (slice(0, 8), slice(8, 16))]
        torch.testing.assert_close(got["koleo"], sum(halves) / 2)
        assert abs(got["koleo"] - (koleo_loss(cls[:16]) + koleo_loss(cls[16:]))) > 1e-3   # not the global value
    torch.testing.assert_close(got["center"], center)
    torch.testing.assert_close(got["patch_center"], patch_center)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-9)
    assert grads.keys() == got["grads"].keys()
    assert "student.net.reg_token" in grads and "ibot_head.mlp.0.weight" in grads
    for n, gr in grads.items():
        atol = 1e-7 if n.endswith("pos_embed") else 1e-9      # timm resizes it for the local crops in float32
        torch.testing.assert_close(got["grads"][n], gr, rtol=1e-6, atol=atol, msg=f"gradient of {n}")
