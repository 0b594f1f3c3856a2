"""fashion-mnist-scenes: the same scenes for the same seed, labels that match the placed garments,
boxes tight around each garment's visible pixels, and the built-in name."""
import torch

from selfsight.data.builtin import FASHION_CLASSES
from selfsight.data.scenes import BACKGROUND_MAX, FOREGROUND, GARMENT_SIDE, IGNORE, make_scenes


def test_the_same_seed_makes_the_same_scenes(fmnist_small):
    a = make_scenes(fmnist_small.images, fmnist_small.labels, 40, seed=3)
    b = make_scenes(fmnist_small.images, fmnist_small.labels, 40, seed=3)
    c = make_scenes(fmnist_small.images, fmnist_small.labels, 40, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert not torch.equal(a.images, c.images)


def test_labels_are_the_placed_garments_classes(fmnist_small):
    data = make_scenes(fmnist_small.images, fmnist_small.labels, 60, seed=0, class_names=FASHION_CLASSES)
    assert data.classes[0] == "background" and data.classes[1:] == FASHION_CLASSES
    assert int(data.masks.max()) <= 10 and not (data.masks == IGNORE).any()
    fg = data.masks > 0
    image = data.images[:, 0]
    assert bool((image[fg] > FOREGROUND).all()) and bool((image[~fg] < BACKGROUND_MAX).all())
    for mask, boxes in zip(data.masks, data.boxes):
        assert 1 <= len(boxes) <= 4
        assert set(mask.unique().tolist()) - {0} == set(boxes[:, 4].long().tolist())
        for x0, y0, x1, y1, cls in boxes.long().tolist():
            inside = mask[y0:y1, x0:x1] == cls
            # tight: the garment's pixels touch all four sides of its box; no garment outgrows the largest side
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert x1 - x0 <= GARMENT_SIDE[1] and y1 - y0 <= GARMENT_SIDE[1]


def test_a_scene_of_known_squares():
    """Solid 28 px squares of three known classes: every labeled region is one of them, in the box."""
    squares = torch.full((3, 1, 28, 28), 200, dtype=torch.uint8)
    data = make_scenes(squares, torch.tensor([4, 7, 9]), 30, seed=1)
    for mask, boxes in zip(data.masks, data.boxes):
        assert set(mask.unique().tolist()) <= {0, 5, 8, 10}
        covered = torch.zeros_like(mask, dtype=torch.bool)
        for x0, y0, x1, y1, cls in boxes.long().tolist():
            assert bool((mask[y0:y1, x0:x1] == cls).float().mean() > 0.5)
            covered[y0:y1, x0:x1] = True
        assert not bool(((mask > 0) & ~covered).any())          # every garment pixel lies in some box


def test_the_builtin_name_makes_the_test_split(fmnist_test):
    from selfsight.data import build_dataset, build_dense
    data = build_dataset("fashion-mnist-scenes:test", download=False)
    again = build_dense("fashion-mnist-scenes:test")
    assert len(data) == 1000 and tuple(data.images.shape[1:]) == (1, 56, 56) and (data.labels == -1).all()
    assert torch.equal(data.masks, again.masks)
    half = build_dense("fashion-mnist-scenes:test", size=28)
    assert tuple(half.masks.shape) == (1000, 28, 28) and float(half.boxes[0][:, :4].max()) <= 28
