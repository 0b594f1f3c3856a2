"""A folder of images/ and masks/: pairs read at the asked size, every unusable pair skipped with
its own line and counted, classes.txt read, and pretraining on such a folder reads images/ only."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from selfsight.data import build_dataset, build_dense
from selfsight.data.builtin import FASHION_CLASSES
from selfsight.data.masks import MaskFolder
from selfsight.data.scenes import make_scenes


@pytest.fixture(scope="module")
def scenes(fmnist_small):
    return make_scenes(fmnist_small.images, fmnist_small.labels, 8, seed=5, class_names=FASHION_CLASSES)


def write_folder(root, scenes, classes=True):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(6):
        Image.fromarray(scenes.images[i, 0].numpy()).convert("RGB").save(root / "images" / f"s{i}.png")
        Image.fromarray(scenes.masks[i].numpy()).save(root / "masks" / f"s{i}.png")
    Image.fromarray(scenes.images[6, 0].numpy()).save(root / "images" / "no_mask.png")
    Image.fromarray(scenes.masks[7].numpy()[:40]).save(root / "masks" / "s_short.png")        # misshapen
    Image.fromarray(scenes.images[7, 0].numpy()).save(root / "images" / "s_short.png")
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(root / "masks" / "rgb.png")          # a colour mask
    Image.fromarray(scenes.images[7, 0].numpy()).save(root / "images" / "rgb.png")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(scenes.masks[0].numpy()).save(root / "masks" / "broken.png")
    Image.fromarray(scenes.masks[0].numpy()).save(root / "masks" / "orphan.png")               # no image
    if classes:
        (root / "classes.txt").write_text("\n".join(scenes.classes) + "\n")


def test_pairs_are_read_and_bad_ones_skipped_one_line_each(tmp_path, scenes, caplog):
    write_folder(tmp_path / "set", scenes)
    with caplog.at_level(logging.WARNING, logger="selfsight.data"):
        data = MaskFolder(tmp_path / "set").load(56)
    assert len(data) == 6 and data.skipped == 4 and data.classes == scenes.classes
    assert torch.equal(data.masks, scenes.masks[:6])
    assert torch.equal(data.images[:, 0], scenes.images[:6, 0])              # RGB of a gray image: equal channels
    text = caplog.text
    for expected in ("no_mask.png: no mask", "s_short.png", "is 56x40 but the image is 56x56", "rgb.png",
                     "is a RGB image", "broken.png", "orphan.png: a mask without an image", "4 of 10 images skipped"):
        assert expected in text, expected


def test_resized_masks_keep_ids_and_unnamed_ids_are_numbered(tmp_path, scenes):
    write_folder(tmp_path / "set", scenes, classes=False)
    data = build_dense(str(tmp_path / "set"), size=28)
    assert tuple(data.masks.shape) == (6, 28, 28)
    assert set(data.masks.unique().tolist()) <= set(scenes.masks[:6].unique().tolist())
    assert data.classes == [f"class {i}" for i in range(int(scenes.masks[:6].max()) + 1)]


def test_ids_beyond_the_named_classes_are_refused_per_file(tmp_path, scenes, caplog):
    write_folder(tmp_path / "set", scenes)
    (tmp_path / "set" / "classes.txt").write_text("background\nT-shirt/top\n")
    with caplog.at_level(logging.WARNING, logger="selfsight.data"), pytest.raises(ValueError, match="none of the"):
        MaskFolder(tmp_path / "set").load(56)
    assert "but classes.txt names 2 classes" in caplog.text


def test_pretraining_on_such_a_folder_reads_the_images_only(tmp_path, scenes):
    write_folder(tmp_path / "set", scenes)
    source = build_dataset(str(tmp_path / "set"))
    assert len(source) == 10 and not source.labeled         # images/ holds 10 files (one broken, found on read)


def test_data_without_masks_is_named(tmp_path):
    with pytest.raises(ValueError, match="images/ and masks/"):
        build_dense("fashion-mnist:test")
