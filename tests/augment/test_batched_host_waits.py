"""The device half of the augmentation never makes the host wait for the device: no blocking upload
(a plain ``.to(device)`` or ``torch.tensor(..., device=...)`` synchronises the stream), no read back.
Run on the ``meta`` device, where every upload and read is visible (conftest.HostWaits)."""
import pytest
import torch

from helpers import HostWaits
from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.nn.device import device_constant, to_device

META = torch.device("meta")
FULL = ViewRecipe(size=32, crop_scale=(0.2, 1.0), blur_p=0.5, solarize_p=0.2, local_crops=3, local_size=16,
                  view_blur_p=(1.0, 0.1), view_solarize_p=(0.0, 0.2))


@pytest.mark.parametrize("channels", [3, 1])
def test_views_from_a_device_batch_never_wait(channels):
    recipe = FULL if channels == 3 else ViewRecipe(size=32, mean=(0.5,), std=(0.5,), blur_p=0.5)
    views = BatchedViews(recipe, torch.Generator().manual_seed(0))
    images = torch.empty(16, channels, 40, 48, dtype=torch.uint8, device=META)
    with HostWaits() as waits:
        out = views(images)
    assert waits.found == []
    assert [tuple(v.shape) for v in out] == [(16, channels, s, s) for s in [32] * recipe.n_views
                                             + [16] * recipe.local_crops]


def test_finishing_worker_crops_never_waits():
    """The hybrid path: uint8 crops from the workers, flip / colour / normalise on the device."""
    views = BatchedViews(FULL, torch.Generator().manual_seed(0))
    recipes = [FULL.for_view(i) for i in range(FULL.total_views)]
    crops = [torch.empty(8, 3, r.size, r.size, dtype=torch.uint8, device=META) for r in recipes]
    with HostWaits() as waits:
        views.finish_views(crops, recipes)
    assert waits.found == []


def test_the_detector_sees_each_kind_of_wait():
    with HostWaits() as waits:
        torch.tensor([1.0, 2.0], device="meta")
        torch.ones(3).to(META)
        torch.empty(3, device=META).copy_(torch.ones(3))
        torch.ones(3).to(META, non_blocking=True)                 # not a wait
        with pytest.raises(Exception):
            torch.ones((), device=META).item()
    assert [w.split(" at ")[0] for w in waits.found] == [
        "tensor(..., device=meta) (an upload)", "blocking upload of (3,)", "blocking upload of (3,)",
        "read back (_local_scalar_dense)"]


def test_constants_are_uploaded_once_per_device_and_dtype():
    a = device_constant((0.5, 0.25), META, torch.float32)
    assert device_constant((0.5, 0.25), META, torch.float32) is a
    assert device_constant((0.5, 0.25), META, torch.float64).dtype == torch.float64
    cpu = torch.arange(3.0)
    assert to_device(cpu, torch.device("cpu")) is cpu            # nothing to move
