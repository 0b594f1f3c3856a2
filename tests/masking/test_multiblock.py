"""I-JEPA multi-block masks: block sizes, disjoint context / targets, equal counts, seeding, validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsight.masking.multiblock import MultiBlockLayout, MultiBlockMasks, block_masks_to_bool

GRIDS = [(14, 14), (8, 8), (7, 7)]          # 224 px / 16, 56 px / 7, 28 px / 4
IJEPA = MultiBlockMasks()                   # the paper's ImageNet settings


def rounding_slack(keep: int, aspect: tuple) -> float:
    """Patches that rounding h = round(sqrt(keep·a)), w = round(sqrt(keep/a)) may add or remove."""
    return 0.5 * (math.sqrt(keep * aspect[1]) + math.sqrt(keep / aspect[0])) + 0.25


def context_sets(layout: MultiBlockLayout, grid_h: int, grid_w: int) -> list[set[int]]:
    """Per image, the patches of the context box outside every target block (before equal-count truncation)."""
    th, tw = layout.target_size
    out = []
    for corners, (top, left, h, w) in zip(layout.target_corners.tolist(), layout.context_boxes.tolist()):
        covered = {(r, c) for t, lft in corners for r in range(t, t + th) for c in range(lft, lft + tw)}
        out.append({r * grid_w + c for r in range(top, top + h) for c in range(left, left + w)
                    if (r, c) not in covered})
    return out


@pytest.mark.parametrize("grid", GRIDS)
def test_target_block_sizes_follow_scale_and_aspect(grid):
    grid_h, grid_w = grid
    n = grid_h * grid_w
    lo, hi = IJEPA.target_scale
    a_lo, a_hi = IJEPA.target_aspect
    shares, aspects = [], []
    for seed in range(400):
        th, tw = IJEPA.layout(2, grid_h, grid_w, seed).target_size
        shares.append(th * tw / n)
        aspects.append(th / tw)
        # every draw: within the scale range up to flooring keep = int(s·N) and rounding h, w
        keep_lo, keep_hi = int(lo * n), int(hi * n)
        assert keep_lo - rounding_slack(keep_lo, IJEPA.target_aspect) <= th * tw
        assert th * tw <= keep_hi + rounding_slack(keep_hi, IJEPA.target_aspect)
        # h/w within [0.75, 1.5] once each side may be off by half a patch
        assert (th - 0.5) / (tw + 0.5) <= a_hi and (th + 0.5) / (tw - 0.5) >= a_lo
        assert 1 <= th <= grid_h - 1 and 1 <= tw <= grid_w - 1
    assert lo - 1 / n <= np.mean(shares) <= hi + 1 / n
    assert min(aspects) < 1 < max(aspects)                          # both wide and tall blocks occur


@pytest.mark.parametrize("grid", GRIDS)
def test_context_block_share_before_removal(grid):
    grid_h, grid_w = grid
    n = grid_h * grid_w
    clip = (grid_h - 1) * (grid_w - 1)                               # official: at most H-1 rows, W-1 cols
    lo, hi = IJEPA.context_scale
    smallest = min((math.sqrt(int(lo * n)) - 0.5) ** 2, clip)       # aspect 1: a side may round down by 0.5
    largest = min((math.sqrt(int(hi * n)) + 0.5) ** 2, clip)
    for seed in range(200):
        boxes = IJEPA.layout(8, grid_h, grid_w, seed).context_boxes
        top, left, h, w = boxes.T
        assert ((top >= 0) & (left >= 0) & (top + h <= grid_h) & (left + w <= grid_w)).all()
        base = int(h.min()) * int(w.min())                           # the batch's drawn size (others relaxed)
        assert smallest <= base <= largest
        assert ((h >= h.min()) & (w >= w.min())).all()


def test_block_size_rule_matches_official():
    # keep = int(0.2·196) = 39; h = round(sqrt(39·1.5)) = 8, w = round(sqrt(39/1.5)) = 5
    masks = MultiBlockMasks(target_scale=(0.2, 0.2), target_aspect=(1.5, 1.5), context_scale=(1.0, 1.0))
    layout = masks.layout(3, 14, 14, seed=0)
    assert layout.target_size == (8, 5)
    assert (layout.context_boxes[:, 2:] == 13).all()                 # 14×14 clipped to 13×13, as officially
    tall = MultiBlockMasks(target_scale=(1.0, 1.0), target_aspect=(3.0, 3.0), min_context=1)
    assert tall.layout(1, 7, 7, seed=0).target_size == (6, 4)       # keep 49: h = 12 -> 6 (H-1), w = round(4.04)


@pytest.mark.parametrize("grid", GRIDS)
def test_indices_in_range_sorted_disjoint_equal_counts(grid):
    grid_h, grid_w = grid
    n = grid_h * grid_w
    for seed in range(30):
        context, targets = IJEPA(64, grid_h, grid_w, seed)
        assert context.dtype == targets.dtype == torch.long
        assert context.dim() == 2 and context.shape[0] == 64                 # B×Kc: one Kc for the batch
        assert targets.shape[:2] == (64, IJEPA.targets)                      # B×M×Kt: one Kt for all blocks
        assert context.shape[1] >= IJEPA.min_context
        for idx in (context, targets):
            assert idx.min() >= 0 and idx.max() < n
            assert (idx.diff(dim=-1) > 0).all()                              # sorted, no duplicates
        ctx = block_masks_to_bool(context, n)                                # B×N
        tgt = block_masks_to_bool(targets, n).any(dim=1)                     # B×N
        assert not (ctx & tgt).any()                                         # disjoint in every image


@pytest.mark.parametrize("grid", GRIDS)
def test_target_blocks_are_rectangles_and_context_avoids_them(grid):
    grid_h, grid_w = grid
    for seed in range(20):
        layout = IJEPA.layout(16, grid_h, grid_w, seed)
        context, targets = IJEPA(16, grid_h, grid_w, seed)
        th, tw = layout.target_size
        assert targets.shape[2] == th * tw
        for b in range(16):
            for m, (top, left) in enumerate(layout.target_corners[b].tolist()):
                rows, cols = targets[b, m] // grid_w, targets[b, m] % grid_w
                assert rows.min() == top and rows.max() == top + th - 1
                assert cols.min() == left and cols.max() == left + tw - 1   # one axis-aligned th×tw rectangle
        full = context_sets(layout, grid_h, grid_w)
        for b, kept in enumerate(context.tolist()):
            assert set(kept) <= full[b]                                      # inside its box, outside all targets
        assert context.shape[1] == min(len(s) for s in full)                 # Kc = batch minimum


def test_context_truncation_is_unbiased():
    """Equal counts keep a random subset, not the first indices (which would drop the bottom rows)."""
    grid_h = grid_w = 14
    kept_shift, first_shift = [], []
    for seed in range(20):
        layout = IJEPA.layout(64, grid_h, grid_w, seed)
        context, _ = IJEPA(64, grid_h, grid_w, seed)
        keep = context.shape[1]
        for full, kept in zip(context_sets(layout, grid_h, grid_w), context.tolist()):
            if len(full) > keep:
                rows = np.array(sorted(full)) // grid_w
                kept_shift.append(np.mean(np.array(kept) // grid_w) - rows.mean())
                first_shift.append(rows[:keep].mean() - rows.mean())
    assert len(kept_shift) > 500
    assert abs(np.mean(kept_shift)) < 0.15
    assert np.mean(first_shift) < -1.0                                       # the official rule's bias


def test_blocks_reach_every_row_and_column():
    """Positions are uniform over all placements (the official randint never reaches the last row / column)."""
    targets = torch.cat([IJEPA(64, 14, 14, seed)[1].reshape(-1) for seed in range(5)])
    assert set(targets.tolist()) == set(range(14 * 14))


def test_seeding():
    a = IJEPA(32, 14, 14, seed=7)
    torch.manual_seed(123)
    np.random.seed(123)                                                      # global RNGs play no part
    b = IJEPA(32, 14, 14, seed=7)
    c = IJEPA(32, 14, 14, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))
    la, lb = IJEPA.layout(32, 14, 14, seed=7), IJEPA.layout(32, 14, 14, seed=7)
    assert la.target_size == lb.target_size and torch.equal(la.context_boxes, lb.context_boxes)


@pytest.mark.parametrize("grid,kwargs,stacked", [
    ((4, 4), {}, False),                                             # 3×3 context < 10 patches: always grows
    ((7, 7), {"targets": 8, "target_scale": (0.2, 0.2), "min_context": 20}, False),   # target redraws
    ((7, 7), {"targets": 40, "target_scale": (0.3, 0.3), "min_context": 25}, True),   # stacked last resort
])
def test_relaxation_keeps_context_disjoint(grid, kwargs, stacked):
    masks = MultiBlockMasks(**kwargs)
    n = grid[0] * grid[1]
    for seed in range(5):
        context, targets = masks(16, *grid, seed)
        assert context.shape[1] >= masks.min_context
        assert not (block_masks_to_bool(context, n) & block_masks_to_bool(targets, n).any(dim=1)).any()
        assert (context.diff(dim=-1) > 0).all()
        boxes = masks.layout(16, *grid, seed).context_boxes
        assert (boxes[:, 2:] > grid[0] - 1).any()                      # grown past the official H-1 / W-1
        if stacked:
            assert (targets == targets[:, :1]).all()                   # every block on the first one's place


@pytest.mark.parametrize("kwargs,name", [
    ({"targets": 0}, "targets"),
    ({"targets": 2.0}, "targets"),
    ({"target_scale": (0.0, 0.2)}, "target_scale"),
    ({"target_scale": (0.3, 0.2)}, "target_scale"),
    ({"target_scale": (0.5, 1.2)}, "target_scale"),
    ({"context_scale": (0.85,)}, "context_scale"),
    ({"context_scale": (0.85, 1.01)}, "context_scale"),
    ({"target_aspect": (0.0, 1.5)}, "target_aspect"),
    ({"target_aspect": (2.0, 1.0)}, "target_aspect"),
    ({"context_aspect": (1.0, -1.0)}, "context_aspect"),
    ({"min_context": 0}, "min_context"),
])
def test_settings_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MultiBlockMasks(**kwargs)


def test_call_validation():
    with pytest.raises(ValueError, match="batch"):
        IJEPA(0, 14, 14, 0)
    with pytest.raises(ValueError, match="grid"):
        IJEPA(4, 1, 14, 0)
    with pytest.raises(ValueError, match="min_context"):
        IJEPA(4, 3, 3, 0)                                            # 9 patches can never keep 10
    with pytest.raises(ValueError, match="indices"):
        block_masks_to_bool(torch.zeros(5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="indices"):
        block_masks_to_bool(torch.tensor([[0, 4]]), 4)


def test_block_masks_to_bool():
    masks = block_masks_to_bool(torch.tensor([[0, 3], [1, 2]]), 4)
    assert masks.tolist() == [[True, False, False, True], [False, True, True, False]]
    context, targets = IJEPA(8, 8, 8, seed=1)
    assert block_masks_to_bool(targets, 64).shape == (8, IJEPA.targets, 64)
    assert (block_masks_to_bool(context, 64).sum(dim=1) == context.shape[1]).all()
