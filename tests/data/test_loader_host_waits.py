"""A batch from the loader reaches the device without making the host wait (no blocking upload, no
read back), on the array path (the whole recipe on the device, MAE's masks too) and on the hybrid
folder path (uint8 worker crops finished on the device). Real Fashion-MNIST images; run on the
``meta`` device, where every upload is visible (conftest.HostWaits)."""
import torch
from PIL import Image

from helpers import HostWaits
from selfsight.augment import ViewRecipe
from selfsight.data import ArrayDataset
from selfsight.data.folder import ImageFolder
from selfsight.data.loader import ViewLoader
from selfsight.masking.generators import MaskGenerator
from selfsight.masking.views import ViewMasker

META = torch.device("meta")
RECIPE = ViewRecipe(size=28, crop_scale=(0.2, 1.0), mean=(0.5,), std=(0.5,), local_crops=2, local_size=14)


def first_batch(loader: ViewLoader) -> tuple[dict, list[str]]:
    with HostWaits() as waits:
        batch = next(iter(loader.epoch(0)))
    return batch, waits.found


def test_array_batches_with_masks_never_wait(fmnist_small):
    data = ArrayDataset(fmnist_small.images[:64].clone(), fmnist_small.labels[:64].clone())
    loader = ViewLoader(data, RECIPE, 32, META)
    loader.masker = ViewMasker(MaskGenerator("random", 0.75), patch_size=7)
    batch, found = first_batch(loader)
    assert found == []
    assert batch["label"].device == META and batch["masks"][0].shape == (32, 16)
    assert [tuple(v.shape) for v in batch["views"]] == [(32, 1, 28, 28)] * 2 + [(32, 1, 14, 14)] * 2


def test_hybrid_folder_batches_never_wait(fmnist_small, tmp_path):
    root = tmp_path / "images"
    for i in range(32):
        (root / f"c{int(fmnist_small.labels[i])}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist_small.images[i, 0].numpy()).save(root / f"c{int(fmnist_small.labels[i])}" / f"{i}.png")
    rgb = ViewRecipe(size=28, crop_scale=(0.2, 1.0), local_crops=2, local_size=14)     # a folder gives RGB
    loader = ViewLoader(ImageFolder(root, cache_dir=tmp_path / "index"), rgb, 16, META, workers=0,
                        device_augment="on")
    assert loader.mode == "hybrid"
    batch, found = first_batch(loader)
    assert found == []
    assert batch["label"].device == META and len(batch["views"]) == 4
