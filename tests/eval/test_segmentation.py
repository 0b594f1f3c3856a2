"""Linear segmentation: mIoU against a count by hand, the token grid in the image's spatial order
(a synthetic case whose answer is known, and a real ViT's tokens), last-N-block tokens, and the CLI
on a tiny run and its random-init baseline."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from selfsight.backbones.base import wrap
from selfsight.data.scenes import IGNORE
from selfsight.eval.dense import confusion, grid, linear_segmentation, scores, token_map
from selfsight.eval.linear import StackedLinear


def test_miou_matches_a_count_by_hand():
    # 2×4 labels, 3 classes, one ignored pixel
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, 1, IGNORE]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    keep = truth != IGNORE
    cm = torch.bincount(truth[keep].long() * 3 + pred[keep], minlength=9).reshape(3, 3)
    # class 0: tp 1, predicted 0 at 2 pixels, true 0 at 2 -> 1/3; class 1: tp 2, pred 3, true 3 -> 2/4;
    # class 2: tp 1, pred 2 (the ignored pixel's prediction is not counted), true 2 -> 1/3
    res = scores(cm, ["bg", "a", "b"])
    assert res["miou"] == pytest.approx((1 / 3 + 2 / 4 + 1 / 3) / 3)
    assert res["pixel_accuracy"] == pytest.approx(4 / 7)
    assert res["iou"] == {"bg": round(1 / 3, 4), "a": 0.5, "b": round(1 / 3, 4)}
    # a class absent from labels and predictions is left out of the mean
    wide = torch.zeros(4, 4, dtype=torch.long)
    wide[:3, :3] = cm
    assert scores(wide)["miou"] == pytest.approx(res["miou"])


def test_confusion_of_stacked_heads_counts_upsampled_predictions():
    """One head that always says class 1 on a 2×2 token grid, labels at 4×4 with two ignored pixels."""
    heads = StackedLinear(1, 3, 2)
    with torch.no_grad():
        heads.bias[0, 0] = torch.tensor([0.0, 1.0])
    masks = torch.zeros(1, 4, 4, dtype=torch.uint8)
    masks[0, :2] = 1
    masks[0, 3, :2] = IGNORE
    cm = confusion(heads, torch.randn(1, 2, 2, 3), masks, 2)
    assert cm[0].tolist() == [[0, 6], [0, 8]]


def rectangles(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gray images with one bright axis-aligned rectangle each (on a 4 px grid, wide or tall at
    random, anywhere), its pixels labeled 1: transposing the token grid would move the labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    cells = size // 4
    for i in range(n):
        h, w = (int(v) for v in torch.randint(1, cells // 2 + 1, (2,), generator=g))
        y = int(torch.randint(0, cells - h + 1, (1,), generator=g)) * 4
        x = int(torch.randint(0, cells - w + 1, (1,), generator=g)) * 4
        images[i, 0, y:y + 4 * h, x:x + 4 * w] = 220
        masks[i, y:y + 4 * h, x:x + 4 * w] = 1
    return images, masks


def test_tokens_keep_the_images_spatial_order():
    """A ConvNet-like backbone whose tokens are the mean of each 4×4 cell: the grid must equal the
    pooled image cell by cell, and a linear head on it must find the rectangles (mIoU near 1)."""
    backbone = wrap(nn.AvgPool2d(4), embed_dim=1, in_chans=1)
    images, masks = rectangles(200)
    x = images.float() / 255
    tokens = token_map(backbone)(x)                                                  # B×8×8×1
    assert torch.equal(tokens[..., 0], F.avg_pool2d(x, 4)[:, 0])
    t = (tokens - tokens.mean()) / tokens.std()
    res = linear_segmentation(t[:150], masks[:150], t[150:], masks[150:], 2, ["bg", "box"], epochs=5)
    assert res["miou"] > 0.95, res
    swapped = linear_segmentation(t[:150].transpose(1, 2), masks[:150], t[150:].transpose(1, 2), masks[150:], 2,
                                  epochs=5)
    assert swapped["miou"] < 0.75, swapped


def test_vit_tokens_are_the_patch_grid_and_last_blocks_concatenate():
    from selfsight.backbones.vit import ViTBackbone
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=2).eval()
    x = torch.randn(2, 1, 56, 56)                                                    # twice the built size
    with torch.no_grad():
        one = token_map(vit)(x)
        two = token_map(vit, blocks=2)(x)
        patch = vit.forward_features(x).patch
    assert tuple(one.shape) == (2, 14, 14, 192) and tuple(two.shape) == (2, 14, 14, 384)
    assert torch.equal(one.reshape(2, -1, 192), patch)
    assert torch.allclose(two[..., 192:], one, atol=1e-5)
    with pytest.raises(ValueError, match="--blocks 2 concatenates"):
        token_map(wrap(nn.AvgPool2d(4), embed_dim=1, in_chans=1), blocks=2)
    with pytest.raises(ValueError, match="square grid"):
        grid(torch.zeros(1, 12, 4))


@pytest.mark.slow
def test_cli_segmentation_of_a_tiny_run_and_its_random_init(tmp_path, fmnist_small):
    import selfsight
    from helpers import tiny_overrides

    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    out = tmp_path / "run"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 2})), out, dataset=fmnist_small)
    cmd = [sys.executable, "-m", "selfsight", "eval", "seg", str(out), "--train", "fashion-mnist-scenes",
           "--test", "fashion-mnist-scenes:test", "--images", "300", "--epochs", "2", "--save"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "linear segmentation" in p.stdout and "mIoU" in p.stdout and "IoU per class, worst first" in p.stdout
    trained = json.loads((out / "eval" / "seg.json").read_text())
    random = selfsight.evaluate(out, "fashion-mnist-scenes", "fashion-mnist-scenes:test", protocol="seg",
                                baseline="random", max_train_images=300, epochs=2, device="cpu")
    for row in (trained, random):
        assert row["tokens"] == "4x4" and row["train_images"] == 300 and row["test_images"] == 1000
        assert 0 < row["miou"] < 1 and row["pixel_accuracy"] > row["miou"] and len(row["sweep"]) == 4
        assert row["classes"][0] == "background" and len(row["classes"]) == 11
    assert random["model"] == "random" and trained["model"] == "trained"
    with pytest.raises(ValueError, match="images with masks"):
        selfsight.evaluate(out, "fashion-mnist", "fashion-mnist-scenes:test", protocol="seg")
