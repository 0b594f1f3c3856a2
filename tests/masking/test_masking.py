"""Patch masks: MAE random masking, BEiT block-wise masking, iBOT ratio range / unmasked share."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from selfsight.masking import MaskGenerator, block_mask, random_mask
from selfsight.masking.generators import _block_mask


def mae_reference(batch: int, n: int, len_keep: list[int], seed: int) -> torch.Tensor:
    """models_mae.py random_masking, with a per-sample len_keep."""
    noise = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, n)
    for b, keep in enumerate(len_keep):
        mask[b, :keep] = 0
    return torch.gather(mask, 1, ids_restore).bool()


def beit_reference(h_grid, w_grid, num_masked, rng, min_patches, max_patches=None, min_aspect=0.3,
                   max_aspect=None) -> np.ndarray:
    """beit/masking_generator.py MaskingGenerator, cell by cell."""
    max_aspect = max_aspect or 1 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    max_patches = num_masked if max_patches is None else max_patches
    mask = np.zeros((h_grid, w_grid), dtype=int)
    count = 0
    while count < num_masked:
        max_mask = min(num_masked - count, max_patches)
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(min_patches, max_mask)
            ar = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * ar)))
            w = int(round(math.sqrt(target_area / ar)))
            if w < w_grid and h < h_grid:
                top = rng.randint(0, h_grid - h)
                left = rng.randint(0, w_grid - w)
                already = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - already <= max_mask:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask.astype(bool)


# (grid_h, grid_w, num_masked, min_patches, max_patches, (min_aspect, max_aspect))
BLOCK_CASES = [
    (14, 14, 75, 16, None, (0.3, None)),      # BEiT
    (14, 14, 78, 15, None, (0.3, None)),      # ratio 0.4 with the MaskFeat rule
    (8, 8, 26, 5, None, (0.3, None)),         # ratio 0.4 on 8×8
    (7, 7, 24, 4, None, (0.3, None)),
    (6, 10, 24, 4, None, (0.3, None)),        # non-square
    (14, 14, 98, 19, 30, (0.5, 2.0)),         # capped blocks, narrower aspects
]


# ------------------------------------------------------------------------------------------- random

@pytest.mark.parametrize("grid, ratio, expected", [((14, 14), 0.75, 147), ((8, 8), 0.75, 48), ((7, 7), 0.6, 30),
                                                   ((5, 10), 0.33, 17), ((4, 4), 0.0, 0)])
def test_random_exact_count_per_sample(grid, ratio, expected):
    n = grid[0] * grid[1]
    assert n - int(n * (1 - ratio)) == expected       # MAE's len_keep = int(L·(1 - r)); round(0.33·50) = 16
    masks = MaskGenerator("random", ratio)(32, *grid, seed=3)
    assert masks.shape == (32, n) and masks.dtype == torch.bool
    assert masks.sum(1).tolist() == [expected] * 32


def test_random_matches_mae_reference():
    n, keep = 196, 49
    gen = MaskGenerator("random", 0.75)
    for seed in (0, 1, 12345):
        assert torch.equal(gen(8, 14, 14, seed), mae_reference(8, n, [keep] * 8, seed))
    counts = torch.tensor([0, 5, 100, 196, 147, 1])
    got = random_mask(6, n, counts, torch.Generator().manual_seed(7))
    assert torch.equal(got, mae_reference(6, n, (n - counts).tolist(), 7))
    assert got.sum(1).tolist() == counts.tolist()


def test_random_per_sample_and_seeds():
    gen = MaskGenerator("random", 0.75)
    masks = gen(16, 8, 8, seed=0)
    assert len({tuple(m.tolist()) for m in masks}) == 16
    assert torch.equal(masks, gen(16, 8, 8, seed=0))
    assert not torch.equal(masks, gen(16, 8, 8, seed=1))


# -------------------------------------------------------------------------------------------- block

@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_matches_beit_reference(case):
    h, w, num, min_p, max_p, (lo, hi) = case
    for seed in range(50):
        got = block_mask(h, w, num, random.Random(seed), min_p, max_p, lo, hi)
        assert got.shape == (h, w) and got.dtype == torch.bool
        assert np.array_equal(got.numpy(), beit_reference(h, w, num, random.Random(seed), min_p, max_p, lo, hi))


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_invariants(case):
    grid_h, grid_w, num, min_p, max_p, (lo, hi) = case
    hi = hi or 1 / lo
    cap = num if max_p is None else max_p
    counts = []
    for seed in range(200):
        mask, blocks = _block_mask(grid_h, grid_w, num, random.Random(seed), min_p, max_p, lo, hi)
        union = np.zeros_like(mask)
        for top, left, h, w in blocks:
            assert 0 <= top and top + h <= grid_h and 0 <= left and left + w <= grid_w
            assert 1 <= h < grid_h and 1 <= w < grid_w          # BEiT: strictly smaller than the grid
            # h = round(sqrt(A·ar)), w = round(sqrt(A/ar)) => sqrt(A·ar) in [h - .5, h + .5], sqrt(A/ar) in
            # [w - .5, w + .5], so ar = their quotient lies in [(h - .5)/(w + .5), (h + .5)/(w - .5)]
            # and A = their product in [(h - .5)(w - .5), (h + .5)(w + .5)].
            assert (h - 0.5) / (w + 0.5) <= hi + 1e-9 and (h + 0.5) / (w - 0.5) >= lo - 1e-9
            before = int(union.sum())
            max_mask = min(num - before, cap)
            a_lo, a_hi = min(min_p, max_mask), max(min_p, max_mask)
            assert (h + 0.5) * (w + 0.5) >= a_lo - 1e-9 and (h - 0.5) * (w - 0.5) <= a_hi + 1e-9
            union[top:top + h, left:left + w] = True
            assert 0 < int(union.sum()) - before <= max_mask
        assert np.array_equal(union, mask)
        assert mask.sum() <= num
        counts.append(int(mask.sum()))
    assert np.mean(counts) >= 0.9 * num


def test_block_generator_seeded_and_per_image():
    gen = MaskGenerator("block", 0.4)
    masks = gen(32, 14, 14, seed=5)
    assert masks.shape == (32, 196) and masks.dtype == torch.bool
    assert len({tuple(m.tolist()) for m in masks}) == 32
    assert (masks.sum(1) <= 78).all() and masks.sum(1).float().mean() >= 0.9 * 78
    assert torch.equal(masks, gen(32, 14, 14, seed=5))
    assert not torch.equal(masks, gen(32, 14, 14, seed=6))
    # rows are the row-major flattening of the grid; auto min_patches = 78 // 5 = 15
    rng = random.Random(5)
    first = block_mask(14, 14, 78, rng, 15)
    assert torch.equal(masks[0], first.reshape(-1))
    rect = MaskGenerator("block", 0.4)(4, 6, 10, seed=0).view(4, 6, 10)
    assert torch.equal(rect[0], block_mask(6, 10, 24, random.Random(0), 4))


# ---------------------------------------------------------------------------- ratio range / share

@pytest.mark.parametrize("kind", ["random", "block"])
@pytest.mark.parametrize("batch, share", [(64, 0.5), (7, 0.5), (10, 0.25), (8, 0.0)])
def test_unmasked_share_and_ratio_range(kind, batch, share):
    n, lo, hi = 196, 0.1, 0.5
    masks = MaskGenerator(kind, ratio_range=(lo, hi), unmasked_share=share)(batch, 14, 14, seed=11)
    counts = masks.sum(1)
    assert (counts == 0).sum().item() == round(share * batch)
    masked = counts[counts > 0]
    assert len(masked) == batch - round(share * batch)
    if kind == "random":
        assert masked.min() >= n - int(n * (1 - lo)) and masked.max() <= n - int(n * (1 - hi))
    else:
        assert masked.max() <= round(hi * n)
    if len(masked) >= 4:
        assert len(set(masked.tolist())) >= len(masked) // 2       # per-image ratios
    assert torch.equal(masks, MaskGenerator(kind, ratio_range=(lo, hi), unmasked_share=share)(batch, 14, 14, 11))


@pytest.mark.parametrize("kind", ["random", "block"])
def test_unmasked_share_fixed_ratio(kind):
    masks = MaskGenerator(kind, 0.75, unmasked_share=0.5)(64, 8, 8, seed=2)
    counts = masks.sum(1)
    assert (counts == 0).sum() == 32
    if kind == "random":
        assert set(counts.tolist()) == {0, 48}
    else:
        assert counts.max() <= 48 and counts[counts > 0].float().mean() >= 0.9 * 48
    # the unmasked images are chosen from the seed, not always the same positions
    other = MaskGenerator(kind, 0.75, unmasked_share=0.5)(64, 8, 8, seed=3).sum(1)
    assert not torch.equal(counts == 0, other == 0)


# ------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, pattern", [
    ({"kind": "grid"}, r"kind must be one of random, block; got 'grid'"),
    ({"ratio": 1.0}, r"^ratio must lie in \[0, 1\)"),
    ({"ratio": -0.1}, r"^ratio must lie in \[0, 1\)"),
    ({"ratio_range": (0.5, 0.1)}, r"^ratio_range must"),
    ({"ratio_range": (0.1, 1.0)}, r"^ratio_range must"),
    ({"ratio_range": (0.1,)}, r"^ratio_range must be two numbers"),
    ({"ratio_range": ("a", "b")}, r"^ratio_range must be two numbers"),
    ({"unmasked_share": 1.5}, r"^unmasked_share"),
    ({"min_patches": -1}, r"^min_patches"),
    ({"max_patches": -1}, r"^max_patches"),
    ({"aspect": (0.0, 2.0)}, r"^aspect must"),
    ({"aspect": (3.0, 0.3)}, r"^aspect must"),
    ({"aspect": 0.3}, r"^aspect must be two numbers"),
])
def test_validation_names_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MaskGenerator(**kwargs)


def test_call_and_function_validation():
    gen = MaskGenerator("block", 0.4)
    with pytest.raises(ValueError, match="^batch"):
        gen(0, 14, 14, 0)
    with pytest.raises(ValueError, match="^grid"):
        gen(2, 0, 14, 0)
    with pytest.raises(ValueError, match="^grid"):
        MaskGenerator()(2, 14, 0, 0)
    with pytest.raises(ValueError, match="^num_masked"):
        random_mask(2, 16, 17, torch.Generator())
    with pytest.raises(ValueError, match="^num_masked: expected 2"):
        random_mask(2, 16, torch.tensor([1, 2, 3]), torch.Generator())
    with pytest.raises(ValueError, match="^num_masked"):
        block_mask(4, 4, 17, random.Random(0))
