"""Every method's step (forward, backward, the EMA / queue / center update after it) never makes the
host wait for the device: no blocking upload and no read back of a device value, the value passed
as a Python number included (``_foreach_lerp_`` with a device weight reads it back inside C++, which
``Tensor.item`` guards in tests/engine/test_sync_free_step.py do not see). Run on the ``meta``
device, where every upload and read is visible (conftest.HostWaits)."""
import pytest
import torch
from helpers import HostWaits, tiny_overrides

from selfsight.masking.generators import MaskGenerator
from selfsight.masking.views import ViewMasker
from selfsight.methods import build_method
from selfsight.resolve import load_config

META = torch.device("meta")
VIT = {"backbone.name": "vit_tiny", "backbone.depth": 1, "backbone.patch_size": 4}
METHODS = {
    "simclr": {},
    "mocov2": {"method.queue_size": 64, "method.dim": 16},                      # queue, shuffle-BN
    "mocov3": {},
    "byol": {},
    "simsiam": {},
    "barlow_twins": {},
    "vicreg": {},
    "dino": {"method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16,
             "views.local_crops": 2, "views.local_size": 12},
    "mae": {**VIT, "method.head.decoder_dim": 32, "method.head.decoder_depth": 1, "method.head.decoder_heads": 2},
    "ibot": {**VIT, "method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16},
    "dinov2": {**VIT, "method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16},
    "dinov2_sinkhorn": {**VIT, "method.name": "dinov2", "method.out_dim": 64, "method.hidden_dim": 32,
                        "method.bottleneck_dim": 16, "method.centering": "sinkhorn", "method.separate_head": "true"},
    # SimMIM-like: dense student, linear head, block masks (MaskFeat's HOG needs autocast, which meta lacks)
    "mim": {**VIT, "method.student_input": "dense", "method.head.kind": "linear", "method.mask.kind": "block",
            "method.mask.ratio": 0.4, "method.target.kind": "pixels"},
}
NO_TEMPERATURE = ("mae", "ibot", "dinov2", "dinov2_sinkhorn", "mim", "mocov3")


@pytest.mark.parametrize("name", list(METHODS))
def test_a_methods_step_never_makes_the_host_wait(name):
    over = [o for o in tiny_overrides(**{"method.name": name, **METHODS[name]})
            if not (name in NO_TEMPERATURE and o.startswith("method.temperature="))]
    cfg = load_config(overrides=over)
    torch.manual_seed(0)
    model = build_method(cfg, 1, 28).to(META)
    views = [torch.empty(8, 1, 28, 28, device=META) for _ in range(2)]
    views += [torch.empty(8, 1, 12, 12, device=META) for _ in range(cfg.views.local_crops)]
    batch = {"views": views, "label": torch.empty(8, dtype=torch.long, device=META)}
    if hasattr(model, "masker"):                                  # MIM: the loader's masks, on the device
        batch["masks"] = model.masker(views, 0)
    elif name in ("mae", "ibot", "mim"):
        batch["masks"] = ViewMasker(MaskGenerator("random", 0.75), 4, (0, 1))(views, 0)
    sched = {"step": 3, "total_steps": 10, "epoch": 0.3, "progress": 0.3, "lr": 0.1, "weight_decay": 0.0,
             "finite": torch.ones((), dtype=torch.bool, device=META)}
    sched.update({k: lo for k, (lo, hi) in getattr(model, "schedules", dict)().items()})
    with HostWaits() as waits:
        out = model(batch, sched)
        out["loss"].backward()
        if hasattr(model, "before_optimizer_step"):
            model.before_optimizer_step(sched)
        if hasattr(model, "after_step"):
            model.after_step(sched)
    assert waits.found == []
