"""MIM losses against references written from their formulas, on masked positions only."""
import pytest
import torch
import torch.nn.functional as F

from selfsight.losses.mim import MIM_LOSSES, mim_loss


def reference(pred, target, mask, kind, beta=1.0):
    """Loops over images and positions: mean over masked tokens of the per-token loss."""
    per_token = []
    for b in range(mask.shape[0]):
        for n in range(mask.shape[1]):
            if not mask[b, n]:
                continue
            p, t = pred[b, n].double(), target[b, n]
            if kind == "ce":
                per_token.append(-torch.log_softmax(p, 0)[t])
                continue
            t = t.double()
            d = p - t
            if kind == "l2":
                per_token.append((d ** 2).mean())
            elif kind == "l1":
                per_token.append(d.abs().mean())
            elif kind == "smooth_l1":
                a = d.abs()
                per_token.append(torch.where(a < beta, 0.5 * a ** 2 / beta, a - 0.5 * beta).mean())
            else:
                per_token.append(1 - (p @ t) / (p.norm() * t.norm()))
    return torch.stack(per_token).mean()


@pytest.mark.parametrize("kind", MIM_LOSSES)
@pytest.mark.parametrize("shape", [(2, 9, 5), (3, 16, 12), (1, 49, 36)])
def test_loss_equals_reference_and_ignores_visible_positions(kind, shape):
    g = torch.Generator().manual_seed(hash((kind, shape)) % 1000)
    b, n, c = shape
    pred = torch.randn(b, n, c, generator=g)
    target = torch.randint(0, c, (b, n), generator=g) if kind == "ce" else torch.randn(b, n, c, generator=g)
    mask = torch.rand(b, n, generator=g) < 0.5
    mask[:, 0] = True                                             # at least one masked token per image
    mask[:, 1] = False                                            # and one visible
    loss = mim_loss(pred, target, mask, kind, beta=0.7)
    assert loss.item() == pytest.approx(reference(pred, target, mask, kind, 0.7).item(), rel=1e-5, abs=1e-6)
    changed = pred.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), c, generator=g) * 100   # only visible predictions change
    assert mim_loss(changed, target, mask, kind, beta=0.7).item() == pytest.approx(loss.item(), rel=1e-6)
    moved = pred.clone()
    moved[mask] += torch.randn(int(mask.sum()), c, generator=g)   # masked predictions do matter
    assert mim_loss(moved, target, mask, kind, beta=0.7).item() != pytest.approx(loss.item(), rel=1e-4)
    # the same loss on tokens selected beforehand (what linear heads pass)
    pre = mim_loss(pred[mask], target[mask], None, kind, beta=0.7)
    assert pre.item() == pytest.approx(loss.item(), rel=1e-6)


def test_gradient_reaches_only_masked_predictions():
    pred = torch.randn(2, 8, 4, requires_grad=True)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, ::3] = True
    mim_loss(pred, torch.randn(2, 8, 4), mask, "l2").backward()
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask] != 0).any()


def test_no_masked_token_gives_zero_and_bad_kind_is_named():
    pred = torch.randn(2, 4, 3, requires_grad=True)
    assert mim_loss(pred, torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="method.loss"):
        mim_loss(pred, pred, None, "mse")


def test_smooth_l1_matches_torch_definition():
    p, t = torch.randn(10, 6), torch.randn(10, 6)
    assert mim_loss(p, t, None, "smooth_l1", beta=2.0).item() == pytest.approx(
        F.smooth_l1_loss(p, t, beta=2.0).item(), rel=1e-6)
